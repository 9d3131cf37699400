"""Stage 2c: the clean image set that splits and training start from."""

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import versioned
from bc_pipeline.quality.blends import COPY
from bc_pipeline.quality.cleaning import removal_counts, select_clean


def flagged_images(outlier_report: pd.DataFrame, corruption_report: pd.DataFrame) -> pd.DataFrame:
    """Every image the anomaly stage flags, with its kind and reason (index, kind, reason).

    Copies of a template are outliers (they are in both reports); every blend is "corrupted".
    """
    blends = corruption_report[corruption_report["kind"] != COPY].assign(kind="corrupted")
    columns = ["index", "kind", "reason"]
    return pd.concat([outlier_report[columns], blends[columns]], ignore_index=True).drop_duplicates("index")


@dg.asset(
    code_version="4",
    group_name="cleaning",
    kinds={"numpy", "parquet"},
    description="Raw images minus outliers, corrupted blends and label conflicts, one per exact-duplicate group.",
)
def clean_images(
    context: dg.AssetExecutionContext,
    raw_images: ImageSet,
    duplicate_groups: pd.DataFrame,
    outlier_report: pd.DataFrame,
    corruption_report: pd.DataFrame,
) -> dg.Output[ImageSet]:
    keep, removed = select_clean(duplicate_groups, flagged_images(outlier_report, corruption_report))
    if len(keep) == 0:
        raise dg.Failure(description="no image is left after cleaning: every image was flagged or conflicting")
    kept_rows = duplicate_groups.set_index("index").loc[keep]
    manifest = raw_images.manifest.iloc[keep].reset_index(drop=True)
    manifest.insert(0, "raw_index", keep)
    manifest["near_group"] = kept_rows["near_group"].to_numpy(np.int64)
    images = np.ascontiguousarray(raw_images.images[keep])
    reasons = removal_counts(removed)
    context.log.info(f"kept {len(keep)} of {len(duplicate_groups)} images; removed {reasons or 'none'}")
    metadata = {
        "num_images": len(keep),
        "num_removed": len(removed),
        "removed_by_reason": dg.MetadataValue.json(reasons),
        "removed": md.table(removed),
    }
    value = ImageSet(images=images, manifest=manifest, tables={"removed": removed}, class_names=raw_images.class_names)
    return versioned(value, images, manifest, list(value.class_names), metadata=metadata)
