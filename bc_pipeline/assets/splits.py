"""Stage 3: stratified, group-aware train/validation/test splits, with checks that prove it."""

import dagster as dg
import pandas as pd

from pydantic import Field, model_validator

from bc_pipeline import automation
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets import _metadata as md
from bc_pipeline.lib.artifacts import ImageSet
from bc_pipeline.lib.splits import (
    SPLITS,
    groups_crossing_splits,
    ids_crossing_splits,
    make_split_table,
    proportion_gaps,
    proportion_violations,
)
from bc_pipeline.lib.storage import fingerprint


class SplitConfig(dg.Config):
    train: float = Field(default=0.8, gt=0, lt=1)
    val: float = Field(default=0.1, gt=0, lt=1)
    test: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> "SplitConfig":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test}")
        return self


@dg.asset(
    code_version=with_config("1", SplitConfig),
    automation_condition=automation.on_change(),
    group_name="splits",
    kinds={"parquet"},
    description="Which clean image goes to train, val or test; near-duplicate groups never straddle splits.",
)
def data_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, clean_images: ImageSet
) -> dg.Output[pd.DataFrame]:
    table = make_split_table(
        clean_images.manifest, fractions=(config.train, config.val, config.test), seed=config.seed
    )
    per_class = pd.crosstab(table["label"], table["split"]).reindex(columns=list(SPLITS), fill_value=0)
    sizes = table["split"].value_counts().reindex(list(SPLITS), fill_value=0)
    context.log.info(f"split sizes: {sizes.to_dict()}")
    empty = [name for name in SPLITS if sizes[name] == 0]
    if empty:
        raise dg.Failure(
            description=(
                f"the {' and '.join(empty)} split(s) would be empty: {len(table)} clean images split "
                f"{config.train}/{config.val}/{config.test} give {sizes.to_dict()}. Use more images or "
                "larger val/test fractions (data_splits config)."
            ),
            allow_retries=False,
        )
    metadata = {
        **{f"{name}_images": int(sizes[name]) for name in SPLITS},
        "per_class": md.table(per_class.rename_axis("label").reset_index()),
        "max_proportion_gap_points": round(float(proportion_gaps(table).abs().to_numpy().max()), 3),
    }
    return dg.Output(table, data_version=dg.DataVersion(fingerprint(table)), metadata=metadata)


@dg.asset_check(asset=data_splits, blocking=True, description="No image id appears in two splits.")
def no_image_in_two_splits(data_splits: pd.DataFrame) -> dg.AssetCheckResult:
    crossing = ids_crossing_splits(data_splits)
    return dg.AssetCheckResult(
        passed=not crossing,
        metadata={"crossing_ids": len(crossing), "examples": dg.MetadataValue.json(crossing[:20])},
    )


@dg.asset_check(asset=data_splits, blocking=True, description="No near-duplicate group spans two splits.")
def no_group_in_two_splits(data_splits: pd.DataFrame) -> dg.AssetCheckResult:
    crossing = groups_crossing_splits(data_splits)
    return dg.AssetCheckResult(
        passed=not crossing,
        metadata={"crossing_groups": len(crossing), "examples": dg.MetadataValue.json(crossing[:20])},
    )


@dg.asset_check(
    asset=data_splits,
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
    asset=data_splits,
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
