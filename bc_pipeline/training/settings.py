"""The one schema of a training run: :class:`TrainingSettings` and its :class:`Phase` items.

Each field declares its type, default, bounds and description here, once. The worker reads these
dataclasses from its spec; the Dagster asset's ``TrainingConfig`` is derived from them
(``dagster_utils.versions.config_from_dataclass``), so the launchpad shows the same fields,
defaults, bounds and descriptions. Bounds and descriptions live in each field's ``metadata``
(plain dicts: the worker needs no pydantic and no Dagster).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LrSchedule = Literal["plateau", "constant", "exponential", "cyclical", "cosine"]
Optimizer = Literal["adam", "adamw", "lion"]
Loss = Literal["categorical_crossentropy", "focal"]
BatchAugment = Literal["none", "mixup", "cutmix", "mixup+cutmix"]
Switch = Literal["auto", "on", "off"]
ConsistencyLoss = Literal["none", "jsd"]


def _setting(default, description: str = "", **bounds):  # noqa: ANN001, ANN202 - a dataclass field
    """A field with its default, and its description and bounds (ge, gt, le, lt) as metadata."""
    return field(default=default, metadata={**({"description": description} if description else {}), **bounds})


@dataclass(frozen=True)
class Phase:
    """One stage of a training schedule.

    ``trainable``: ``frozen`` (only the head trains), ``last:N`` or ``last:N%`` (the head and the
    backbone's last N layers, or that share of them) or ``all``. Each phase starts a fresh
    optimizer at ``learning_rate`` and restores its best weights (lowest validation loss) when it
    ends, after ``epochs`` or after ``patience`` epochs without improvement.
    """

    trainable: str = _setting("all", "frozen | last:N | last:N% | all (backbone layers that train).")
    learning_rate: float = _setting(1e-3, gt=0)
    epochs: int = _setting(13, ge=1)
    patience: int = _setting(4, "Early-stopping patience within the phase.", ge=1)
    # False: run exactly ``epochs`` and keep the last weights (a count chosen beforehand, for a
    # retraining whose validation images are training images too).
    restore_best: bool = _setting(True, "End on the phase's best validation loss (off: the last epoch).")


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that decides a training run.

    Without ``phases`` the schedule is ``training.worker.fit.default_phases``: one phase of ``epochs``
    at ``learning_rate`` from scratch, or frozen / last 30% / all with the rate divided by ten at
    each step for a pretrained backbone (the reports' fine-tuning recipe). The defaults fit a 2-core
    CPU training from scratch.
    """

    epochs: int = _setting(13, "Epochs of the default schedule.", ge=1)
    batch_size: int = _setting(64, ge=1)
    learning_rate: float = _setting(1e-3, "Rate of the default schedule.", gt=0)
    patience: int = _setting(4, "Early-stopping patience (epochs).", ge=1)
    phases: tuple[Phase, ...] = _setting(
        (), "Explicit schedule; empty: one phase from scratch, frozen/last 30%/all when pretrained."
    )
    # plateau (halve on a validation plateau) | constant | exponential (per epoch, within each
    # phase) | cyclical (triangular, per batch, between min_factor x rate and the phase's rate) |
    # cosine (per batch, from the phase's rate to zero at the phase's last epoch).
    lr_schedule: LrSchedule = _setting("plateau")
    lr_decay: float = _setting(0.85, "Per-epoch factor (exponential).", gt=0, le=1)
    cycle_epochs: int = _setting(4, "Epochs per cycle (cyclical).", ge=1)
    cycle_min_factor: float = _setting(0.1, gt=0, le=1)
    optimizer: Optimizer = _setting("adam")
    weight_decay: float = _setting(1e-4, "AdamW and Lion only.", ge=0)
    loss: Loss = _setting("categorical_crossentropy")
    focal_gamma: float = _setting(2.0, ge=0)
    focal_alpha: float = _setting(1.0, gt=0)
    label_smoothing: float = _setting(0.0, ge=0, lt=1)
    augment: bool = _setting(True, "Random flips and 90-degree turns.")
    seed: int = _setting(0)
    batch_augment: BatchAugment = _setting("none", "MixUp / CutMix in the input pipeline (labels mixed too).")
    batch_augment_probability: float = _setting(0.5, ge=0, le=1)
    include_original: bool = _setting(True, "Draw from the balanced set itself as well as from its stored augmented copies.")
    template_augmentation: bool = _setting(
        False, "Superimpose a recovered noise template on training images with a random weight."
    )
    template_probability: float = _setting(0.5, ge=0, le=1)
    template_max_weight: float = _setting(0.5, ge=0, lt=1)
    # jit_compile auto: XLA on JAX, off on TensorFlow (no XLA kernel for the antialiased resize) and PyTorch.
    mixed_precision: Switch = _setting("auto", "auto: bfloat16 (float16 before Ampere) on a GPU only.")
    jit_compile: Switch = _setting("auto", "auto: XLA on JAX (GPU and CPU); off on TensorFlow and PyTorch.")
    cv_folds: int = _setting(
        0, "k >= 2: k-fold cross-validation on the training set chooses each phase's epoch count (0: early stopping).",
        ge=0, le=20,
    )  # fmt: skip
    retrain_on_validation: bool = _setting(
        False, "Train the final model on train + validation for the chosen epoch count (the test split stays untouched)."
    )
    consistency_loss: ConsistencyLoss = _setting(
        "none", "jsd: AugMix's Jensen-Shannon consistency between each image and two of its stored copies "
        "(needs copies >= 2; 3x the compute per step).",
    )  # fmt: skip
    consistency_weight: float = _setting(12.0, "The JS term's weight (AugMix: 12).", ge=0)
