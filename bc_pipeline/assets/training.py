"""Stage 4: train the CNN on the train split, early-stopped on the validation split."""

import dataclasses
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline.assets import _metadata as md
from bc_pipeline.lib.artifacts import ImageSet, ShardSet
from bc_pipeline.lib.model import weights_fingerprint
from bc_pipeline.lib.training import TrainedModel, TrainingSettings, train_classifier
from bc_pipeline.resources import ImageSource

_DEFAULTS = TrainingSettings()


class TrainingConfig(dg.Config):
    """Training settings. The defaults fit a 2-core CPU; on a GPU raise image_size to 96."""

    image_size: int = Field(default=_DEFAULTS.image_size, ge=32, description="Side the model resizes images to.")
    epochs: int = Field(default=_DEFAULTS.epochs, ge=1)
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1)
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, gt=0)
    patience: int = Field(default=_DEFAULTS.patience, ge=1, description="Early-stopping patience (epochs).")
    dropout: float = Field(default=_DEFAULTS.dropout, ge=0, lt=1)
    convs_per_block: int = Field(default=_DEFAULTS.convs_per_block, ge=1, le=3)
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

    def settings(self) -> TrainingSettings:
        return TrainingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingSettings)})


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
    code_version="3",
    group_name="training",
    kinds={"tensorflow", "keras"},
    description="The from-scratch CNN (32-64-128-256-512 conv blocks), saved as .keras with its history.",
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
) -> dg.Output[TrainedModel]:
    val_x, val_y = split_arrays(clean_images, data_splits, "val")
    class_names = list(image_source.class_names)
    shards = [augmented_train_set.load(i) for i in range(len(augmented_train_set.manifest))]
    result = train_classifier(
        balanced_train_set.images, balanced_train_set.manifest["label"].to_numpy(np.int64), val_x, val_y,
        num_classes=len(class_names), settings=config.settings(),
        class_weight=class_weight_of(balanced_train_set), augmented=shards, templates=noise_templates,
        log=context.log.info,
    )  # fmt: skip
    result.info["class_names"] = class_names
    result.info["settings"] = dataclasses.asdict(config.settings())
    best = result.history.loc[result.history["val_loss"].idxmin()]
    metadata = {
        "device": result.info["device"],
        "parameters": result.info["parameters"],
        "epochs_run": result.info["epochs_run"],
        "best_epoch": result.info["best_epoch"],
        "best_val_accuracy": round(float(best["val_accuracy"]), 4),
        "train_seconds": result.info["train_seconds"],
        "pool_images": result.info["pool_images"],
        "augmented_shards": result.info["augmented_shards"],
        "class_weighted": result.info["class_weight"] is not None,
        "augmentation_templates": result.info["augmentation_templates"],
        "history": md.table(result.history.round(4)),
    }
    version = weights_fingerprint(result.model)
    return dg.Output(result, data_version=dg.DataVersion(version), metadata=metadata)

