"""Choose which raw images go on to training.

Flagged images (outliers, corrupted blends) go first, with all their copies; of what is left, one
image per exact-duplicate group is kept and identical images with different labels are dropped.

Near duplicates are kept (they are often distinct cells that merely look alike, and they are
useful training data); :mod:`bc_pipeline.preparation.splits` keeps each near-duplicate group inside one
split instead, which is what prevents leakage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

REMOVED_COLUMNS = ["index", "image_id", "label", "kind", "reason"]
EXACT_DUPLICATE = "exact duplicate"
LABEL_CONFLICT = "label conflict"


def select_clean(
    duplicates: pd.DataFrame, flagged: pd.DataFrame | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Return (raw indices to keep, table of removed images with their kind and reason).

    ``duplicates`` is the table of :func:`bc_pipeline.quality.dedup.find_duplicates`; ``flagged``
    (optional) lists images to drop whatever else holds, with columns index, kind, reason.
    """
    flagged = flagged if flagged is not None else pd.DataFrame(columns=["index", "kind", "reason"])
    flagged = flagged.drop_duplicates("index")
    is_flagged = duplicates["index"].isin(set(flagged["index"].tolist()))
    dropped = duplicates.loc[is_flagged, ["index", "image_id", "label"]].merge(
        flagged[["index", "kind", "reason"]], on="index"
    )
    table = duplicates[~is_flagged].sort_values("index")
    first_in_group = table.groupby("exact_group")["index"].transform("min")
    conflict = table["exact_conflict"].to_numpy()
    repeat = (table["index"] != first_in_group).to_numpy()

    labels_of_group = table.groupby("exact_group")["label"].agg(lambda s: sorted(set(int(v) for v in s)))
    kinds = np.full(len(table), "", dtype=object)
    reasons = np.full(len(table), "", dtype=object)
    for row in np.nonzero(conflict)[0]:
        group = table["exact_group"].iat[row]
        kinds[row] = LABEL_CONFLICT
        reasons[row] = f"identical image labelled {labels_of_group[group]}"
    for row in np.nonzero(repeat & ~conflict)[0]:
        kinds[row] = EXACT_DUPLICATE
        reasons[row] = f"same pixels as image {int(first_in_group.iat[row])}"

    removed_mask = conflict | repeat
    removed = table.loc[removed_mask, ["index", "image_id", "label"]].copy()
    removed["kind"] = kinds[removed_mask]
    removed["reason"] = reasons[removed_mask]
    keep = table.loc[~removed_mask, "index"].to_numpy(dtype=np.int64)
    removed = pd.concat([dropped[REMOVED_COLUMNS], removed[REMOVED_COLUMNS]], ignore_index=True)
    return keep, removed.sort_values("index").reset_index(drop=True)


def removal_counts(removed: pd.DataFrame) -> dict[str, int]:
    """Removed images by kind ('exact duplicate', 'label conflict')."""
    return {str(k): int(v) for k, v in removed["kind"].value_counts().items()}
