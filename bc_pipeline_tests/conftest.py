"""Shared fixtures: real images from ../shared/datasets (BC_SHARED_DATASETS), small stratified subsets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bc_pipeline.lib.classes import CLASS_NAMES
from bc_pipeline.lib.loaders import read_labelled_files, sample_class_files
from bc_pipeline.defs.resources import shared_datasets_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _pbc96_dir() -> Path:
    path = shared_datasets_dir() / "pbc96"
    if not path.is_dir():
        pytest.skip(f"shared dataset not found at {path} (set BC_SHARED_DATASETS)")
    return path


@pytest.fixture(scope="session")
def pbc96_dir() -> Path:
    """The full PBC folder (14,416 JPEGs in 8 class folders)."""
    return _pbc96_dir()


def pbc96_files(per_class: int, seed: int = 0) -> list[tuple[Path, int]]:
    """A stratified random subset: ``per_class`` files of each class, with their labels."""
    return sample_class_files(_pbc96_dir(), per_class, seed=seed)


def load_pbc96_arrays(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset read straight into arrays: (images (N, 96, 96, 3) uint8, labels (N,))."""
    return read_labelled_files(pbc96_files(per_class, seed))


@pytest.fixture(scope="session")
def pbc_subset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder copy of 40 real images per class (320 images), made once per session."""
    root = tmp_path_factory.mktemp("pbc_subset")
    for file, label in pbc96_files(per_class=40):
        target = root / CLASS_NAMES[label]
        target.mkdir(exist_ok=True)
        shutil.copy(file, target / file.name)
    return root


@pytest.fixture(scope="session")
def pbc_subset_arrays(pbc_subset_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The same subset as (images uint8 (N, 96, 96, 3), labels (N,))."""
    from bc_pipeline.lib.loaders import load_folder

    loaded = load_folder(pbc_subset_dir, image_size=96)
    return loaded.images, loaded.manifest["label"].to_numpy()


def tick_sensor(sensor, instance, cursor: str | None, resources: dict):
    """One sensor tick as the daemon runs it: (result, next cursor), its asset events recorded."""
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    if isinstance(result, dg.SensorResult):
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        return result, result.cursor
    return result, context.cursor
