"""A trained model on disk, and the one typed record that describes it.

A model folder holds ``model.keras`` (the network), ``history.parquet`` (one row per epoch) and
``info.json``: a :class:`ModelRecord`, versioned. This module is the only place that writes or reads
that record: the training worker writes it (:func:`write_model_folder`), the ``trained_model``
asset records its figures (:func:`record_metadata`), evaluation, the ensemble, the submission and
``bc-predict`` read it (:func:`read_record`, :func:`load_trained_model`).

Why typed: ``info.json`` was a dict of about 17 keys written in three places and read in ten, so a
renamed key failed far from where it was written. A field here is found by an editor, and a file
written by an older version either loads (version 1, the untyped dict, converted key by key) or
fails with a message naming the file, what is missing and what to rematerialize.

Keras is imported only by :func:`load_trained_model` and :func:`write_model_folder`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bc_pipeline.core.artifacts import MODEL_FILE, ArtifactDamagedError, ArtifactNotFoundError, ModelFolder
from bc_pipeline.models.zoo import ModelSpec
from bc_pipeline.training.settings import Phase, TrainingSettings

RECORD_VERSION = 2
HISTORY_FILE, RECORD_FILE = "history.parquet", "info.json"
HISTORY_COLUMNS = ["epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy"]


class ModelRecordError(ValueError):
    """An ``info.json`` that this version cannot read; the message says which file and what to rerun."""


@dataclass(frozen=True)
class EpochSelection:
    """How the epoch count was chosen: k-fold cross-validation or one early-stopped run."""

    method: str
    epochs_per_phase: tuple[int, ...]
    folds: tuple[dict[str, Any], ...] = ()  # per fold: number, rows held out, epochs to best, best val accuracy
    retrained_on_validation: bool = False


@dataclass(frozen=True)
class TrainingFacts:
    """What one training run did and found (the worker fills it in; absent for the ensemble)."""

    spec: ModelSpec
    phases: tuple[Phase, ...]
    device: str
    backend: str
    keras_version: str
    dtype_policy: str
    train_seconds: float
    epochs_run: int
    best_epoch: int
    pool_images: int = 0
    augmented_shards: int = 0
    augmentation_templates: int = 0
    class_weight: dict[int, float] | None = None
    resumed_from_epoch: int | None = None
    worker_seconds: float | None = None
    epoch_selection: EpochSelection | None = None


@dataclass(frozen=True)
class EnsembleFacts:
    """The members of the ensemble partition and the weights each contributed."""

    members: tuple[str, ...]
    member_fingerprints: dict[str, str]
    train_seconds: float  # the members' training time, summed


@dataclass(frozen=True)
class ModelRecord:
    """``info.json`` of a model folder (version :data:`RECORD_VERSION`).

    ``temperature`` calibrates the softmax (None: a model stored before temperatures were; the
    evaluation then fits one). ``settings`` and ``training`` describe a model the worker trained,
    ``ensemble`` the ensemble partition; exactly one of ``training`` and ``ensemble`` is set.
    """

    model_name: str
    class_names: tuple[str, ...]
    weights_fingerprint: str
    parameters: int
    image_size: int
    temperature: float | None = None
    temperature_source: str = "the training worker, on the validation split"
    augmentation_policies: tuple[str, ...] = ()
    settings: TrainingSettings | None = None
    training: TrainingFacts | None = None
    ensemble: EnsembleFacts | None = None

    @property
    def train_seconds(self) -> float | None:
        facts = self.training or self.ensemble
        return facts.train_seconds if facts else None

    @property
    def epochs_run(self) -> int:
        return self.training.epochs_run if self.training else 0

    @property
    def device(self) -> str:
        return self.training.device if self.training else "-"

    def to_json(self) -> dict[str, Any]:
        """The record as ``info.json`` holds it: plain JSON values, the version first."""
        return json.loads(json.dumps({"version": RECORD_VERSION, **asdict(self)}, default=_plain))

    @classmethod
    def from_json(cls, raw: Any, *, where: str = "info.json") -> ModelRecord:
        """The record in ``raw`` (a parsed ``info.json``); version 1 files are converted."""
        if not isinstance(raw, dict):
            raise ModelRecordError(f"{where}: not a model record (a JSON object is expected)")
        version = raw.get("version", 1)
        try:
            if version == 1:
                return _from_version_1(raw)
            if version == RECORD_VERSION:
                return _from_version_2(raw)
        except (KeyError, TypeError, ValueError) as error:
            raise ModelRecordError(
                f"{where}: a version {version} model record that cannot be read ({type(error).__name__}: {error}); "
                "materialize trained_model for this model again to rewrite it"
            ) from None
        raise ModelRecordError(f"{where}: model record version {version!r} is newer than this bc_pipeline reads "
                               f"({RECORD_VERSION}); update bc_pipeline or retrain the model")  # fmt: skip


@dataclass(frozen=True, eq=False)  # eq=False: a Keras model and a frame have no plain equality
class TrainedModel:
    """A fitted Keras model, its per-epoch history and its record (what a model folder holds, loaded)."""

    model: Any
    history: pd.DataFrame
    record: ModelRecord


def write_model_folder(folder: Path, trained: TrainedModel) -> Path:
    """``model.keras``, ``history.parquet`` and ``info.json`` in ``folder``, each written then renamed."""
    from bc_pipeline.core.storage import save_json, save_parquet, save_via_temp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_via_temp(folder / MODEL_FILE, trained.model.save)
    save_parquet(folder / HISTORY_FILE, trained.history)
    save_json(folder / RECORD_FILE, trained.record.to_json())
    return folder


def read_record(folder: Path | ModelFolder) -> ModelRecord:
    """The record of the model folder (without loading Keras)."""
    folder = _directory(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise ArtifactNotFoundError(f"{folder}: {RECORD_FILE} is missing; the training worker did not complete")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactDamagedError(f"{path}: not valid JSON ({error}); materialize trained_model again") from None
    return ModelRecord.from_json(raw, where=str(path))


def read_history(folder: Path | ModelFolder) -> pd.DataFrame:
    """The per-epoch history of the model folder."""
    path = _directory(folder) / HISTORY_FILE
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path} is missing; the training worker did not complete")
    return pd.read_parquet(path)


def load_trained_model(folder: Path | ModelFolder) -> TrainedModel:
    """The model, its history and its record (Keras loads the network, ``compile=False``).

    ``compile=False``: the pipeline only predicts with a stored model, and a model compiled for
    XLA on JAX would otherwise be XLA-compiled here too, where TensorFlow's XLA has no kernel for
    the antialiased resize every zoo model starts with.
    """
    import keras

    folder = _directory(folder)
    record, history = read_record(folder), read_history(folder)
    try:
        model = keras.saving.load_model(folder / MODEL_FILE, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a file it cannot read
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArtifactDamagedError(f"{folder / MODEL_FILE} cannot be read ({type(error).__name__}: {first}); "
                                   "materialize trained_model again to rewrite it") from None  # fmt: skip
    return TrainedModel(model, history, record)


def record_metadata(record: ModelRecord, history: pd.DataFrame) -> dict[str, Any]:
    """The facts of a training run shown on the ``trained_model`` asset page (the history table is added there)."""
    facts = record.training
    if facts is None:
        raise ValueError(f"{record.model_name}: not trained by the worker (an ensemble has no training facts)")
    best = history.loc[history["epoch"] == facts.best_epoch].iloc[0]
    spec = facts.spec
    return {
        "model": spec.name, "backbone": spec.backbone, "image_size": spec.image_size, "weights": spec.weights,
        "input_norm": spec.input_norm, "norm": spec.norm,
        "backend": facts.backend, "device": facts.device, "dtype_policy": facts.dtype_policy,
        "parameters": record.parameters, "epochs_run": facts.epochs_run, "best_epoch": facts.best_epoch,
        "train_seconds": facts.train_seconds, "worker_seconds": facts.worker_seconds,
        "resumed_from_epoch": facts.resumed_from_epoch, "pool_images": facts.pool_images,
        "augmented_shards": facts.augmented_shards, "augmentation_templates": facts.augmentation_templates,
        "phases": len(facts.phases), "best_val_accuracy": round(float(best["val_accuracy"]), 4),
        "class_weighted": facts.class_weight is not None,
    }  # fmt: skip


def _directory(folder: Path | ModelFolder) -> Path:
    return Path(folder.directory if isinstance(folder, ModelFolder) else folder)


def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: numpy scalars and paths."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- reading the versions --------------------------------------------------------------------


def _from_version_2(raw: dict[str, Any]) -> ModelRecord:
    training, ensemble, settings = raw.get("training"), raw.get("ensemble"), raw.get("settings")
    return ModelRecord(
        model_name=raw["model_name"], class_names=tuple(raw["class_names"]), weights_fingerprint=raw["weights_fingerprint"],
        parameters=int(raw["parameters"]), image_size=int(raw["image_size"]), temperature=_optional_float(raw.get("temperature")),
        temperature_source=raw.get("temperature_source") or ModelRecord.temperature_source,
        augmentation_policies=tuple(raw.get("augmentation_policies") or ()),
        settings=None if settings is None else TrainingSettings.from_json(settings),
        training=None if training is None else _training_facts(training),
        ensemble=None if ensemble is None else EnsembleFacts(tuple(ensemble["members"]), dict(ensemble["member_fingerprints"]),
                                                           float(ensemble["train_seconds"])),
    )  # fmt: skip


def _training_facts(raw: dict[str, Any]) -> TrainingFacts:
    selection = raw.get("epoch_selection")
    values = {f.name: raw[f.name] for f in dataclasses.fields(TrainingFacts) if f.name in raw}
    weights = raw.get("class_weight")
    return TrainingFacts(**{
        **values, "spec": ModelSpec(**raw["spec"]), "phases": tuple(Phase(**p) for p in raw["phases"]),
        "class_weight": None if weights is None else {int(k): float(v) for k, v in weights.items()},
        "epoch_selection": None if selection is None else EpochSelection(
            selection["method"], tuple(selection["epochs_per_phase"]), tuple(selection.get("folds") or ()),
            bool(selection.get("retrained_on_validation")),
        ),
    })  # fmt: skip


def _from_version_1(raw: dict[str, Any]) -> ModelRecord:
    """An ``info.json`` of bc_pipeline before the record was typed: one flat dict, the same facts."""
    missing = [key for key in ("class_names", "weights_fingerprint", "parameters") if key not in raw]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)}")
    spec = raw.get("spec") or {}
    common = {"model_name": raw.get("model_name") or spec.get("name", "model"), "class_names": raw["class_names"],
              "weights_fingerprint": raw["weights_fingerprint"], "parameters": raw["parameters"],
              "image_size": spec.get("image_size", 0), "temperature": raw.get("temperature"),
              "temperature_source": raw.get("temperature_source"), "augmentation_policies": raw.get("augmentation_policies"),
              "settings": raw.get("settings")}  # fmt: skip
    if "members" in raw:  # the ensemble partition
        train_seconds = raw.get("train_seconds") or 0.0
        return _from_version_2({**common, "ensemble": {"members": raw["members"], "train_seconds": train_seconds,
                                                       "member_fingerprints": raw.get("member_fingerprints") or {}}})  # fmt: skip
    if "backbone" not in spec or "epochs_run" not in raw:  # no training facts were recorded: the record only
        return _from_version_2(common)
    selection = raw.get("epoch_selection")
    training = {key: raw.get(key) for key in (f.name for f in dataclasses.fields(TrainingFacts)) if key in raw}
    if selection is not None:
        training["epoch_selection"] = {**selection, "epochs_per_phase": selection.get("epochs_per_phase", [])}
    return _from_version_2({**common, "training": {**training, "spec": spec, "phases": raw.get("phases", [])}})


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
