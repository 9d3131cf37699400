"""Adapt a trained model to a lab with a few of its labelled cells: :func:`adapt` (its accuracy curve:
``evaluation.external.adaptation_curve``).

A model trained on one lab's smears can fall to chance on another's (docs/domain_shift.md). A
handful of labelled cells of the new lab fixes most of it (Chossegros et al., 2024: > 80 % with
<= 100 target images): the whole network is fine-tuned at a low rate, BatchNorm kept in inference
mode (zoo.py: the pretrained statistics, not those of a 16-cell batch), on the few cells and on
``stain`` and ``scale`` copies of them (``augmentation.lab``), flipped and turned on the fly. The
rest of the lab's labelled cells are the evaluation; ``evaluation.external.adaptation_curve``
repeats this for several numbers of cells per class, so a lab sees how many it needs to label.

Keras is imported inside the functions; importing this module is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bc_pipeline.core.settings import declare


@dataclass(frozen=True)
class AdaptationSettings:
    """Which lab a trained model adapts to, with how many labelled cells, and how it is fine-tuned
    (the ``lab_adaptation`` asset's config; :func:`adapt` reads the fine-tuning fields)."""

    lab: str = declare("", "The external set (BC_EXTERNAL_SETS name) of the lab to adapt to; empty: none.")
    per_class: int = declare(10, "Labelled cells per class the adapted model learns from.", ge=1)
    curve: tuple[int, ...] = declare((5, 10, 25, 50), "Cells per class of each point of the accuracy curve.")
    epochs: int = declare(20, "Passes over the labelled cells and their copies.", ge=1)
    learning_rate: float = declare(1e-4, "AdamW rate on a cosine to zero: low, so a few cells do not undo the training.", gt=0)
    batch_size: int = declare(16, ge=1)
    copies: tuple[str, ...] = declare(("stain", "scale", "stain", "scale"), "Image presets, one stored copy of the cells each.")
    label_smoothing: float = declare(0.1, ge=0, lt=1)
    seed: int = declare(0)
    # The lab's cells are zoomed to the scale their own unlabelled images point to before anything
    # else (evaluation.framing): LISC's cells at a third of the frame start at 84 % instead of 7 %.
    framing: str = declare("auto", "auto: the lab's cells zoomed first to the framing they point to; none: as given.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "copies", tuple(self.copies))
        if self.framing not in ("auto", "none"):
            raise ValueError(f"framing must be 'auto' or 'none', got {self.framing!r}")
        object.__setattr__(self, "curve", tuple(self.curve))
        if any(k < 1 for k in self.curve):
            raise ValueError(f"curve points are cells per class, at least 1: got {list(self.curve)}")


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
