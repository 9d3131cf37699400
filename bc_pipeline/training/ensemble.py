"""An ensemble of trained models as one Keras model: the average of their class probabilities.

Averaging the probabilities of models that err differently (other architectures, sizes, seeds or
augmentations) removes part of each one's error and is one of the most reliable ways to gain both
accuracy and robustness to corruptions. The ensemble is a plain functional model whose members are
nested whole, so a saved ``.keras`` file classifies raw images anywhere Keras runs, exactly like a
single zoo model: the evaluation, TTA, Grad-CAM (averaged over the members), the leaderboard, the
submission and ``bc-predict`` treat it as any model. Keras is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bc_pipeline.models.zoo import ENSEMBLE
from bc_pipeline.training.model_folder import HISTORY_COLUMNS, EnsembleFacts, ModelRecord, TrainedModel, load_trained_model

MEMBER_PREFIX = "member_"


class EnsembleError(ValueError):
    """The ensemble cannot be built from what is trained."""


def choose_members(requested: Sequence[str], trained: Sequence[str]) -> list[str]:
    """The member models: those requested (each must be trained), or else every trained model but the ensemble."""
    available = [name for name in trained if name != ENSEMBLE]
    if requested:
        missing = [name for name in requested if name not in available]
        if missing:
            raise EnsembleError(f"ensemble members {', '.join(missing)} are not trained; trained: {', '.join(available) or 'none'}")
        members = list(dict.fromkeys(requested))
    else:
        members = available
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 trained models, found {', '.join(members) or 'none'}: "
                            "materialize trained_model for more partitions first")  # fmt: skip
    return members


def build_ensemble(members: Mapping[str, Any]) -> Any:
    """One model whose output is the mean of the members' probabilities, for any input size."""
    import keras

    outputs = set(m.output_shape[-1] for m in members.values())
    if len(outputs) != 1:
        raise EnsembleError(f"members disagree on the number of classes: {sorted(outputs)}")
    inputs = keras.Input(shape=(None, None, 3), name="image")
    probabilities = []
    for name, model in members.items():
        nested = keras.Model(model.input, model.output, name=f"{MEMBER_PREFIX}{name}")  # unique name per member
        probabilities.append(nested(inputs))
    # float32 whatever the members' precision: the layer casts its inputs to its own dtype.
    average = keras.layers.Average(name="probabilities", dtype="float32")(probabilities)
    return keras.Model(inputs, average, name=ENSEMBLE)


def ensemble_members(model: Any) -> list[Any]:
    """The nested member models of an ensemble built here (empty for any other model)."""
    return [layer for layer in getattr(model, "layers", []) if layer.name.startswith(MEMBER_PREFIX)]


def assemble_ensemble(model_dir: Path, requested: Sequence[str], val_images: np.ndarray, val_labels: np.ndarray) -> TrainedModel:
    """The ensemble of the stored trained models under ``model_dir`` (one folder per partition), calibrated.

    No training history; its record names the members, their weights' fingerprints and the
    temperature fitted on the validation split.
    """
    import pandas as pd

    from bc_pipeline.core.artifacts import artifact_exists
    from bc_pipeline.models.calibration import fit_temperature
    from bc_pipeline.models.inference import predict_proba, weights_fingerprint
    from bc_pipeline.models.zoo import REGISTRY

    model_dir = Path(model_dir)
    names = choose_members(requested, [name for name in REGISTRY if artifact_exists(model_dir / name)])
    loaded = {name: load_trained_model(model_dir / name) for name in names}
    class_names = {m.record.class_names for m in loaded.values()}
    if len(class_names) != 1:
        raise EnsembleError(f"ensemble members were trained on different classes: {sorted(class_names)}")
    model = build_ensemble({name: m.model for name, m in loaded.items()})
    temperature = fit_temperature(predict_proba(model, val_images), np.asarray(val_labels))
    records = [m.record for m in loaded.values()]
    record = ModelRecord(
        model_name=ENSEMBLE, class_names=class_names.pop(), weights_fingerprint=weights_fingerprint(model),
        parameters=int(model.count_params()), image_size=max(r.image_size for r in records), temperature=round(temperature, 6),
        temperature_source="the ensemble's validation predictions",
        augmentation_policies=tuple(sorted({p for r in records for p in r.augmentation_policies})),
        ensemble=EnsembleFacts(members=tuple(names), member_fingerprints={n: m.record.weights_fingerprint for n, m in loaded.items()},
                               train_seconds=round(sum(r.train_seconds or 0.0 for r in records), 1)),
    )  # fmt: skip
    return TrainedModel(model, pd.DataFrame(columns=HISTORY_COLUMNS), record)
