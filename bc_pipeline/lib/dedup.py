"""Exact and near-duplicate groups, and label conflicts.

- Exact duplicates share every pixel, hence the content-derived image id.
- Near duplicates are pairs whose phash *and* dhash differ in at most ``threshold`` bits. Asking
  both hashes to agree keeps unrelated but similar-looking cells (the same stain, a cell in the
  middle) apart, which a single 64-bit hash does not always do. Pairs are found by a blocked,
  vectorised all-pairs Hamming comparison (XOR + popcount over a block of rows at a time, so
  memory stays at ``block * n`` bytes) and joined into groups by connected components.
- The comparison is the expensive part (about 1.8 s for 14,416 images, every time). With a
  :class:`NearPairs` cache from the previous run, only images whose id is new are compared (with
  every image); pairs among known ids come from the cache, which is exact because an id is the
  pixel content and so fixes both hashes.
- A label conflict is one image (one exact group) seen with several labels: no split can hold a
  correct answer for it, so :mod:`bc_pipeline.lib.cleaning` drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.lib.hashing import hamming

DUPLICATE_COLUMNS = [
    "index",
    "image_id",
    "label",
    "exact_group",
    "exact_size",
    "exact_conflict",
    "near_group",
    "near_size",
    "near_conflict",
]


def near_duplicate_pairs(
    phash: np.ndarray, dhash: np.ndarray, threshold: int, *, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) whose phash and dhash both differ in at most ``threshold`` bits."""
    n = len(phash)
    left, right = [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        # Compare rows start..stop with every later column only (upper triangle).
        p = hamming(phash[start:stop, None], phash[None, start:])
        close = p <= threshold
        if close.any():
            d = hamming(dhash[start:stop, None], dhash[None, start:])
            close &= d <= threshold
        rows, cols = np.nonzero(close)
        cols = cols + start
        rows = rows + start
        keep = cols > rows
        left.append(rows[keep])
        right.append(cols[keep])
    if not left:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(left).astype(np.int64), np.concatenate(right).astype(np.int64)


@dataclass(frozen=True)
class NearPairs:
    """Every pair among ``ids`` was compared at ``threshold``; ``near[i]`` lists the ids close to ``ids[i]``.

    One row per image, so the cache is one table (Parquet) and can never cover ids without their pairs.
    """

    threshold: int
    ids: np.ndarray
    near: list[np.ndarray]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"image_id": self.ids, "near": [list(n) for n in self.near]}).assign(threshold=self.threshold)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> NearPairs:
        thresholds = frame["threshold"].unique()
        if len(thresholds) > 1:
            raise ValueError(f"a near-pair cache holds one threshold, found {sorted(thresholds)}")
        threshold = int(thresholds[0]) if len(thresholds) else -1
        ids = frame["image_id"].to_numpy(str)
        return cls(threshold, ids, [np.asarray(n, dtype=str) for n in frame["near"]])


def cached_near_pairs(
    ids: np.ndarray, phash: np.ndarray, dhash: np.ndarray, threshold: int, known: NearPairs | None, *, block: int = 2048
) -> tuple[np.ndarray, np.ndarray, int]:
    """Like :func:`near_duplicate_pairs` over distinct ``ids``, comparing only ids that ``known`` lacks.

    Returns (left, right, number of images compared afresh). Pairs are (i < j) index pairs, sorted.
    """
    n = len(ids)
    position = pd.Series(np.arange(n), index=pd.Index(ids))
    if known is None or known.threshold != threshold:
        left, right = near_duplicate_pairs(phash, dhash, threshold, block=block)
        return left, right, n
    is_known = np.isin(ids, known.ids)
    cached = [(position[a], position[b]) for a, near in zip(known.ids, known.near) if a in position for b in near if b in position]
    fresh = np.flatnonzero(~is_known)
    pairs = set((min(i, j), max(i, j)) for i, j in cached)
    for start in range(0, len(fresh), block):
        rows = fresh[start : start + block]
        close = (hamming(phash[rows, None], phash[None, :]) <= threshold) & (hamming(dhash[rows, None], dhash[None, :]) <= threshold)
        for r, j in zip(*np.nonzero(close)):
            i = rows[r]
            if i != j:
                pairs.add((min(i, j), max(i, j)))
    ordered = np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return ordered[:, 0], ordered[:, 1], len(fresh)


def _as_near_pairs(ids: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: int) -> NearPairs:
    near: list[list[str]] = [[] for _ in ids]
    for i, j in zip(left, right):
        near[i].append(ids[j])
        near[j].append(ids[i])
    return NearPairs(threshold, np.asarray(ids, dtype=str), [np.asarray(n, dtype=str) for n in near])


def _components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(left), dtype=np.int8), (left, right)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _renumber_by_first_appearance(labels)


def _renumber_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    _, first_index, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_index))
    return order[inverse].astype(np.int64)


def find_duplicates(
    image_ids: np.ndarray | pd.Series,
    labels: np.ndarray | pd.Series,
    phash: np.ndarray,
    dhash: np.ndarray,
    *,
    threshold: int = 4,
) -> pd.DataFrame:
    """One row per image: its exact group, near group, group sizes and whether each conflicts.

    Groups are numbered by first appearance. Every image is in a group (singletons included), and
    every exact group lies inside one near group.
    """
    return find_duplicates_cached(image_ids, labels, phash, dhash, threshold=threshold, known=None)[0]


def find_duplicates_cached(
    image_ids: np.ndarray | pd.Series,
    labels: np.ndarray | pd.Series,
    phash: np.ndarray,
    dhash: np.ndarray,
    *,
    threshold: int = 4,
    known: NearPairs | None,
) -> tuple[pd.DataFrame, NearPairs, int]:
    """:func:`find_duplicates` reusing the pairs of a previous run: (table, pairs to cache, images compared)."""
    if threshold < 0 or threshold > 64:
        raise ValueError(f"threshold must be between 0 and 64 bits, got {threshold}")
    ids = np.asarray(image_ids).astype(str)
    labels = np.asarray(labels).astype(np.int64)
    n = len(ids)
    if not (len(labels) == len(phash) == len(dhash) == n):
        raise ValueError("image_ids, labels and hashes must have one entry per image")

    _, first_of_id, exact = np.unique(ids, return_index=True, return_inverse=True)
    exact = _renumber_by_first_appearance(exact)
    # Compare each distinct image once: representatives are the first member of each exact group.
    reps = np.sort(first_of_id)
    left, right, compared = cached_near_pairs(ids[reps], phash[reps], dhash[reps], threshold, known)
    near_of_rep = _components(len(reps), left, right)
    near = near_of_rep[exact]  # exact groups are numbered in the order of their representatives

    table = pd.DataFrame(
        {"index": np.arange(n), "image_id": ids, "label": labels, "exact_group": exact, "near_group": near}
    )
    for kind in ("exact", "near"):
        grouped = table.groupby(f"{kind}_group")["label"]
        table[f"{kind}_size"] = grouped.transform("size").astype(np.int64)
        table[f"{kind}_conflict"] = grouped.transform("nunique").to_numpy() > 1
    return table[DUPLICATE_COLUMNS], _as_near_pairs(ids[reps], left, right, threshold), compared


def summarize_groups(duplicates: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Groups of more than one image of ``kind`` ('exact' or 'near'), largest first."""
    group_col = f"{kind}_group"
    multi = duplicates[duplicates[f"{kind}_size"] > 1]
    if multi.empty:
        return pd.DataFrame(columns=["group", "size", "labels", "conflict", "members"])
    summary = multi.groupby(group_col).agg(
        size=("index", "size"),
        labels=("label", lambda s: sorted(set(int(v) for v in s))),
        members=("index", lambda s: [int(v) for v in s]),
    )
    summary["conflict"] = summary["labels"].map(len) > 1
    summary = summary.reset_index().rename(columns={group_col: "group"})
    return summary.sort_values(["size", "group"], ascending=[False, True]).reset_index(drop=True)[
        ["group", "size", "labels", "conflict", "members"]
    ]


def duplicate_counts(duplicates: pd.DataFrame) -> dict[str, int]:
    """Headline numbers for logs and metadata."""
    exact = summarize_groups(duplicates, "exact")
    near = summarize_groups(duplicates, "near")
    # Near groups that are more than one exact group (i.e. not just byte-identical copies).
    distinct_per_near = duplicates.groupby("near_group")["exact_group"].nunique()
    return {
        "images": int(len(duplicates)),
        "exact_groups": int(len(exact)),
        "exact_duplicate_images": int(exact["size"].sum() - len(exact)) if len(exact) else 0,
        "near_groups": int((distinct_per_near > 1).sum()),
        "near_groups_incl_exact": int(len(near)),
        "label_conflict_groups": int(exact["conflict"].sum()) if len(exact) else 0,
        "near_groups_with_mixed_labels": int(near["conflict"].sum()) if len(near) else 0,
    }
