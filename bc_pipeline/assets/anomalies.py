"""Stage 2b: outliers (not blood-cell images) and corrupted images (cell + template blends).

Order in the graph: colour statistics -> corruption report -> outlier report. Corrupted images are
found by the exact algebra of a blend, whatever their colours (:mod:`bc_pipeline.lib.corruption`);
only images that no blend explains can be called "not a blood-cell image at all", and copies of a
recovered template are among them.
"""

import time
from dataclasses import replace

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline import automation
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets import _metadata as md
from bc_pipeline.lib import corruption, outliers
from bc_pipeline.lib.artifacts import ImageSet
from bc_pipeline.lib.plots import decomposition_examples, score_histogram, template_grid
from bc_pipeline.lib.storage import fingerprint
from bc_pipeline.resources import PipelineStorage


@dg.asset(
    code_version="1",
    automation_condition=automation.on_change(),
    group_name="anomalies",
    kinds={"parquet"},
    description="Stain tint and robust colour atypicality of every raw image (computed once per distinct image).",
)
def image_colour_stats(
    context: dg.AssetExecutionContext, raw_images: ImageSet, duplicate_groups: pd.DataFrame, storage: PipelineStorage
) -> dg.Output[pd.DataFrame]:
    start = time.perf_counter()
    stats = outliers.colour_stats(raw_images.images, duplicate_groups)
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
    return dg.Output(stats, data_version=dg.DataVersion(fingerprint(stats)), metadata=metadata)


_DEFAULTS = corruption.CorruptionSettings()


class CorruptionConfig(dg.Config):
    """The thresholds of :class:`bc_pipeline.lib.corruption.CorruptionSettings` (its docstrings say why each holds)."""

    residual_factor: float = Field(
        default=_DEFAULTS.residual_factor, gt=1, description="A fit passes at most this many times the residual rounding leaves."
    )
    template_snr: float = Field(
        default=_DEFAULTS.template_snr, gt=0, description="A blend's template part must stand this many times above rounding."
    )
    min_weight: float = Field(default=_DEFAULTS.min_weight, gt=0, lt=1, description="Below this cell share: a copy of the template.")
    max_weight: float = Field(default=_DEFAULTS.max_weight, gt=0, lt=1, description="Above this cell share: the cell itself.")
    min_blends: int = Field(default=_DEFAULTS.min_blends, ge=2, description="Distinct blends a template needs.")
    missing_bases: bool = Field(
        default=_DEFAULTS.missing_bases, description="Also flag blends of a found template whose base is not in the file."
    )

    def settings(self) -> corruption.CorruptionSettings:
        return replace(_DEFAULTS, **self.model_dump())


@dg.asset(
    code_version=with_config("2", CorruptionConfig),
    automation_condition=automation.on_change(),
    group_name="anomalies",
    kinds={"parquet"},
    description="Images that are a blend A = a*B + (1-a)*C of another image B of the file and a shared template C "
    "(found by the exact algebra of a blend, whatever the colours), and copies of the templates: for each, "
    "its template, base, cell share, residual against rounding, and the reason in words.",
)
def corruption_report(
    context: dg.AssetExecutionContext,
    config: CorruptionConfig,
    raw_images: ImageSet,
    image_colour_stats: pd.DataFrame,
) -> dg.Output[pd.DataFrame]:
    start = time.perf_counter()
    distinct = outliers.distinct_rows(image_colour_stats)
    context.log.info(f"searching {len(distinct)} distinct images for blends of shared templates")
    result = corruption.find_corruptions(raw_images.images, distinct, settings=config.settings())
    report = outliers.expand_to_copies(result.report, image_colour_stats)
    seconds = time.perf_counter() - start
    kinds = result.report["kind"].value_counts().to_dict()
    context.log.info(
        f"{len(report)} flagged images ({len(result.report)} distinct: {kinds or 'none'}), "
        f"{len(result.templates)} templates, {seconds:.1f}s"
    )
    metadata = {
        "flagged_images": len(report),
        "distinct_flagged": len(result.report),
        "by_kind": dg.MetadataValue.json({str(k): int(v) for k, v in kinds.items()}),
        "templates": len(result.templates),
        "seconds": round(seconds, 2),
        "per_template": md.table(result.template_summary.round(4)),
        "preview": md.table(report.head(30).round(4)),
    }
    return dg.Output(report, data_version=dg.DataVersion(fingerprint(report)), metadata=metadata)


@dg.asset(
    code_version="2",
    automation_condition=automation.on_change(),
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
    templates = corruption.templates_from_report(raw_images.images, corruption_report)
    summary = corruption.template_summary(corruption_report)
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
    return dg.Output(stored, data_version=dg.DataVersion(fingerprint(stored)), metadata=metadata)


class OutlierConfig(dg.Config):
    outlier_atypicality: float = Field(
        default=outliers.OUTLIER_ATYPICALITY,
        gt=0,
        description="Unexplained, untinted images beyond this robust z are outliers.",
    )
    extreme_atypicality: float = Field(
        default=outliers.EXTREME_ATYPICALITY, gt=0, description="Unexplained images beyond this are outliers."
    )
    min_tinted_share: float = Field(
        default=outliers.MIN_TINTED_SHARE,
        ge=0,
        le=1,
        description="Fail when fewer distinct images than this share show the stain tint (not a smear data set).",
    )


@dg.asset(
    code_version=with_config("2", OutlierConfig),
    automation_condition=automation.on_change(),
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
    return dg.Output(report, data_version=dg.DataVersion(fingerprint(report)), metadata=metadata)
