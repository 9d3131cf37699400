"""The one schema of a training run: :class:`TrainingSettings` and its :class:`Phase` items.

Each field declares its type, default, bounds and description here, once (``core.settings.declare``).
The worker reads these dataclasses from its spec; the Dagster asset's ``TrainingConfig``
(``defs/assets/training.py``) declares the same fields by name and takes their defaults, bounds
and descriptions from here, so the launchpad shows what this module says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bc_pipeline.core.settings import declare

LrSchedule = Literal["plateau", "constant", "exponential", "cyclical", "cosine"]
Optimizer = Literal["adam", "adamw", "lion"]
Loss = Literal["categorical_crossentropy", "focal"]
BatchAugment = Literal["none", "mixup", "cutmix", "mixup+cutmix"]
Switch = Literal["auto", "on", "off"]
ConsistencyLoss = Literal["none", "jsd"]
Selection = Literal["clean", "lab_shifts"]


@dataclass(frozen=True)
class Phase:
    """One stage of a training schedule.

    ``trainable``: ``frozen`` (only the head trains), ``last:N`` or ``last:N%`` (the head and the
    backbone's last N layers, or that share of them) or ``all``. Each phase starts a fresh
    optimizer at ``learning_rate`` and restores its best weights (lowest validation loss) when it
    ends, after ``epochs`` or after ``patience`` epochs without improvement.
    """

    trainable: str = declare("all", "frozen | last:N | last:N% | all (backbone layers that train).")
    learning_rate: float = declare(1e-3, gt=0)
    epochs: int = declare(13, ge=1)
    patience: int = declare(4, "Early-stopping patience within the phase.", ge=1)
    # False: run exactly ``epochs`` and keep the last weights (a count chosen beforehand, for a
    # retraining whose validation images are training images too).
    restore_best: bool = declare(True, "End on the phase's best validation loss (off: the last epoch).")


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that decides a training run.

    Without ``phases`` the schedule is ``training.worker.fit.default_phases``: one phase of ``epochs``
    at ``learning_rate`` from scratch, or frozen / last 30% / all with the rate divided by ten at
    each step for a pretrained backbone (the reports' fine-tuning recipe). The defaults fit a 2-core
    CPU training from scratch.
    """

    epochs: int = declare(13, "Epochs of the default schedule.", ge=1)
    batch_size: int = declare(64, ge=1)
    learning_rate: float = declare(1e-3, "Rate of the default schedule.", gt=0)
    patience: int = declare(4, "Early-stopping patience (epochs).", ge=1)
    phases: tuple[Phase, ...] = declare(
        (), "Explicit schedule; empty: one phase from scratch, frozen/last 30%/all when pretrained."
    )
    # plateau (halve on a validation plateau) | constant | exponential (per epoch, within each
    # phase) | cyclical (triangular, per batch, between min_factor x rate and the phase's rate) |
    # cosine (per batch, from the phase's rate to zero at the phase's last epoch).
    lr_schedule: LrSchedule = declare("plateau")
    lr_decay: float = declare(0.85, "Per-epoch factor (exponential).", gt=0, le=1)
    cycle_epochs: int = declare(4, "Epochs per cycle (cyclical).", ge=1)
    cycle_min_factor: float = declare(0.1, gt=0, le=1)
    optimizer: Optimizer = declare("adam")
    weight_decay: float = declare(1e-4, "AdamW and Lion only.", ge=0)
    loss: Loss = declare("categorical_crossentropy")
    focal_gamma: float = declare(2.0, ge=0)
    focal_alpha: float = declare(1.0, gt=0)
    label_smoothing: float = declare(0.0, ge=0, lt=1)
    augment: bool = declare(True, "Random flips and 90-degree turns.")
    seed: int = declare(0)
    batch_augment: BatchAugment = declare("none", "MixUp / CutMix in the input pipeline (labels mixed too).")
    batch_augment_probability: float = declare(0.5, ge=0, le=1)
    include_original: bool = declare(True, "Draw from the balanced set itself as well as from its stored augmented copies.")
    template_augmentation: bool = declare(
        False, "Superimpose a recovered noise template on training images with a random weight."
    )
    template_probability: float = declare(0.5, ge=0, le=1)
    template_max_weight: float = declare(0.5, ge=0, lt=1)
    # jit_compile auto: XLA on JAX, off on TensorFlow (no XLA kernel for the antialiased resize) and PyTorch.
    mixed_precision: Switch = declare("auto", "auto: bfloat16 (float16 before Ampere) on a GPU only.")
    jit_compile: Switch = declare("auto", "auto: XLA on JAX (GPU and CPU); off on TensorFlow and PyTorch.")
    cv_folds: int = declare(
        0, "k >= 2: k-fold cross-validation on the training set chooses each phase's epoch count (0: early stopping).",
        ge=0, le=20,
    )  # fmt: skip
    retrain_on_validation: bool = declare(
        False, "Train the final model on train + validation for the chosen epoch count (the test split stays untouched)."
    )
    consistency_loss: ConsistencyLoss = declare(
        "none", "jsd: AugMix's Jensen-Shannon consistency between each image and two of its stored copies "
        "(needs copies >= 2; 3x the compute per step).",
    )  # fmt: skip
    consistency_weight: float = declare(12.0, "The JS term's weight (AugMix: 12).", ge=0)
    # lab_shifts: the images validated on are built by the trained_model asset (evaluation.lab_shift,
    # a stage above training); the worker only sees a larger validation set. Refused with k-fold
    # selection and with a retrain on validation: the folds never see the copies, and a retrain
    # would train on them.
    selection: Selection = declare(
        "clean", "lab_shifts: early stopping and each phase's best epoch judged on the validation split plus copies of "
        "it under the lab-like shifts (model selection for another lab; the shifts then count as seen in the report).",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.selection not in ("clean", "lab_shifts"):
            raise ValueError(f"unknown selection {self.selection!r} (clean or lab_shifts)")
        if self.selection == "lab_shifts" and (self.cv_folds >= 2 or self.retrain_on_validation):
            raise ValueError("selection lab_shifts judges epochs on the validation split and its shifted copies: "
                             "it cannot be combined with cv_folds >= 2 or retrain_on_validation")  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TrainingSettings:
        """The settings written as JSON (a spec, a model record): ``phases`` back to :class:`Phase` items."""
        return cls(**{**raw, "phases": tuple(Phase(**phase) for phase in raw.get("phases", ()))})
