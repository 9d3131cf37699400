"""Stage 4b, training: the settings of a run (``settings``), the job a worker runs (``spec``,
``job``), the model folder it writes (``model_folder``), its progress events (``events``), the
ensemble partition (``ensemble``), and the worker itself (``training.worker``, no Dagster)."""
