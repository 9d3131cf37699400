"""Stage 2c: the clean image set that splits and training start from."""

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.automation import on_change
from bc_pipeline.dagster_utils.versions import versioned
from bc_pipeline.defs.assets.labels import label_decisions
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.quality.blends import COPY
from bc_pipeline.quality.cleaning import REMOVED_COLUMNS, removal_counts, select_clean
from bc_pipeline.quality.label_review import DecisionFileError, apply_decisions, load_decisions


def flagged_images(outlier_report: pd.DataFrame, corruption_report: pd.DataFrame) -> pd.DataFrame:
    """Every image the anomaly stage flags, with its kind and reason (index, kind, reason).

    Copies of a template are outliers (they are in both reports); every blend is "corrupted".
    """
    blends = corruption_report[corruption_report["kind"] != COPY].assign(kind="corrupted")
    columns = ["index", "kind", "reason"]
    return pd.concat([outlier_report[columns], blends[columns]], ignore_index=True).drop_duplicates("index")


@dg.asset(
    code_version="5",
    group_name="cleaning",
    deps=[label_decisions],
    automation_condition=on_change(optional=["label_decisions"]),
    kinds={"numpy", "parquet"},
    description=(
        "Raw images minus outliers, corrupted blends and label conflicts, one per exact-duplicate group, "
        "with the label review's decisions applied (data/review/label_decisions.csv: relabel or drop)."
    ),
)
def clean_images(
    context: dg.AssetExecutionContext,
    raw_images: ImageSet,
    duplicate_groups: pd.DataFrame,
    outlier_report: pd.DataFrame,
    corruption_report: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[ImageSet]:
    keep, removed = select_clean(duplicate_groups, flagged_images(outlier_report, corruption_report))
    names = list(raw_images.class_names)
    try:
        decisions = load_decisions(storage.label_review_file, raw_images.manifest["image_id"].astype(str).tolist(), names)
    except DecisionFileError as error:
        raise dg.Failure(description=f"label review not applied: {error}", allow_retries=False) from None
    manifest, reviewed_out, relabelled = apply_decisions(raw_images.manifest.iloc[keep].set_axis(keep), decisions, names)
    removed = pd.concat([removed, reviewed_out.rename_axis("index").reset_index()[REMOVED_COLUMNS]], ignore_index=True)
    keep = manifest.index.to_numpy(np.int64)
    if len(keep) == 0:
        raise dg.Failure(description="no image is left after cleaning: every image was flagged, conflicting or dropped in review")
    kept_rows = duplicate_groups.set_index("index").loc[keep]
    manifest = manifest.reset_index(drop=True)
    manifest.insert(0, "raw_index", keep)
    manifest["near_group"] = kept_rows["near_group"].to_numpy(np.int64)
    images = np.ascontiguousarray(raw_images.images[keep])
    reasons = removal_counts(removed)
    context.log.info(f"kept {len(keep)} of {len(duplicate_groups)} images; removed {reasons or 'none'}; "
                     f"label review: {len(relabelled)} relabelled, {len(reviewed_out)} dropped, {len(decisions.keep)} kept as labelled")  # fmt: skip
    metadata = {
        "num_images": len(keep),
        "num_removed": len(removed),
        "num_relabelled": len(relabelled),
        "removed_by_reason": dg.MetadataValue.json(reasons),
        "removed": md.table(removed),
        "relabelled": md.table(relabelled),
    }
    value = ImageSet(images=images, manifest=manifest, tables={"removed": removed, "relabelled": relabelled}, class_names=raw_images.class_names)
    return versioned(value, images, manifest, list(value.class_names), metadata=metadata)
