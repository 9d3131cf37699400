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

Without either, training is :func:`bc_pipeline.training.worker.fit.train_classifier` as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.folds import fold_assignment
from bc_pipeline.models.inference import predict_proba
from bc_pipeline.models.zoo import ModelSpec
from bc_pipeline.training.model_folder import EpochSelection
from bc_pipeline.training.settings import Phase, TrainingSettings
from bc_pipeline.training.worker.data import select_rows
from bc_pipeline.training.worker.fit import Fitted, RunOptions, TrainingData, default_phases, train_classifier


def epochs_to_best(history: pd.DataFrame) -> list[int]:
    """Per phase: how many epochs it took to reach that phase's lowest validation loss."""
    counts = []
    for _, phase in history.groupby("phase", sort=True):
        counts.append(int(np.argmin(phase["val_loss"].to_numpy())) + 1)
    return counts


def fixed_schedule(phases: Sequence[Phase], counts: Sequence[int]) -> tuple[Phase, ...]:
    """The same phases run for exactly ``counts`` epochs each, keeping their last weights."""
    return tuple(replace(p, epochs=int(n), patience=int(n) + 1, restore_best=False) for p, n in zip(phases, counts))


@dataclass(frozen=True)
class _EpochChoice:
    """Each phase's epoch count, how it was found, and predictions of models on images they never trained on."""

    counts: list[int]
    folds: list[dict[str, Any]]  # per fold: its number, rows held out, epochs to best, best val accuracy
    held_proba: np.ndarray
    held_labels: np.ndarray


def train_with_epoch_selection(
    data: TrainingData, spec: ModelSpec, settings: TrainingSettings, options: RunOptions = RunOptions(),
    *, groups: np.ndarray | None = None,
) -> Fitted:  # fmt: skip
    """Train as the settings' epoch selection says (see the module docstring).

    ``groups`` names each training row's source image (None: every row its own), so that a fold
    holds out whole images. The selection runs neither report progress nor, without folds, keep
    checkpoints; the final run does both, as ``options`` say.
    """
    if settings.cv_folds < 2 and not settings.retrain_on_validation:
        return train_classifier(data, spec, settings, options)
    plain = _early_stopped(spec, settings)
    if settings.cv_folds >= 2:
        choice = _cross_validate(data, spec, settings, options, groups)
    else:
        options.log("choosing the epoch count: one run with early stopping on the validation split")
        first = train_classifier(data, spec, plain, replace(options, checkpoint_dir=None, events=None))
        choice = _EpochChoice(epochs_to_best(first.history), [], predict_proba(first.model, data.val_images),
                              np.asarray(data.val_labels))  # fmt: skip
    fixed = replace(plain, phases=fixed_schedule(plain.phases, choice.counts))
    median = f" (median over {len(choice.folds)} folds)" if choice.folds else ""
    options.log(f"epoch counts per phase: {choice.counts}{median}")
    if settings.retrain_on_validation:
        options.log(f"retraining on train + validation ({len(data.train_labels)} + {len(data.val_labels)} images) "
                    f"for {sum(choice.counts)} epochs")  # fmt: skip
        # The stored copies are of the training rows only: they stay in the pool, the validation
        # images join it as originals.
        data = replace(data, train_images=np.concatenate([np.asarray(data.train_images), np.asarray(data.val_images)]),
                       train_labels=np.concatenate([np.asarray(data.train_labels), np.asarray(data.val_labels)]))  # fmt: skip
    return _with_selection(train_classifier(data, spec, fixed, options), settings, choice)


def _cross_validate(
    data: TrainingData, spec: ModelSpec, settings: TrainingSettings, options: RunOptions, groups: np.ndarray | None
) -> _EpochChoice:
    """Train each fold early-stopped on its held-out originals; a phase's count is the folds' median epochs to best."""
    plain = _early_stopped(spec, settings)
    groups = np.arange(len(data.train_labels)) if groups is None else np.asarray(groups)
    assignment = fold_assignment(data.train_labels, groups, settings.cv_folds, seed=settings.seed)
    folds: list[dict[str, Any]] = []
    held_proba, held_labels = [], []
    for fold in range(settings.cv_folds):
        held, kept = np.flatnonzero(assignment == fold), np.flatnonzero(assignment != fold)
        held_x, held_y, _ = select_rows(data.train_images, data.train_labels, (), held)
        kept_x, kept_y, kept_aug = select_rows(data.train_images, data.train_labels, data.augmented, kept)
        options.log(f"cross-validation fold {fold + 1}/{settings.cv_folds}: {len(kept)} training rows, {len(held)} held out")
        fold_data = replace(data, train_images=kept_x, train_labels=kept_y, val_images=held_x, val_labels=held_y,
                            augmented=kept_aug)  # fmt: skip
        result = train_classifier(fold_data, spec, plain, _fold_options(options, fold))
        held_proba.append(predict_proba(result.model, held_x))
        held_labels.append(held_y)
        folds.append({"fold": fold + 1, "held_out": len(held), "epochs_to_best": epochs_to_best(result.history),
                      "best_val_accuracy": float(result.history["val_accuracy"].max())})  # fmt: skip
    counts = [max(1, int(np.round(np.median([f["epochs_to_best"][i] for f in folds])))) for i in range(len(plain.phases))]
    return _EpochChoice(counts, folds, np.concatenate(held_proba), np.concatenate(held_labels))


def _early_stopped(spec: ModelSpec, settings: TrainingSettings) -> TrainingSettings:
    """The settings' schedule spelled out, trained plainly: early stopping on validation, no epoch selection."""
    return replace(settings, phases=default_phases(spec, settings), cv_folds=0, retrain_on_validation=False)


def _fold_options(options: RunOptions, fold: int) -> RunOptions:
    """A fold's run: its own checkpoint subfolder, log lines prefixed ``[fold n]``, its events as log lines."""
    return replace(
        options, checkpoint_dir=options.checkpoint_dir / f"fold-{fold + 1}" if options.checkpoint_dir else None,
        log=lambda line: options.log(f"[fold {fold + 1}] {line}"), events=None,
    )  # fmt: skip


def _with_selection(final: Fitted, settings: TrainingSettings, choice: _EpochChoice) -> Fitted:
    """The final run with how its epochs were chosen, calibrated on held-out predictions if validation was trained on."""
    selection = EpochSelection(
        method=f"{settings.cv_folds}-fold cross-validation" if choice.folds else "early stopping on validation",
        epochs_per_phase=tuple(choice.counts), folds=tuple(choice.folds), retrained_on_validation=settings.retrain_on_validation,
    )  # fmt: skip
    facts = replace(final.facts, best_epoch=int(final.history["epoch"].max()), epoch_selection=selection)  # the last weights are kept
    if not settings.retrain_on_validation:
        return replace(final, facts=facts)
    # The validation split is training data now: calibrate on held-out predictions instead.
    from bc_pipeline.models.calibration import fit_temperature

    source = "out-of-fold predictions" if choice.folds else "the early-stopped run's validation predictions"
    return replace(final, facts=facts, temperature=round(fit_temperature(choice.held_proba, choice.held_labels), 6),
                   temperature_source=source)  # fmt: skip
