"""Stage 4a: the balanced training set (class weights, augmented oversampling or SMOTE)."""

from dataclasses import asdict

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import image_rows
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.preparation.balancing import CLASS_COUNTS, BalanceSettings, Strategy, balance
from bc_pipeline.preparation.splits import split_arrays, split_rows


class BalanceConfig(SettingsConfig):
    """How the training split is balanced (preparation.balancing.BalanceSettings). Validation and test keep the natural mix."""

    settings_class = BalanceSettings
    strategy: Strategy = setting(BalanceSettings, "strategy")
    target_ratio: float = setting(BalanceSettings, "target_ratio")
    smote_neighbors: int = setting(BalanceSettings, "smote_neighbors")
    seed: int = setting(BalanceSettings, "seed")


@dg.asset(
    code_version=with_config("2", BalanceConfig),
    group_name="balancing",
    kinds={"numpy", "parquet"},
    description="The training split, balanced by the configured strategy, with the class weights training uses.",
)
def balanced_train_set(
    context: dg.AssetExecutionContext,
    config: BalanceConfig,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[ImageSet]:
    class_names = list(clean_images.class_names)
    images, labels = split_arrays(clean_images, data_splits, "train")
    result = balance(images, labels, num_classes=len(class_names), **asdict(config.settings()), log=context.log.info)
    value = result.image_set(split_rows(data_splits, "train"), class_names)
    manifest, counts = value.manifest, value.tables[CLASS_COUNTS]
    context.log.info(f"{config.strategy}: {len(labels)} -> {len(result.labels)} training images")
    metadata = {
        "strategy": config.strategy,
        "images_before": len(labels),
        "images_after": len(result.labels),
        CLASS_COUNTS: md.table(counts),
        "class_weights": dg.MetadataValue.json(
            {class_names[c]: round(w, 4) for c, w in (result.class_weight or {}).items()}
        ),
    }
    added = np.nonzero(result.origin != "real")[0]
    if len(added):
        grid = _added_samples_grid(result.images, result.labels, added, class_names, seed=config.seed)
        folder = storage.report_dir("balanced_train_set")
        metadata.update(md.image(grid, folder / "added_samples.png", "added_samples"))
    return versioned(value, result.images, manifest, counts, metadata=metadata)


def _added_samples_grid(
    images: np.ndarray, labels: np.ndarray, added: np.ndarray, class_names: list[str], *, seed: int
) -> bytes:
    """Eight of the added (synthetic or repeated) images of each class that received any."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, name in enumerate(class_names):
        members = added[labels[added] == label]
        if len(members):
            chosen = np.sort(rng.choice(members, size=min(8, len(members)), replace=False))
            rows.append((f"{name} (+{len(members)})", images[chosen]))
    return image_rows(rows, title="Added training images per class")
