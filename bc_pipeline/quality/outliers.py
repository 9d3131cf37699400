"""Per-image decisions: colour statistics, outliers, and the corruption report's copies and figures.

Everything is computed on *distinct* images (the first of each exact-duplicate group) and then
copied to every duplicate, so neither the position of an image in the file nor the number of
copies it has changes any decision.

Colour does not decide which images are corrupted (a template may have a smear's colours; see
:mod:`bc_pipeline.quality.blends`); it finds pictures that are no smear at all and that no
template explains.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.core import chunks
from bc_pipeline.core.settings import declare
from bc_pipeline.quality import colour
from bc_pipeline.quality.blends import (
    BLEND,
    COPY,
    CorruptionResult,
    CorruptionSettings,
    find_corruptions,
    templates_from_report,  # fmt: skip
)

#: An image that no blend explains is an outlier when it is atypical beyond this robust z *and*
#: lacks the stain tint: stained cells keep the tint however unusual they are, photographs do not.
OUTLIER_ATYPICALITY = 4.0
#: ... or, tint or not, when it is this far from the bulk.
EXTREME_ATYPICALITY = 15.0
#: A data set where fewer distinct images than this share look stain-tinted is not a smear data set.
MIN_TINTED_SHARE = 0.4



@dataclass(frozen=True)
class OutlierSettings:
    """When an image no blend explains is called an outlier (the ``outlier_report`` asset's config)."""

    outlier_atypicality: float = declare(OUTLIER_ATYPICALITY, "Unexplained, untinted images beyond this robust z are outliers.", gt=0)
    extreme_atypicality: float = declare(EXTREME_ATYPICALITY, "Unexplained images beyond this are outliers.", gt=0)
    min_tinted_share: float = declare(
        MIN_TINTED_SHARE, "Fail when fewer distinct images than this share show the stain tint (not a smear data set).", ge=0, le=1
    )


STATS_COLUMNS = ["index", "image_id", "representative", "tinted", "atypicality"]
OUTLIER_COLUMNS = ["index", "image_id", "kind", "reason", "atypicality"]


def colour_stats(
    images: np.ndarray, duplicates: pd.DataFrame, *, workers: int = 1, batch_size: int = 2048
) -> pd.DataFrame:
    """One row per image: its distinct representative, stain tint and atypicality.

    Two passes over the distinct images, a batch at a time (a million images are never in memory
    together): the pooled colour histogram, then each image's score under it. With ``workers`` > 1
    the batches go to worker processes, which map a stored image file themselves
    (:func:`bc_pipeline.core.chunks.map_rows`); the result is the same to the bit.
    """
    table = duplicates.sort_values("index")
    representative = table.groupby("exact_group")["index"].transform("min").to_numpy(np.int64)
    distinct = np.unique(representative)
    scores = np.zeros((len(distinct), 2))
    with chunks.worker_pool(min(workers, -(-len(distinct) // batch_size))) as pool:
        passes = functools.partial(chunks.map_rows, images=images, rows=distinct, batch_size=batch_size, workers=workers, pool=pool)
        counts = sum((c for _, c in passes(colour.colour_counts)), np.zeros(colour.LEVELS**3))
        histogram = counts / max(counts.sum(), 1.0)
        for start, batch in passes(functools.partial(colour.colour_scores, histogram)):
            scores[start : start + len(batch)] = batch
    score, tinted = colour.robust_z(scores[:, 0]), scores[:, 1] > 0.5
    position = np.searchsorted(distinct, representative)
    return pd.DataFrame(
        {
            "index": table["index"].to_numpy(np.int64),
            "image_id": table["image_id"].astype(str).to_numpy(),
            "representative": representative,
            "tinted": tinted[position],
            "atypicality": score[position],
        }
    )[STATS_COLUMNS]


def tinted_share(stats: pd.DataFrame) -> float:
    """Share of distinct images that look stain-tinted."""
    distinct = stats[stats["index"] == stats["representative"]]
    return float(distinct["tinted"].mean()) if len(distinct) else 0.0


def distinct_rows(stats: pd.DataFrame) -> np.ndarray:
    """Rows of the distinct images (the first of each exact-duplicate group)."""
    return np.unique(stats["representative"].to_numpy(np.int64))


def expand_to_copies(report: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Give every exact copy of a corrupted distinct image its own row (same decomposition)."""
    copies = stats[["index", "image_id", "representative"]].merge(
        report.rename(columns={"index": "representative"}), on="representative"
    )
    return copies.sort_values("index").reset_index(drop=True)


def find_outliers(
    stats: pd.DataFrame,
    corruption_report: pd.DataFrame,
    *,
    outlier_atypicality: float = OUTLIER_ATYPICALITY,
    extreme_atypicality: float = EXTREME_ATYPICALITY,
) -> pd.DataFrame:
    """Copies of a recovered template, and images no blend explains that are atypical and untinted,
    or extremely atypical."""
    copies = corruption_report[corruption_report["kind"] == COPY]
    explained = set(corruption_report["index"].tolist())
    unexplained = ~stats["index"].isin(explained)
    untinted = (stats["atypicality"] > outlier_atypicality) & ~stats["tinted"]
    extreme = stats["atypicality"] > extreme_atypicality
    flagged = stats[unexplained & (untinted | extreme)].copy()
    flagged["kind"] = "outlier"
    flagged["reason"] = [
        f"colours atypical for a smear (robust z {a:.1f})" + ("" if t else " and no stain tint")
        for a, t in zip(flagged["atypicality"], flagged["tinted"])
    ]
    copied = stats[stats["index"].isin(set(copies["index"].tolist()))].merge(copies[["index", "template", "reason"]], on="index")
    copied["kind"] = "outlier"
    table = pd.concat([flagged, copied], ignore_index=True).sort_values("index")
    return table.reset_index(drop=True)[OUTLIER_COLUMNS]


def decomposition_rows(report: pd.DataFrame, per_template: int = 2) -> pd.DataFrame:
    """A few distinct corrupted images of each template, best score first, for figures."""
    distinct = report.drop_duplicates("representative") if "representative" in report else report
    distinct = distinct[distinct["kind"] == BLEND]  # a decomposition needs the base
    ranked = distinct.sort_values(["template", "score"], ascending=[True, False])
    return ranked.groupby("template").head(per_template).reset_index(drop=True)


@dataclass(frozen=True)
class AnomalyResult:
    """The whole anomaly stage in one call (what the three assets compute one after another)."""

    stats: pd.DataFrame
    corruption: CorruptionResult  # on distinct images
    report: pd.DataFrame  # corruption report with every exact copy of a flagged image
    outliers: pd.DataFrame
    templates: np.ndarray  # recovered from ``report`` as ``noise_templates`` does

    def flagged(self) -> np.ndarray:
        return np.union1d(self.report["index"].to_numpy(np.int64), self.outliers["index"].to_numpy(np.int64))


def detect(
    images: np.ndarray, duplicates: pd.DataFrame, settings: CorruptionSettings = CorruptionSettings()
) -> AnomalyResult:
    """Colour statistics, corruption search, outliers and templates, with default thresholds."""
    stats = colour_stats(images, duplicates)
    result = find_corruptions(images, distinct_rows(stats), settings=settings)
    report = expand_to_copies(result.report, stats)
    found = find_outliers(stats, report)
    return AnomalyResult(stats, result, report, found, templates_from_report(images, report))
