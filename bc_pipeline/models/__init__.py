"""The model zoo and what any Keras classifier of it needs: building (``zoo``), predicting and
fingerprinting (``inference``), temperature scaling (``calibration``). Keras is imported inside
the functions."""
