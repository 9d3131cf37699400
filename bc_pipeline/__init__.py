"""bc_pipeline: a declarative Dagster pipeline for blood-cell image classifiers.

The packages, by layer (each imports only from the layers below it; ``lint-imports`` checks the
contracts in pyproject.toml, and ``bc_pipeline_tests/test_layers.py`` runs it):

- entry points: ``run`` (``make run``), ``cli`` (``bc-predict``, ``bc-instance``, ``bc-fetch-bloodmnist``);
- ``definitions``: the code location ``dg``/``dagster dev`` load;
- ``defs``: the Dagster definitions (assets by stage, checks, jobs, schedules, sensors, resources);
- ``dagster_utils``: what the definitions share (automation, versions, metadata, progress, launchers)
  and ``recipes`` (the named run configs);
- ``evaluation``: scoring a trained model, the ImageNet-C benchmark, leaderboard, submission, bc-predict;
- ``training``: settings, the job spec, the model folder record, the ensemble, and ``training.worker``;
- the stages' pure cores, independent of each other: ``ingest``, ``quality`` (dedup, blends,
  outliers, cleaning), ``preparation`` (splits, balancing), ``augmentation``, ``models`` (the zoo);
- ``core``: storage, artifact formats, parallel chunks, processes, class names, figures.

Nothing below ``dagster_utils`` imports Dagster, and nothing imports TensorFlow or Keras at module
level: they are imported inside the functions that need them.
"""
