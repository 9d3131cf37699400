"""What a training job is, as one JSON file: the worker's only input besides the arrays it names.

The Dagster asset writes it (:mod:`bc_pipeline.training.job`); the worker reads it, possibly
in another container or pod. Array paths are relative to ``data_dir`` (absolute ones are kept), and
``BC_WORKER_DATA_DIR`` overrides ``data_dir``, so one spec works wherever the data directory is
mounted: ``/data`` in a pod, the project's ``data/`` on the machine that wrote it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bc_pipeline.models.zoo import ModelSpec
from bc_pipeline.training.settings import TrainingSettings

SPEC_VERSION = 2  # 2: class_names and augmentation_policies typed (version 1 carried an untyped 'info')
DATA_DIR_ENV = "BC_WORKER_DATA_DIR"
FAILURE_FILE = "failure.txt"  # the worker leaves the reason it failed here, in its output folder
EXIT_CANNOT_START = 3  # the worker's exit code when a backend, device or input is missing: retrying will not help


class SpecError(ValueError):
    """The spec file is unreadable or names arrays that are missing or malformed."""


@dataclass(frozen=True)
class ArrayRef:
    """Images in an ``.npy`` file, their labels in another, optionally only the rows listed in a third."""

    images: str
    labels: str
    rows: str | None = None


@dataclass(frozen=True)
class WorkerSpec:
    """One training job: the model, the settings, the arrays, and where results and checkpoints go."""

    data_dir: str
    model: ModelSpec
    settings: TrainingSettings
    num_classes: int
    train: ArrayRef
    val: ArrayRef
    output_dir: str
    augmented: tuple[ArrayRef, ...] = ()
    templates: str | None = None
    class_weight: dict[int, float] | None = None
    checkpoint_dir: str | None = None
    backend: str = "tensorflow"
    device: str = "auto"  # auto | gpu (fail without one) | cpu
    input_workers: int = 0  # threads building batches; 0: one per spare core, at most 8
    class_names: tuple[str, ...] = ()  # the labels' names, recorded in the model folder
    augmentation_policies: tuple[str, ...] = ()  # presets of the stored copies trained on (the evaluation marks them)
    train_groups: str | None = None  # source image of each training row (k-fold keeps them together)

    def root(self) -> Path:
        return Path(os.environ.get(DATA_DIR_ENV) or self.data_dir)

    def path(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.root() / path

    def to_json(self) -> str:
        return json.dumps({"version": SPEC_VERSION, **asdict(self)}, indent=2, default=str)

    def save(self, path: Path) -> Path:
        from bc_pipeline.core.storage import write_atomic

        return write_atomic(Path(path), lambda tmp: tmp.write_text(self.to_json()))

    @staticmethod
    def load(path: str | Path) -> WorkerSpec:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpecError(f"{path}: spec file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SpecError(f"{path}: not a JSON spec ({error})") from None
        return WorkerSpec.from_dict(raw, where=str(path))

    @staticmethod
    def from_dict(raw: dict[str, Any], where: str = "spec") -> WorkerSpec:
        if raw.get("version") != SPEC_VERSION:
            raise SpecError(f"{where}: spec version {raw.get('version')!r}, this worker reads version {SPEC_VERSION}")
        try:
            weights = raw.get("class_weight")
            return WorkerSpec(
                data_dir=raw["data_dir"], model=ModelSpec(**raw["model"]), settings=TrainingSettings.from_json(raw["settings"]),
                num_classes=int(raw["num_classes"]), train=ArrayRef(**raw["train"]), val=ArrayRef(**raw["val"]),
                output_dir=raw["output_dir"], augmented=tuple(ArrayRef(**a) for a in raw.get("augmented", ())),
                templates=raw.get("templates"), class_weight=None if weights is None else {int(k): float(v) for k, v in weights.items()},
                checkpoint_dir=raw.get("checkpoint_dir"), backend=raw.get("backend", "tensorflow"),
                device=raw.get("device", "auto"), input_workers=int(raw.get("input_workers", 0)), class_names=tuple(raw.get("class_names", ())),
                augmentation_policies=tuple(raw.get("augmentation_policies", ())),
                train_groups=raw.get("train_groups"),
            )  # fmt: skip
        except (KeyError, TypeError) as error:
            raise SpecError(f"{where}: not a training spec ({type(error).__name__}: {error})") from None


def load_array(spec: WorkerSpec, relative: str, *, mmap: bool = True) -> np.ndarray:
    """An ``.npy`` named by the spec, memory-mapped; a clear error if it is missing or not an array."""
    path = spec.path(relative)
    if not path.is_file():
        raise SpecError(f"{path}: array file not found (data directory {spec.root()}; set {DATA_DIR_ENV} if it is mounted elsewhere)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as error:
        raise SpecError(f"{path}: not a readable .npy array ({error})") from None


def load_ref(spec: WorkerSpec, ref: ArrayRef) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of ``ref``: uint8 (N, H, W, 3) images, checked against their labels."""
    images = load_array(spec, ref.images)
    labels = np.asarray(load_array(spec, ref.labels, mmap=False), np.int64).reshape(-1)
    if ref.rows is not None:
        images = images[np.asarray(load_array(spec, ref.rows, mmap=False), np.int64)]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise SpecError(f"{spec.path(ref.images)}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise SpecError(f"{spec.path(ref.labels)}: {len(labels)} labels for {len(images)} images")
    return images, labels
