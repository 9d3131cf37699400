"""Stage 3: stratified, group-aware train/validation/test splits, with checks that prove it."""

import dagster as dg
import pandas as pd
from pydantic import Field, model_validator

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import versioned, with_config
from bc_pipeline.preparation.splits import SPLITS, make_split_table, proportion_gaps


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
    return versioned(table, metadata=metadata)
