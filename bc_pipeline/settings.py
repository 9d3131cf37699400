"""Where the pipeline reads and writes, overridable by environment variables.

- ``BC_DATA_DIR``: every artifact, report and the Dagster home live below it
  (default: ``data/`` in the project root).
- ``BC_SHARED_DATASETS``: the shared development datasets used by tests and benchmarks
  (default: ``../shared/datasets`` beside the project root).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("BC_DATA_DIR", PROJECT_ROOT / "data")).resolve()


def shared_datasets_dir() -> Path:
    default = PROJECT_ROOT.parent / "shared" / "datasets"
    return Path(os.environ.get("BC_SHARED_DATASETS", default)).resolve()
