"""Pure, typed logic of the pipeline. Nothing in this package imports Dagster.

TensorFlow and Keras are imported inside the functions that need them, so importing any
module here stays cheap.
"""
