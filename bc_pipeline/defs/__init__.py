"""Every Dagster definition of the project, autoloaded by ``dg`` (``load_from_defs_folder``).

- ``assets/``: one module per stage: ingest -> dedup -> anomalies -> cleaning -> splits ->
  balancing -> augmentation -> benchmark -> training -> evaluation.
- ``checks.py``: the blocking asset checks. ``jobs.py``, ``schedules.py``, ``sensors.py``.
- ``resources.py``: the resources, and the only module that reads the environment.

The default automation condition is applied once, where the definitions are assembled
(``bc_pipeline/definitions.py``); an asset states its own only when it is an exception.
Nothing here imports TensorFlow or Keras at import time.
"""

import warnings

import dagster as dg

# Data versions on outputs, observable sources and source selections are how unchanged results
# stop downstream work; Dagster marks those APIs beta. Filtered here, before any asset module loads.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
