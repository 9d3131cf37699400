"""Blocking asset checks: a stage whose check fails stops what depends on it.

- ``data_splits``: no image and no near-duplicate group in two splits, class shares equal across
  splits, no flagged (outlier or corrupted) image in any split.
- ``augmented_train_set``: every shard has the labels, shape and dtype of its source rows.
"""

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet, ShardSet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.preparation.splits import groups_crossing_splits, ids_crossing_splits, proportion_gaps, proportion_violations


@dg.asset_check(asset="data_splits", blocking=True, description="No image id appears in two splits.")
def no_image_in_two_splits(data_splits: pd.DataFrame) -> dg.AssetCheckResult:
    crossing = ids_crossing_splits(data_splits)
    return dg.AssetCheckResult(
        passed=not crossing,
        metadata={"crossing_ids": len(crossing), "examples": dg.MetadataValue.json(crossing[:20])},
    )


@dg.asset_check(asset="data_splits", blocking=True, description="No near-duplicate group spans two splits.")
def no_group_in_two_splits(data_splits: pd.DataFrame) -> dg.AssetCheckResult:
    crossing = groups_crossing_splits(data_splits)
    return dg.AssetCheckResult(
        passed=not crossing,
        metadata={"crossing_groups": len(crossing), "examples": dg.MetadataValue.json(crossing[:20])},
    )


@dg.asset_check(
    asset="data_splits",
    blocking=True,
    description="Each class's share in every split is within 1 point of its overall share "
    "(one image's share for splits under 100 images).",
)
def class_proportions_match(data_splits: pd.DataFrame) -> dg.AssetCheckResult:
    gaps = proportion_gaps(data_splits)
    violations = proportion_violations(data_splits)
    return dg.AssetCheckResult(
        passed=not violations,
        metadata={
            "violations": dg.MetadataValue.json(violations),
            "gaps_points": md.table(gaps.round(3).rename_axis("label").reset_index()),
        },
    )


@dg.asset_check(
    asset="data_splits",
    blocking=True,
    additional_ins={"outlier_report": dg.AssetIn(), "corruption_report": dg.AssetIn()},
    description="No image flagged as an outlier or as corrupted reaches any split.",
)
def no_flagged_image_in_splits(
    data_splits: pd.DataFrame, outlier_report: pd.DataFrame, corruption_report: pd.DataFrame
) -> dg.AssetCheckResult:
    flagged_ids = set(outlier_report["image_id"].astype(str)) | set(corruption_report["image_id"].astype(str))
    leaked = sorted(set(data_splits["image_id"].astype(str)) & flagged_ids)
    return dg.AssetCheckResult(
        passed=not leaked,
        metadata={"flagged_images": len(flagged_ids), "leaked": len(leaked), "examples": dg.MetadataValue.json(leaked[:20])},
    )


@dg.asset_check(
    asset="augmented_train_set",
    additional_ins={"balanced_train_set": dg.AssetIn("balanced_train_set")},
    blocking=True,
    description="Every shard has the labels, shape and dtype of its source rows.",
)
def shards_match_balanced_set(augmented_train_set: ShardSet, balanced_train_set: ImageSet) -> dg.AssetCheckResult:
    labels = balanced_train_set.manifest["label"].to_numpy(np.int64)
    shape = balanced_train_set.images.shape[1:]
    problems = []
    for i, row in augmented_train_set.manifest.iterrows():
        images, shard_labels = augmented_train_set.load(i)
        expected = labels[row["start"] : row["start"] + row["count"]]
        if images.dtype != np.uint8 or images.shape[1:] != shape or len(images) != row["count"]:
            problems.append(f"{row['file']}: {images.dtype} {images.shape}, expected uint8 ({row['count']}, *{shape})")
        elif not np.array_equal(shard_labels, expected):
            problems.append(f"{row['labels_file']}: labels differ from balanced_train_set rows {row['start']}+")
    return dg.AssetCheckResult(
        passed=not problems, metadata={"shards": len(augmented_train_set.manifest), "problems": problems[:20]}
    )
