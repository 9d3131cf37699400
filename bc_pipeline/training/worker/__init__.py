"""The training worker: trains one model from a job spec, on any Keras backend, anywhere.

``python -m bc_pipeline.training.worker --spec spec.json`` reads the spec (:mod:`.spec`), chooses the Keras
backend and device (:mod:`.backend`), feeds the model from memory-mapped shards through a numpy
input pipeline (:mod:`.data`), trains in phases with per-epoch checkpoints (:mod:`.fit`,
:mod:`.callbacks`, :mod:`.checkpoint`, :mod:`.selection`) and writes the model folder with its
record (:mod:`.run`, ``training.model_folder``). Launched by the ``trained_model`` asset through
Dagster Pipes (a local process, a Docker container or a Kubernetes pod), it streams its log lines
and its typed events (``training.events``: ready, each epoch, finished) to the run (:mod:`.report`).

It imports only Keras, numpy, pandas/pyarrow, ``dagster-pipes`` and the backend it trains on: not
Dagster, not keras-cv, and TensorFlow only when the backend is TensorFlow. A test pins this.
"""
