"""Stratified, group-aware train/validation/test splits and the checks that prove them.

Near-duplicate groups are assigned as a whole, so an image and its near copy never sit on both
sides of a train/test boundary (which would inflate test accuracy). Within each class, groups are
shuffled with the seed, placed largest first, and each goes to the split furthest below its
share of what has been placed so far (counting the group itself). That keeps every split at its
share throughout the walk, so groups of every size spread over all splits in proportion (a plain
"largest deficit first" walk would send all the large groups to train), and the final counts
differ from exact stratified proportions by less than one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.settings import declare

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_COLUMNS = ["index", "image_id", "label", "near_group", "split"]


def split_rows(splits: pd.DataFrame, split: str) -> np.ndarray:
    """Rows of the image set in one split, in split-table order."""
    return splits.loc[splits["split"] == split, "index"].to_numpy(np.int64)


def split_arrays(images: ImageSet, splits: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, in split-table order."""
    rows = split_rows(splits, split)
    return np.asarray(images.images[rows]), images.manifest["label"].to_numpy(np.int64)[rows]


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    array = np.asarray(fractions, dtype=float)
    if array.shape != (len(SPLITS),) or (array < 0).any() or not np.isclose(array.sum(), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    return array


@dataclass(frozen=True)
class SplitSettings:
    """Shares of the train, validation and test splits (summing to 1) and the seed that deals the groups."""

    train: float = declare(0.8, gt=0, lt=1)
    val: float = declare(0.1, gt=0, lt=1)
    test: float = declare(0.1, gt=0, lt=1)
    seed: int = declare(0)

    def __post_init__(self) -> None:
        _check_fractions(self.fractions)

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


def group_stratified_split(
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    fractions: Sequence[float] = (SplitSettings.train, SplitSettings.val, SplitSettings.test),
    seed: int = SplitSettings.seed,
) -> np.ndarray:
    """Split name ('train', 'val', 'test') for every image; each group lands in exactly one split."""
    fractions_arr = _check_fractions(fractions)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"label": labels, "group": groups})
    # A group is stratified by its most frequent label (ties: the smallest label).
    group_label = pd.crosstab(frame["group"], frame["label"]).idxmax(axis=1)  # first max: smallest label
    group_size = frame.groupby("group").size()

    assignment: dict[int, int] = {}
    for label in np.unique(group_label.to_numpy()):
        members = group_label.index[group_label.to_numpy() == label].to_numpy()
        members = members[rng.permutation(len(members))]
        sizes = group_size.loc[members].to_numpy()
        order = np.argsort(-sizes, kind="stable")
        filled = np.zeros(len(SPLITS))
        placed = 0
        for group, size in zip(members[order], sizes[order]):
            split = int(np.argmax(fractions_arr * (placed + size) - filled))
            assignment[group] = split
            filled[split] += size
            placed += size
    split_index = frame["group"].map(assignment).to_numpy()
    return np.asarray(SPLITS, dtype=object)[split_index]


def make_split_table(
    manifest: pd.DataFrame, *, fractions: Sequence[float] = (SplitSettings.train, SplitSettings.val, SplitSettings.test),
    seed: int = SplitSettings.seed,
) -> pd.DataFrame:
    """Split table for a clean manifest (needs image_id, label, near_group); ``index`` is its row."""
    split = group_stratified_split(
        manifest["label"].to_numpy(), manifest["near_group"].to_numpy(), fractions=fractions, seed=seed
    )
    table = pd.DataFrame(
        {
            "index": np.arange(len(manifest), dtype=np.int64),
            "image_id": manifest["image_id"].astype(str).to_numpy(),
            "label": manifest["label"].to_numpy(dtype=np.int64),
            "near_group": manifest["near_group"].to_numpy(dtype=np.int64),
            "split": split,
        }
    )
    return table[SPLIT_COLUMNS]


# --- checks ------------------------------------------------------------------------------------


def ids_crossing_splits(splits: pd.DataFrame) -> list[str]:
    """Image ids found in more than one split (must be empty)."""
    per_id = splits.groupby("image_id")["split"].nunique()
    return sorted(per_id.index[per_id > 1].astype(str))


def groups_crossing_splits(splits: pd.DataFrame) -> list[int]:
    """Near-duplicate groups found in more than one split (must be empty)."""
    per_group = splits.groupby("near_group")["split"].nunique()
    return sorted(int(g) for g in per_group.index[per_group > 1])


def proportion_gaps(splits: pd.DataFrame) -> pd.DataFrame:
    """Per class (rows) and split (columns): class share in the split minus overall share, in points."""
    overall = splits["label"].value_counts(normalize=True)
    shares = pd.crosstab(splits["label"], splits["split"], normalize="columns")
    gaps = shares.sub(overall, axis=0) * 100.0
    return gaps.reindex(columns=[s for s in SPLITS if s in gaps.columns]).fillna(0.0)


def proportion_tolerance(split_size: int, points: float = 1.0) -> float:
    """Allowed gap in points: ``points``, or one image's share where a split is too small for that.

    A split of n images can only hold class shares in steps of 100/n points, so below 100 images a
    1-point promise cannot be kept by any splitter; one step is then the honest bound.
    """
    return max(points, 100.0 / max(split_size, 1))


def proportion_violations(splits: pd.DataFrame, points: float = 1.0) -> dict[str, float]:
    """Splits whose largest class-share gap exceeds its tolerance: {split: gap in points}."""
    gaps = proportion_gaps(splits).abs().max(axis=0)
    sizes = splits["split"].value_counts()
    return {
        str(split): round(float(gap), 3)
        for split, gap in gaps.items()
        if gap > proportion_tolerance(int(sizes.get(split, 0)), points) + 1e-9
    }
