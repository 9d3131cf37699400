"""A training job: the spec and the small files the worker runs from, and what the job left behind.

The ``trained_model`` asset calls :func:`prepare_job` with the stored inputs, launches the worker on
``job.spec_path`` anywhere (a process, a container, a pod), then reads :meth:`TrainingJob.result`,
or, when the worker failed, :meth:`TrainingJob.explain_failure`. The asset needs to know nothing
else of the worker: where it writes its model folder, its failure file, its checkpoint and its
exit codes are this module's and the spec's business.

Arrays already stored as ``.npy`` files below the data directory (the balanced set, the augmented
shards, the cleaned images) are named, not copied: the worker memory-maps the same files, on this
machine or through a mounted volume. Only small things are written to the job folder: labels,
the validation rows, the templates, and arrays that exist in memory only.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet, ShardSet
from bc_pipeline.core.storage import save_npy
from bc_pipeline.models.zoo import ModelSpec
from bc_pipeline.training.model_folder import ModelRecord, read_history, read_record
from bc_pipeline.training.settings import TrainingSettings
from bc_pipeline.training.spec import EXIT_CANNOT_START, FAILURE_FILE, ArrayRef, WorkerSpec
from bc_pipeline.training.worker.checkpoint import saved_epochs


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
    templates: np.ndarray | None = None
    class_weight: dict[int, float] | None = None


@dataclass(frozen=True)
class Placement:
    """Where the worker runs the job: Keras backend, device (auto | gpu | cpu) and input threads (0: auto)."""

    backend: str = "tensorflow"
    device: str = "auto"
    input_workers: int = 0


@dataclass(frozen=True)
class JobFolders:
    """Where a job lives: its spec and small arrays (``job_dir``), the model folder the worker writes
    (``output_dir``, a staging folder), the data directory paths are relative to, and the checkpoint
    folder (None: no checkpoints, no resuming)."""

    job_dir: Path
    output_dir: Path
    data_root: Path
    checkpoint_dir: Path | None = None


@dataclass(frozen=True)
class TrainingJob:
    spec: WorkerSpec
    spec_path: Path
    folders: JobFolders

    @property
    def output_dir(self) -> Path:
        return self.folders.output_dir

    def result(self) -> tuple[ModelRecord, pd.DataFrame]:
        """The record and history of the model folder the worker wrote."""
        return read_record(self.output_dir), read_history(self.output_dir)

    def explain_failure(self, error: BaseException, launcher: str) -> str:
        """One paragraph for the failed asset: what happened to the worker, why if known, what to do."""
        name, code = self.spec.model.name, _exit_code(str(error))
        failure_file, checkpoint_dir = self.output_dir / FAILURE_FILE, self.folders.checkpoint_dir
        recorded = failure_file.read_text().strip() if failure_file.is_file() else ""
        reason = recorded.splitlines()[0] if recorded else ""
        lines = [_what_happened(name, error, code, launcher) + (f": {reason}" if reason else "") + "."]
        if len(recorded.splitlines()) > 1:
            lines.append(f"The worker's traceback is in {failure_file}.")
        saved = saved_epochs(checkpoint_dir)
        if saved:
            lines.append(f"Its checkpoint after epoch {saved} is kept in {checkpoint_dir}: "
                         "materialize trained_model again to resume from it.")  # fmt: skip
        elif checkpoint_dir is not None and code != EXIT_CANNOT_START:
            lines.append("No epoch had completed, so there is no checkpoint to resume from.")
        return " ".join(lines)


def prepare_job(
    folders: JobFolders, *, model: ModelSpec, settings: TrainingSettings, inputs: TrainingInputs, placement: Placement = Placement()
) -> TrainingJob:
    """Write ``job_dir/spec.json`` (and the small arrays) for training ``model`` on these inputs."""
    job_dir, root = folders.job_dir, Path(folders.data_root)
    job_dir.mkdir(parents=True, exist_ok=True)
    name = _relative_to(root)
    train, images = inputs.train, inputs.images
    labels = images.manifest["label"].to_numpy(np.int64)
    spec = WorkerSpec(
        data_dir=str(root.resolve()), model=model, settings=settings, num_classes=len(train.class_names),
        train=ArrayRef(_stored_images(train, job_dir / "train_images.npy", name),
                       name(save_npy(job_dir / "train_labels.npy", train.manifest["label"].to_numpy(np.int64)))),
        val=ArrayRef(_stored_images(images, job_dir / "images.npy", name), name(save_npy(job_dir / "val_labels.npy", labels[inputs.val_rows])),
                     rows=name(save_npy(job_dir / "val_rows.npy", np.asarray(inputs.val_rows, np.int64)))),
        augmented=_shard_refs(inputs.shards, name), templates=_templates(inputs.templates, job_dir, name),
        class_weight=inputs.class_weight, checkpoint_dir=name(folders.checkpoint_dir) if folders.checkpoint_dir else None,
        output_dir=name(folders.output_dir), backend=placement.backend, device=placement.device,
        input_workers=placement.input_workers, class_names=tuple(train.class_names),
        augmentation_policies=tuple(sorted(set(inputs.shards.manifest.get("policy", [])))),
        train_groups=name(save_npy(job_dir / "train_groups.npy", _groups(train))),
    )  # fmt: skip
    return TrainingJob(spec=spec, spec_path=spec.save(job_dir / "spec.json"), folders=folders)


def _relative_to(root: Path):  # noqa: ANN202 - a small closure
    """Paths below ``root`` as relative strings (the spec travels to containers that mount it elsewhere)."""
    resolved = root.resolve()

    def name(path: Path) -> str:
        path = Path(path).resolve()
        return str(path.relative_to(resolved)) if path.is_relative_to(resolved) else str(path)

    return name


def _stored_images(image_set: ImageSet, fallback: Path, name) -> str:  # noqa: ANN001
    """The set's stored images file (mapped by the worker), or a copy written to ``fallback``."""
    if image_set.stored_images is not None:
        return name(image_set.stored_images)
    return name(save_npy(fallback, np.asarray(image_set.images)))


def _shard_refs(shards: ShardSet, name) -> tuple[ArrayRef, ...]:  # noqa: ANN001
    return tuple(ArrayRef(name(Path(shards.directory) / row["file"]), name(Path(shards.directory) / row["labels_file"]))
                 for _, row in shards.manifest.iterrows())  # fmt: skip


def _templates(templates: np.ndarray | None, job_dir: Path, name) -> str | None:  # noqa: ANN001
    if templates is None or not len(templates):
        return None
    return name(save_npy(job_dir / "templates.npy", np.asarray(templates)))


def _groups(train: ImageSet) -> np.ndarray:
    """The source image of each training row (its clean_images row; a SMOTE sample is its own group)."""
    rows = np.arange(len(train.manifest))
    if "clean_index" not in train.manifest:
        return rows
    source = train.manifest["clean_index"].to_numpy(np.int64)
    return np.where(source >= 0, source, -1 - rows)


def _what_happened(model: str, error: BaseException, code: int | None, launcher: str) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        what = f"the training worker of {model} was killed by {name}"
        return what + (" (out of memory, or killed by hand or by the scheduler)" if -code == signal.SIGKILL else "")
    if code == EXIT_CANNOT_START:
        return f"the training worker of {model} could not start"
    text = str(error).strip()
    return f"the training worker of {model} failed ({launcher}: {text.splitlines()[0] if text else type(error).__name__})"


def _exit_code(text: str) -> int | None:
    match = re.search(r"code (-?\d+)", text)
    return int(match.group(1)) if match else None
