"""Turn the training asset's inputs into a job the worker can run anywhere: a spec and the files it names.

Arrays already stored as ``.npy`` files below the data directory (the balanced set, the augmented
shards, the cleaned images) are named, not copied: the worker memory-maps the same files, on this
machine or through a mounted volume. Only small things are written to the job folder: labels,
the validation rows, the templates, and arrays that exist in memory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bc_pipeline.core.artifacts import ImageSet, ShardSet
from bc_pipeline.core.storage import save_npy
from bc_pipeline.models.zoo import ModelSpec
from bc_pipeline.training.settings import TrainingSettings
from bc_pipeline.training.spec import ArrayRef, WorkerSpec


@dataclass(frozen=True)
class TrainingJob:
    spec: WorkerSpec
    spec_path: Path
    output_dir: Path
    checkpoint_dir: Path | None


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value to compare by
class TrainingInputs:
    """The stored assets one training reads.

    ``train`` is the balanced training set, ``shards`` its augmented copies, ``images`` the cleaned
    images with ``val_rows`` the validation split among them, ``templates`` the recovered noise
    templates; ``class_weight`` the loss weights balancing chose (None: unweighted).
    """

    train: ImageSet
    shards: ShardSet
    images: ImageSet
    val_rows: np.ndarray
    num_classes: int
    templates: np.ndarray | None = None
    class_weight: dict[int, float] | None = None


@dataclass(frozen=True)
class Placement:
    """Where the worker runs the job: Keras backend, device (auto | gpu | cpu) and input threads (0: auto)."""

    backend: str = "tensorflow"
    device: str = "auto"
    input_workers: int = 0


def prepare_job(
    job_dir: Path,
    output_dir: Path,
    *,
    data_root: Path,
    model: ModelSpec,
    settings: TrainingSettings,
    inputs: TrainingInputs,
    placement: Placement = Placement(),
    checkpoint_dir: Path | None = None,
    info: dict[str, Any] | None = None,
) -> TrainingJob:
    """Write ``job_dir/spec.json`` (and the small arrays) for training ``model`` on these inputs."""
    job_dir.mkdir(parents=True, exist_ok=True)
    root = Path(data_root)

    def name(path: Path) -> str:
        path = Path(path).resolve()
        return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else str(path)

    def stored_images(image_set: ImageSet, fallback: str) -> str:
        if image_set.directory is not None and (Path(image_set.directory) / "images.npy").is_file():
            return name(Path(image_set.directory) / "images.npy")
        return name(save_npy(job_dir / fallback, np.asarray(image_set.images)))

    train, shards, images, val_rows = inputs.train, inputs.shards, inputs.images, inputs.val_rows
    labels, templates = images.manifest["label"].to_numpy(np.int64), inputs.templates
    spec = WorkerSpec(
        data_dir=str(root.resolve()), model=model, settings=settings, num_classes=inputs.num_classes,
        train=ArrayRef(stored_images(train, "train_images.npy"),
                       name(save_npy(job_dir / "train_labels.npy", train.manifest["label"].to_numpy(np.int64)))),
        val=ArrayRef(stored_images(images, "images.npy"), name(save_npy(job_dir / "val_labels.npy", labels[val_rows])),
                     rows=name(save_npy(job_dir / "val_rows.npy", np.asarray(val_rows, np.int64)))),
        augmented=tuple(ArrayRef(name(Path(shards.directory) / row["file"]), name(Path(shards.directory) / row["labels_file"]))
                        for _, row in shards.manifest.iterrows()),
        templates=name(save_npy(job_dir / "templates.npy", np.asarray(templates))) if templates is not None and len(templates) else None,
        class_weight=inputs.class_weight, checkpoint_dir=name(checkpoint_dir) if checkpoint_dir else None,
        output_dir=name(output_dir), backend=placement.backend, device=placement.device,
        input_workers=placement.input_workers, info=info or {}, train_groups=name(save_npy(job_dir / "train_groups.npy", _groups(train))),
    )  # fmt: skip
    spec_path = spec.save(job_dir / "spec.json")
    return TrainingJob(spec=spec, spec_path=spec_path, output_dir=output_dir, checkpoint_dir=checkpoint_dir)


def _groups(train: ImageSet) -> np.ndarray:
    """The source image of each training row (its clean_images row; a SMOTE sample is its own group)."""
    rows = np.arange(len(train.manifest))
    if "clean_index" not in train.manifest:
        return rows
    source = train.manifest["clean_index"].to_numpy(np.int64)
    return np.where(source >= 0, source, -1 - rows)
