"""Stage 4: train each model of the zoo (one partition per model), early-stopped on the validation split."""

import dataclasses
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline import automation
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets import _metadata as md
from bc_pipeline.lib.artifacts import ImageSet, ShardSet
from bc_pipeline.lib.model import weights_fingerprint
from bc_pipeline.lib.training import Phase, TrainedModel, TrainingSettings, train_classifier
from bc_pipeline.lib.zoo import ModelSpec, WeightsUnavailableError, model_spec
from bc_pipeline.partitions import model_partitions
from bc_pipeline.resources import ImageSource, PipelineStorage

_DEFAULTS = TrainingSettings()


class PhaseConfig(dg.Config):
    """One phase of the schedule (see lib.training.Phase)."""

    trainable: str = Field(default="all", description="frozen | last:N | last:N% | all (backbone layers that train).")
    learning_rate: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=5, ge=1)
    patience: int = Field(default=4, ge=1, description="Early-stopping patience within the phase.")


class TrainingConfig(dg.Config):
    """Training settings for every model partition of the run.

    The model itself (backbone, input size, head, weights) comes from the registry entry of the
    partition (lib.zoo.REGISTRY); the fields marked "override" replace the registry's value for
    this run. The defaults fit a 2-core CPU training from scratch.
    """

    image_size: int | None = Field(default=None, ge=32, description="Override: side the model resizes images to.")
    weights: str | None = Field(default=None, description="Override: none | imagenet | path to a no-top weights file.")
    head: str | None = Field(default=None, description="Override: classifier head, gap_dense or inception.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Override: head dropout.")
    frozen_layers: int | None = Field(default=None, ge=0, description="Override: backbone layers frozen in every phase.")
    epochs: int = Field(default=_DEFAULTS.epochs, ge=1, description="Epochs of the default schedule.")
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1)
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, gt=0, description="Rate of the default schedule.")
    patience: int = Field(default=_DEFAULTS.patience, ge=1, description="Early-stopping patience (epochs).")
    phases: list[PhaseConfig] = Field(
        default=[], description="Explicit schedule; empty: one phase from scratch, frozen/last 30%/all when pretrained."
    )
    lr_schedule: Literal["plateau", "constant", "exponential", "cyclical"] = _DEFAULTS.lr_schedule  # type: ignore[assignment]
    lr_decay: float = Field(default=_DEFAULTS.lr_decay, gt=0, le=1, description="Per-epoch factor (exponential).")
    cycle_epochs: int = Field(default=_DEFAULTS.cycle_epochs, ge=1, description="Epochs per cycle (cyclical).")
    cycle_min_factor: float = Field(default=_DEFAULTS.cycle_min_factor, gt=0, le=1)
    optimizer: Literal["adam", "adamw", "lion"] = _DEFAULTS.optimizer  # type: ignore[assignment]
    weight_decay: float = Field(default=_DEFAULTS.weight_decay, ge=0, description="AdamW and Lion only.")
    loss: Literal["categorical_crossentropy", "focal"] = _DEFAULTS.loss  # type: ignore[assignment]
    focal_gamma: float = Field(default=_DEFAULTS.focal_gamma, ge=0)
    focal_alpha: float = Field(default=_DEFAULTS.focal_alpha, gt=0)
    label_smoothing: float = Field(default=_DEFAULTS.label_smoothing, ge=0, lt=1)
    augment: bool = Field(default=_DEFAULTS.augment, description="Random flips and 90-degree turns.")
    seed: int = _DEFAULTS.seed
    batch_augment: Literal["none", "mixup", "cutmix", "mixup+cutmix"] = Field(
        default=_DEFAULTS.batch_augment, description="MixUp / CutMix in the input pipeline (labels mixed too)."
    )
    batch_augment_probability: float = Field(default=_DEFAULTS.batch_augment_probability, ge=0, le=1)
    include_original: bool = Field(
        default=_DEFAULTS.include_original,
        description="Draw from the balanced set itself as well as from its stored augmented copies.",
    )
    template_augmentation: bool = Field(
        default=_DEFAULTS.template_augmentation,
        description="Superimpose a recovered noise template on training images with a random weight.",
    )
    template_probability: float = Field(default=_DEFAULTS.template_probability, ge=0, le=1)
    template_max_weight: float = Field(default=_DEFAULTS.template_max_weight, ge=0, lt=1)
    mixed_precision: Literal["auto", "on", "off"] = Field(default="auto", description="auto: float16 on a GPU only.")
    jit_compile: Literal["auto", "on", "off"] = Field(default="auto", description="auto: XLA on a GPU only.")
    resume: bool = Field(default=True, description="Checkpoint every epoch and resume an interrupted training.")

    def settings(self) -> TrainingSettings:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingSettings) if f.name != "phases"}
        return TrainingSettings(**values, phases=tuple(Phase(**p.model_dump()) for p in self.phases))

    def spec(self, name: str) -> ModelSpec:
        overrides = ("image_size", "weights", "head", "dropout", "frozen_layers")
        return model_spec(name, **{field: getattr(self, field) for field in overrides})


def split_arrays(images: ImageSet, splits: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, in split-table order."""
    rows = splits.loc[splits["split"] == split, "index"].to_numpy()
    return np.asarray(images.images[rows]), images.manifest["label"].to_numpy(np.int64)[rows]


def class_weight_of(balanced: ImageSet) -> dict[int, float] | None:
    """The loss weights the balancing stage chose (None: unweighted)."""
    counts = balanced.tables["class_counts"]
    weights = dict(zip(counts["label"].astype(int), counts["weight"].astype(float)))
    return None if all(w == 1.0 for w in weights.values()) else {c: w for c, w in weights.items() if w > 0}


@dg.asset(
    code_version=with_config("4", TrainingConfig),
    automation_condition=automation.per_model(),
    group_name="training",
    kinds={"tensorflow", "keras"},
    partitions_def=model_partitions,
    pool="gpu",  # one training at a time on the machine's accelerator (see README: GPU pool)
    description="One model of the zoo per partition, trained in phases; saved as .keras with its history.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    balanced_train_set: ImageSet,
    augmented_train_set: ShardSet,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    noise_templates: np.ndarray,
    image_source: ImageSource,
    storage: PipelineStorage,
) -> dg.Output[TrainedModel]:
    name = context.partition_key
    try:
        spec = config.spec(name)
    except (ValueError, KeyError, WeightsUnavailableError) as error:
        raise dg.Failure(description=str(error)) from None
    val_x, val_y = split_arrays(clean_images, data_splits, "val")
    class_names = list(image_source.class_names)
    shards = [augmented_train_set.load(i) for i in range(len(augmented_train_set.manifest))]
    checkpoints = storage.cache_dir() / "checkpoints" / "trained_model" / name if config.resume else None
    try:
        result = train_classifier(
            balanced_train_set.images, balanced_train_set.manifest["label"].to_numpy(np.int64), val_x, val_y,
            num_classes=len(class_names), spec=spec, settings=config.settings(),
            class_weight=class_weight_of(balanced_train_set), augmented=shards, templates=noise_templates,
            checkpoint_dir=checkpoints, log=context.log.info,
        )  # fmt: skip
    except WeightsUnavailableError as error:
        raise dg.Failure(description=str(error)) from None
    result.info["class_names"] = class_names
    result.info["settings"] = dataclasses.asdict(config.settings())
    best = result.history.loc[result.history["epoch"] == result.info["best_epoch"]].iloc[0]
    metadata = {
        "model": name,
        "backbone": spec.backbone,
        "image_size": spec.image_size,
        "weights": spec.weights,
        "device": result.info["device"],
        "parameters": result.info["parameters"],
        "phases": len(result.info["phases"]),
        "epochs_run": result.info["epochs_run"],
        "best_epoch": result.info["best_epoch"],
        "best_val_accuracy": round(float(best["val_accuracy"]), 4),
        "train_seconds": result.info["train_seconds"],
        "resumed_from_epoch": result.info["resumed_from_epoch"],
        "pool_images": result.info["pool_images"],
        "augmented_shards": result.info["augmented_shards"],
        "class_weighted": result.info["class_weight"] is not None,
        "augmentation_templates": result.info["augmentation_templates"],
        "history": md.table(result.history.round(4)),
    }
    version = weights_fingerprint(result.model)
    return dg.Output(result, data_version=dg.DataVersion(version), metadata=metadata)
