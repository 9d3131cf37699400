"""Per-image decisions from colour statistics: blend candidates, clean pool, outliers.

Everything is computed on *distinct* images (the first of each exact-duplicate group) and then
copied to every duplicate, so neither the position of an image in the file nor the number of
copies it has changes any decision.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bc_pipeline.lib.anomalies import atypicality, stain_tinted

#: Robust z above which a distinct image is examined as a possible blend. Loose on purpose: a
#: clean image that is merely unusual is examined and then not confirmed as a blend.
CANDIDATE_ATYPICALITY = 3.0
#: An image that no blend explains is an outlier when it is atypical beyond this robust z *and*
#: lacks the stain tint: stained cells keep the tint however unusual they are, photographs do not.
OUTLIER_ATYPICALITY = 4.0
#: ... or, tint or not, when it is this far from the bulk.
EXTREME_ATYPICALITY = 15.0
#: A data set where fewer distinct images than this share look stain-tinted is not a smear data set.
MIN_TINTED_SHARE = 0.4

STATS_COLUMNS = ["index", "image_id", "representative", "tinted", "atypicality"]
OUTLIER_COLUMNS = ["index", "image_id", "kind", "reason", "atypicality"]


def colour_stats(images: np.ndarray, duplicates: pd.DataFrame) -> pd.DataFrame:
    """One row per image: its distinct representative, stain tint and atypicality."""
    table = duplicates.sort_values("index")
    representative = table.groupby("exact_group")["index"].transform("min").to_numpy(np.int64)
    distinct = np.unique(representative)
    distinct_images = np.asarray(images[distinct])
    score = atypicality(distinct_images)
    tinted = stain_tinted(distinct_images)
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


def candidates_and_pool(stats: pd.DataFrame, candidate_atypicality: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct images to examine as blends, and distinct typical images to draw bases from."""
    distinct = stats[stats["index"] == stats["representative"]]
    atypical = distinct["atypicality"].to_numpy() > candidate_atypicality
    return distinct["index"].to_numpy()[atypical], distinct["index"].to_numpy()[~atypical]


def expand_to_copies(report: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """Give every exact copy of a corrupted distinct image its own row (same decomposition)."""
    copies = stats[["index", "image_id", "representative"]].merge(
        report.rename(columns={"index": "representative"}), on="representative"
    )
    return copies.sort_values("index").reset_index(drop=True)


def find_outliers(
    stats: pd.DataFrame,
    *,
    corrupted: np.ndarray,
    outlier_atypicality: float = OUTLIER_ATYPICALITY,
    extreme_atypicality: float = EXTREME_ATYPICALITY,
) -> pd.DataFrame:
    """Images no blend explains that are atypical and untinted, or extremely atypical."""
    unexplained = ~stats["index"].isin(set(np.asarray(corrupted).tolist()))
    untinted = (stats["atypicality"] > outlier_atypicality) & ~stats["tinted"]
    extreme = stats["atypicality"] > extreme_atypicality
    flagged = stats[unexplained & (untinted | extreme)].copy()
    flagged["kind"] = "outlier"
    flagged["reason"] = [
        f"colours atypical for a smear (robust z {a:.1f})" + ("" if t else " and no stain tint")
        for a, t in zip(flagged["atypicality"], flagged["tinted"])
    ]
    return flagged.reset_index(drop=True)[OUTLIER_COLUMNS]


def decomposition_rows(report: pd.DataFrame, per_template: int = 2) -> pd.DataFrame:
    """A few distinct corrupted images of each template, best score first, for figures."""
    distinct = report.drop_duplicates("representative") if "representative" in report else report
    ranked = distinct.sort_values(["template", "score"], ascending=[True, False])
    return ranked.groupby("template").head(per_template).reset_index(drop=True)
