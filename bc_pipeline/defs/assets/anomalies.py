"""Stage 2b: outliers (not blood-cell images) and corrupted images (cell + template blends).

Order in the graph: colour statistics -> corruption report -> outlier report. Corrupted images are
found by the exact algebra of a blend, whatever their colours (:mod:`bc_pipeline.quality.blends`);
only images that no blend explains can be called "not a blood-cell image at all", and copies of a
recovered template are among them.
"""

import time

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core import chunks
from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import decomposition_examples, score_histogram, template_grid
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.quality import blends, outliers


@dg.asset(
    code_version="1",
    group_name="anomalies",
    kinds={"parquet"},
    description="Stain tint and robust colour atypicality of every raw image (computed once per distinct image).",
)
def image_colour_stats(
    context: dg.AssetExecutionContext, raw_images: ImageSet, duplicate_groups: pd.DataFrame, storage: PipelineStorage
) -> dg.Output[pd.DataFrame]:
    start = time.perf_counter()
    stats = outliers.colour_stats(raw_images.images, duplicate_groups, workers=chunks.default_workers())
    context.log.info(f"colour statistics of {len(stats)} images in {time.perf_counter() - start:.1f}s")
    png = score_histogram(
        stats["atypicality"].to_numpy(), "atypicality (robust z of colour log-likelihood)", outliers.OUTLIER_ATYPICALITY
    )
    metadata = {
        "median_atypicality": round(float(stats["atypicality"].median()), 3),
        "max_atypicality": round(float(stats["atypicality"].max()), 3),
        "tinted_share": round(outliers.tinted_share(stats), 3),
        **md.image(png, storage.report_dir("image_colour_stats") / "atypicality.png", "atypicality_histogram"),
    }
    return versioned(stats, metadata=metadata)


class CorruptionConfig(SettingsConfig):
    """The thresholds a user may set (quality.blends.CorruptionSettings, whose comments say why each default holds);
    the rest of the settings is internal (search block sizes, shortlists)."""

    settings_class = blends.CorruptionSettings
    internal = ("coarse_side", "shortlist", "ray_candidates", "template_part", "missing_bases_gap", "whitening_ridge", "block")
    residual_factor: float = setting(blends.CorruptionSettings, "residual_factor")
    template_snr: float = setting(blends.CorruptionSettings, "template_snr")
    min_weight: float = setting(blends.CorruptionSettings, "min_weight")
    max_weight: float = setting(blends.CorruptionSettings, "max_weight")
    min_blends: int = setting(blends.CorruptionSettings, "min_blends")
    missing_bases: bool = setting(blends.CorruptionSettings, "missing_bases")
    lossy: bool = setting(blends.CorruptionSettings, "lossy")


@dg.asset(
    code_version=with_config("5", CorruptionConfig),
    group_name="anomalies",
    kinds={"parquet"},
    description="Images that are a blend A = a*B + (1-a)*C of another image B of the file and a shared template C "
    "(found by the exact algebra of a blend, whatever the colours), and copies of the templates: for each, "
    "its template, base, cell share, residual against the storage noise (rounding, or measured JPEG noise), "
    "what the template explains, and the reason in words.",
)
def corruption_report(
    context: dg.AssetExecutionContext,
    config: CorruptionConfig,  # type: ignore[valid-type]
    raw_images: ImageSet,
    image_colour_stats: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    start = time.perf_counter()
    distinct = outliers.distinct_rows(image_colour_stats)
    context.log.info(f"searching {len(distinct)} distinct images for blends of shared templates")
    result = blends.find_corruptions(raw_images.images, distinct, settings=config.settings())
    report = outliers.expand_to_copies(result.report, image_colour_stats)
    seconds = time.perf_counter() - start
    kinds = result.report["kind"].value_counts().to_dict()
    context.log.info(
        f"{len(report)} flagged images ({len(result.report)} distinct: {kinds or 'none'}), "
        f"{len(result.templates)} templates, {seconds:.1f}s; noise assumed: {result.noise.why}"
    )
    metadata = {
        "flagged_images": len(report),
        "distinct_flagged": len(result.report),
        "by_kind": dg.MetadataValue.json({str(k): int(v) for k, v in kinds.items()}),
        "templates": len(result.templates),
        "noise_rms": round(float(result.noise.full_rms), 3),
        "noise_assumed": result.noise.why,
        "seconds": round(seconds, 2),
        "per_template": md.table(result.template_summary.round(4)),
        "preview": md.table(report.head(30).round(4)),
    }
    return versioned(report, metadata=metadata)


@dg.asset(
    code_version="4",
    group_name="anomalies",
    kinds={"numpy"},
    description="The recovered corruption templates (least squares over every blend and copy of each), as images, "
    "with their member counts and the spread of the cell share.",
)
def noise_templates(
    context: dg.AssetExecutionContext,
    raw_images: ImageSet,
    corruption_report: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[np.ndarray]:
    templates = blends.templates_from_report(raw_images.images, corruption_report)
    summary = blends.template_summary(corruption_report)
    folder = storage.report_dir("noise_templates")
    metadata: dict = {"templates": len(templates), "per_template": md.table(summary.round(4))}
    if len(templates):
        metadata.update(md.image(template_grid(templates, summary), folder / "templates.png", "templates"))
        examples = outliers.decomposition_rows(corruption_report)
        png = decomposition_examples(raw_images.images, templates, examples)
        metadata.update(md.image(png, folder / "decompositions.png", "decompositions"))
    else:
        context.log.info("no corrupted images: no templates to recover")
    stored = np.clip(np.rint(templates), 0, 255).astype(np.uint8)
    return versioned(stored, metadata=metadata)


class OutlierConfig(SettingsConfig):
    """Outlier thresholds (quality.outliers.OutlierSettings)."""

    settings_class = outliers.OutlierSettings
    outlier_atypicality: float = setting(outliers.OutlierSettings, "outlier_atypicality")
    extreme_atypicality: float = setting(outliers.OutlierSettings, "extreme_atypicality")
    min_tinted_share: float = setting(outliers.OutlierSettings, "min_tinted_share")


@dg.asset(
    code_version=with_config("2", OutlierConfig),
    group_name="anomalies",
    kinds={"parquet"},
    description="Images that are not blood-cell images at all: copies of a recovered template, and pictures "
    "that no blend explains whose colours are no smear's.",
)
def outlier_report(
    context: dg.AssetExecutionContext,
    config: OutlierConfig,
    image_colour_stats: pd.DataFrame,
    corruption_report: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    tinted = outliers.tinted_share(image_colour_stats)
    if tinted < config.min_tinted_share:
        raise dg.Failure(
            description=(
                f"these images do not look like stained blood smears: only {tinted:.0%} of the distinct images "
                f"have the stain tint (expected at least {config.min_tinted_share:.0%}); treating them all as "
                "outliers would leave nothing to train on. Is the image source pointing at the right data?"
            ),
            allow_retries=False,
        )
    report = outliers.find_outliers(
        image_colour_stats,
        corruption_report,
        outlier_atypicality=config.outlier_atypicality,
        extreme_atypicality=config.extreme_atypicality,
    )
    context.log.info(f"{len(report)} outliers among {len(image_colour_stats)} images")
    metadata = {
        "outliers": len(report),
        "distinct_outliers": int(report["image_id"].nunique()),
        "tinted_share": round(tinted, 3),
        "outliers_table": md.table(report.head(30).round(3)),
    }
    return versioned(report, metadata=metadata)
