"""Adapt a trained model to a lab with a few of its labelled cells: :func:`adapt` and :func:`adaptation_curve`.

A model trained on one lab's smears can fall to chance on another's (docs/domain_shift.md). A
handful of labelled cells of the new lab fixes most of it (Chossegros et al., 2024: > 80 % with
<= 100 target images): the whole network is fine-tuned at a low rate, BatchNorm kept in inference
mode (zoo.py: the pretrained statistics, not those of a 16-cell batch), on the few cells and on
``stain`` and ``scale`` copies of them (``augmentation.lab``), flipped and turned on the fly. The
rest of the lab's labelled cells are the evaluation; :func:`adaptation_curve` repeats this for
several numbers of cells per class, so a lab sees how many it needs to label.

Keras is imported inside the functions; importing this module is free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.settings import declare
from bc_pipeline.evaluation.external import score_external


@dataclass(frozen=True)
class AdaptationSettings:
    """How a trained model is fine-tuned on a few labelled cells of another lab."""

    epochs: int = declare(20, "Passes over the labelled cells and their copies.", ge=1)
    learning_rate: float = declare(1e-4, "AdamW rate on a cosine to zero: low, so a few cells do not undo the training.", gt=0)
    batch_size: int = declare(16, ge=1)
    copies: tuple[str, ...] = declare(("stain", "scale", "stain", "scale"), "Image presets, one stored copy of the cells each.")
    label_smoothing: float = declare(0.1, ge=0, lt=1)
    seed: int = declare(0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "copies", tuple(self.copies))


def few_shot_split(labels: np.ndarray, shots: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labelled rows, evaluation rows): ``shots`` random cells of each class, the rest to evaluate on.

    A class with fewer than ``2 * shots`` cells gives half of them (at least one stays for the
    evaluation), so every class present is both learnt from and scored.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    labelled = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        labelled.append(rows[: min(shots, len(rows) // 2)])
    chosen = np.sort(np.concatenate(labelled)) if labelled else np.zeros(0, np.int64)
    return chosen, np.setdiff1d(np.arange(len(labels)), chosen)


def adapt(model: Any, images: np.ndarray, labels: np.ndarray, settings: AdaptationSettings = AdaptationSettings()) -> Any:
    """``model`` fine-tuned in place on the labelled ``images`` (uint8) of another lab; returns it."""
    import keras

    from bc_pipeline.augmentation.presets import make_augmenter
    from bc_pipeline.models.zoo import set_trainable
    from bc_pipeline.training.worker.data import flip_and_turn

    if len(images) == 0:
        raise ValueError("lab adaptation needs at least one labelled image of the lab")
    keras.utils.set_random_seed(settings.seed)
    pool = np.concatenate([images, *(make_augmenter(p, seed=settings.seed + i)(images) for i, p in enumerate(settings.copies))])
    targets = keras.utils.to_categorical(np.tile(np.asarray(labels), 1 + len(settings.copies)), model.output_shape[-1])
    steps = -(-len(pool) // settings.batch_size)
    if any(layer.name == "backbone" for layer in model.layers):
        set_trainable(model, "all")
    model.compile(
        optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(settings.learning_rate, steps * settings.epochs)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
    )  # fmt: skip
    rng = np.random.default_rng(settings.seed)
    for _ in range(settings.epochs):
        order = rng.permutation(len(pool))
        model.fit(flip_and_turn(pool[order], rng).astype(np.float32), targets[order], batch_size=settings.batch_size, epochs=1, verbose=0)
    return model


def adaptation_curve(
    load_model: Callable[[], Any],
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    shots: Sequence[int] = (5, 10, 25, 50),
    settings: AdaptationSettings = AdaptationSettings(),
    log: Callable[[str], None] = lambda message: None,
) -> pd.DataFrame:
    """Accuracy on the rest of a lab's cells after adapting a fresh copy of the model on ``k`` per class.

    ``load_model`` returns the trained model afresh (each point starts from it). The first row
    (0 cells) is the model as trained. Every point is scored on the same cells, those the largest
    draw leaves out: a smaller draw is a prefix of a larger one (one permutation per class).
    """
    from bc_pipeline.models.inference import predict_proba

    _, rest = few_shot_split(labels, max(shots, default=0), seed=settings.seed)
    rows = []
    for k in [0, *shots]:
        labelled = few_shot_split(labels, k, seed=settings.seed)[0]
        model = load_model()
        if k:
            adapt(model, images[labelled], np.asarray(labels)[labelled], settings)
        score = score_external(np.asarray(labels)[rest], predict_proba(model, images[rest]).argmax(1), class_names)
        rows.append({"per_class": k, "labelled": len(labelled), "evaluated": len(rest),
                     "accuracy": score["accuracy"], "balanced_accuracy": score["balanced_accuracy"]})  # fmt: skip
        log(f"{k} labelled per class ({len(labelled)} cells): accuracy {score['accuracy']:.3f}, "
            f"balanced {score['balanced_accuracy']:.3f} on {len(rest)} others")  # fmt: skip
    return pd.DataFrame(rows)
