"""How many epochs to train, chosen without the test split: k-fold cross-validation, then a retrain.

The seed reports chose the epoch count by k-fold cross-validation (S2, S3) and then retrained on
train + validation for that count (S0, S2), so the final model learns from every labelled image
that is not test. Here:

- ``cv_folds = k``: the balanced training set is dealt into k folds, stratified by class and grouped
  by source image, so an image, its oversampled repeats and its stored augmented copies always
  sit in one fold (a copy of a held-out image in training would flatter the fold). Each fold
  trains with early stopping on its held-out originals; each phase's count is the median, over
  the folds, of the epochs to that phase's best validation loss.
- ``retrain_on_validation``: the final model trains on the training set plus the validation split
  for exactly those counts (from the folds, or from one early-stopped run when ``cv_folds`` is 0),
  keeping the last weights, since no held-out image is left to pick the best ones.

Without either, training is :func:`bc_pipeline.worker.training.train_classifier` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.worker.data import select_rows
from bc_pipeline.worker.training import (
    Phase,
    TrainedModel,
    TrainingSettings,
    default_phases,
    predict_proba,
    train_classifier,
)


def fold_assignment(labels: np.ndarray, groups: np.ndarray, folds: int, *, seed: int) -> np.ndarray:
    """Fold number of every row: whole groups dealt round-robin per class, in a seeded order.

    A group takes the label of its first row (a source image's repeats all share it). Dealing each
    class's groups in turn keeps every fold's class mix within one group of the whole set's.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_fold = np.empty(len(names), np.int64)
    rng = np.random.default_rng(seed)
    start = 0
    for label in np.unique(labels[first]):
        members = rng.permutation(np.flatnonzero(labels[first] == label))
        group_fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next class starts where this one stopped: folds stay even
    return group_fold[inverse]


def epochs_to_best(history: pd.DataFrame) -> list[int]:
    """Per phase: how many epochs it took to reach that phase's lowest validation loss."""
    counts = []
    for _, phase in history.groupby("phase", sort=True):
        counts.append(int(np.argmin(phase["val_loss"].to_numpy())) + 1)
    return counts


def fixed_schedule(phases: Sequence[Phase], counts: Sequence[int]) -> tuple[Phase, ...]:
    """The same phases run for exactly ``counts`` epochs each, keeping their last weights."""
    return tuple(replace(p, epochs=int(n), patience=int(n) + 1, restore_best=False) for p, n in zip(phases, counts))


def train_with_epoch_selection(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    groups: np.ndarray | None,
    settings: TrainingSettings,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    checkpoint_dir: Path | None = None,
    log: Any = print,
    **kwargs: Any,
) -> TrainedModel:
    """Train as the settings' epoch selection says (see the module docstring); ``kwargs`` go to train_classifier."""
    if settings.cv_folds < 2 and not settings.retrain_on_validation:
        return train_classifier(train_images, train_labels, val_images, val_labels, settings=settings,
                                augmented=augmented, checkpoint_dir=checkpoint_dir, log=log, **kwargs)  # fmt: skip
    phases = default_phases(kwargs["spec"], settings)
    plain = replace(settings, phases=phases, cv_folds=0, retrain_on_validation=False)
    folds: list[dict[str, Any]] = []
    held_proba, held_labels = [], []  # predictions on images the predicting model never trained on
    if settings.cv_folds >= 2:
        groups = np.arange(len(train_labels)) if groups is None else np.asarray(groups)
        assignment = fold_assignment(train_labels, groups, settings.cv_folds, seed=settings.seed)
        for fold in range(settings.cv_folds):
            held, kept = np.flatnonzero(assignment == fold), np.flatnonzero(assignment != fold)
            held_x, held_y, _ = select_rows(train_images, train_labels, (), held)
            kept_x, kept_y, kept_aug = select_rows(train_images, train_labels, augmented, kept)
            log(f"cross-validation fold {fold + 1}/{settings.cv_folds}: {len(kept)} training rows, {len(held)} held out")
            result = train_classifier(
                kept_x, kept_y, held_x, held_y, settings=plain, augmented=kept_aug,
                checkpoint_dir=checkpoint_dir / f"fold-{fold + 1}" if checkpoint_dir else None,
                log=lambda line, f=fold: log(f"[fold {f + 1}] {line}"), **{k: v for k, v in kwargs.items() if k != "progress"},
            )  # fmt: skip
            held_proba.append(predict_proba(result.model, held_x))
            held_labels.append(held_y)
            folds.append({"fold": fold + 1, "held_out": len(held), "epochs_to_best": epochs_to_best(result.history),
                          "best_val_accuracy": float(result.history["val_accuracy"].max())})  # fmt: skip
        counts = [max(1, int(np.round(np.median([f["epochs_to_best"][i] for f in folds])))) for i in range(len(phases))]
    else:
        log("choosing the epoch count: one run with early stopping on the validation split")
        first = train_classifier(train_images, train_labels, val_images, val_labels, settings=plain,
                                 augmented=augmented, log=log, **{k: v for k, v in kwargs.items() if k != "progress"})  # fmt: skip
        counts = epochs_to_best(first.history)
        held_proba, held_labels = [predict_proba(first.model, val_images)], [np.asarray(val_labels)]
    fixed = replace(plain, phases=fixed_schedule(phases, counts))
    log(f"epoch counts per phase: {counts}" + (f" (median over {len(folds)} folds)" if folds else ""))
    if settings.retrain_on_validation:
        log(f"retraining on train + validation ({len(train_labels)} + {len(val_labels)} images) for {sum(counts)} epochs")
        train_images = np.concatenate([np.asarray(train_images), np.asarray(val_images)])
        train_labels = np.concatenate([np.asarray(train_labels), np.asarray(val_labels)])
        # The stored copies are of the training rows only: they stay in the pool, the validation
        # images join it as originals.
    final = train_classifier(train_images, train_labels, val_images, val_labels, settings=fixed,
                             augmented=augmented, checkpoint_dir=checkpoint_dir, log=log, **kwargs)  # fmt: skip
    final.info["best_epoch"] = int(final.history["epoch"].max())  # the last weights are kept
    if settings.retrain_on_validation:
        # The validation split is training data now: calibrate on held-out predictions instead.
        from bc_pipeline.lib.calibration import fit_temperature

        final.info["temperature"] = round(fit_temperature(np.concatenate(held_proba), np.concatenate(held_labels)), 6)
        final.info["temperature_source"] = "out-of-fold predictions" if folds else "the early-stopped run's validation predictions"
    final.info["epoch_selection"] = {
        "method": f"{settings.cv_folds}-fold cross-validation" if folds else "early stopping on validation",
        "epochs_per_phase": counts, "folds": folds, "retrained_on_validation": settings.retrain_on_validation,
    }  # fmt: skip
    return final
