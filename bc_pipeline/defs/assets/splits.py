"""Stage 3: stratified, group-aware train/validation/test splits, with checks that prove it."""

import dagster as dg
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.preparation.splits import SPLITS, SplitSettings, make_split_table, proportion_gaps


class SplitConfig(SettingsConfig):
    """Split shares and seed (preparation.splits.SplitSettings); the shares must sum to 1."""

    settings_class = SplitSettings
    train: float = setting(SplitSettings, "train")
    val: float = setting(SplitSettings, "val")
    test: float = setting(SplitSettings, "test")
    seed: int = setting(SplitSettings, "seed")


@dg.asset(
    code_version=with_config("1", SplitConfig),
    group_name="splits",
    kinds={"parquet"},
    description="Which clean image goes to train, val or test; near-duplicate groups never straddle splits.",
)
def data_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, clean_images: ImageSet
) -> dg.Output[pd.DataFrame]:
    settings = config.settings()
    table = make_split_table(clean_images.manifest, fractions=settings.fractions, seed=settings.seed)
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
