"""The bc_pipeline code location: every asset, check and resource in one Definitions object.

Loaded by `dagster dev` (via workspace.yaml) and by the tests. Importing it must stay fast and must
not import TensorFlow or Keras (the web UI and the daemon import it constantly).

The image source is chosen with environment variables (or in the launchpad):
``BC_SOURCE`` (bloodmnist | npz | folder), ``BC_SOURCE_PATH``, ``BC_IMAGE_SIZE``;
artifacts go under ``BC_DATA_DIR`` (default ``data/``). Where models train: ``BC_TRAINING_LAUNCHER``
(subprocess | docker | k8s), ``BC_KERAS_BACKEND`` (tensorflow | jax | torch), ``BC_TRAINING_DEVICE``.
"""

from __future__ import annotations

import os

import dagster as dg

from bc_pipeline import settings
from bc_pipeline.assets import (
    anomalies,
    augmentation,
    balancing,
    benchmark,
    cleaning,
    dedup,
    evaluation,
    ingest,
    splits,
    training,
)
from bc_pipeline.io_managers import ArtifactIOManager
from bc_pipeline.jobs import all_jobs
from bc_pipeline.resources import ImageSource, PipelineStorage, TrainingWorker
from bc_pipeline.schedules import all_schedules
from bc_pipeline.sensors import all_sensors

ASSET_MODULES = [ingest, dedup, anomalies, cleaning, splits, balancing, augmentation, benchmark, training, evaluation]


def training_worker_from_env() -> TrainingWorker:
    """The training worker's launcher, backend and device from ``BC_*`` variables (see TrainingWorker)."""
    env = {
        "launcher": "BC_TRAINING_LAUNCHER", "keras_backend": "BC_KERAS_BACKEND", "device": "BC_TRAINING_DEVICE",
        "image": "BC_WORKER_IMAGE", "namespace": "BC_K8S_NAMESPACE", "data_volume_claim": "BC_DATA_VOLUME_CLAIM",
    }  # fmt: skip
    return TrainingWorker(**{field: os.environ[var] for field, var in env.items() if os.environ.get(var)})


def build_resources(
    data_dir: str | None = None, source: ImageSource | None = None, worker: TrainingWorker | None = None
) -> dict:
    """Resources for a data directory (default: settings.data_dir()), image source and training worker (default: env)."""
    root = str(data_dir or settings.data_dir())
    source = source or ImageSource(
        kind=os.environ.get("BC_SOURCE", "bloodmnist"),
        path=os.environ.get("BC_SOURCE_PATH", ""),
        image_size=int(os.environ.get("BC_IMAGE_SIZE", "96")),
    )
    return {
        "io_manager": ArtifactIOManager(base_dir=os.path.join(root, "assets")),
        "storage": PipelineStorage(data_dir=root),
        "image_source": source,
        "training_worker": worker or training_worker_from_env(),
    }


all_assets = dg.load_assets_from_modules(ASSET_MODULES)
all_asset_checks = dg.load_asset_checks_from_modules(ASSET_MODULES)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_asset_checks,
    jobs=all_jobs,
    schedules=all_schedules,
    sensors=all_sensors,
    resources=build_resources(),
)
