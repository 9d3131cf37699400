"""Exact and near-duplicate groups, and label conflicts.

- Exact duplicates share every pixel, hence the content-derived image id.
- Near duplicates are pairs whose phash *and* dhash differ in at most ``threshold`` bits. Asking
  both hashes to agree keeps unrelated but similar-looking cells (the same stain, a cell in the
  middle) apart, which a single 64-bit hash does not always do. Pairs are found by multi-index
  hashing (:func:`multi_index_pairs`, sub-quadratic) and joined into groups by connected components.
  Its result is exactly the blocked all-pairs comparison's (:func:`all_pairs`: XOR + popcount over
  a block of rows at a time), which it falls back to where it would not be faster.
- The comparison is the expensive part. With a
  :class:`NearPairs` cache from the previous run, only images whose id is new are compared (with
  every image); pairs among known ids come from the cache, which is exact because an id is the
  pixel content and so fixes both hashes.
- A label conflict is one image (one exact group) seen with several labels: no split can hold a
  correct answer for it, so :mod:`bc_pipeline.quality.cleaning` drops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.core.settings import declare
from bc_pipeline.quality.hashing import hamming


@dataclass(frozen=True)
class DedupSettings:
    """The duplicate search's one setting (the ``duplicate_groups`` asset's config)."""

    threshold: int = declare(4, "Two images are near duplicates when phash and dhash each differ in at most this many bits.",
                             ge=0, le=64)

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
    phash: np.ndarray, dhash: np.ndarray, threshold: int, *, block: int = 2048, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) whose phash and dhash both differ in at most ``threshold`` bits, sorted.

    ``rows``: only pairs with at least one member among these indices (the incremental search).
    Multi-index hashing where it prunes, the all-pairs comparison otherwise; the same pairs either way.
    """
    phash, dhash = np.asarray(phash, np.uint64), np.asarray(dhash, np.uint64)
    if _multi_index_pays(len(phash), threshold):
        pairs = multi_index_pairs(phash, dhash, threshold, rows=rows)
        if pairs is not None:
            return pairs
    return all_pairs(phash, dhash, threshold, block=block, rows=rows)


def all_pairs(
    phash: np.ndarray, dhash: np.ndarray, threshold: int, *, block: int = 2048, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The brute-force reference: every pair compared, ``block`` rows at a time (memory ``block * n`` bytes)."""
    n = len(phash)
    wanted = np.arange(n) if rows is None else np.unique(np.asarray(rows, np.int64))
    codes = []
    for start in range(0, len(wanted), block):
        chunk = wanted[start : start + block]
        # Every row against all: later columns only (the upper triangle) unless some rows are asked for.
        first = int(chunk[0]) if rows is None else 0
        close = (hamming(phash[chunk, None], phash[None, first:]) <= threshold) & (
            hamming(dhash[chunk, None], dhash[None, first:]) <= threshold
        )
        r, j = np.nonzero(close)
        i, j = chunk[r], j + first
        keep = i != j
        codes.append(_pair_codes(i[keep], j[keep], n))
    return _decode(np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64), n)


def multi_index_pairs(
    phash: np.ndarray, dhash: np.ndarray, threshold: int, *, rows: np.ndarray | None = None,
    max_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """:func:`all_pairs` by multi-index hashing; None when a table would exceed ``max_candidates``.

    Each 64-bit hash is cut into ``threshold + 1`` chunks. Two hashes within ``threshold`` bits
    differ in at most ``threshold`` chunks, so (pigeonhole) at least one phash chunk *and* one dhash
    chunk are equal. For every (phash chunk, dhash chunk) pair of positions, images are sorted by
    that pair of chunk values; images with equal values are candidates, verified on both full
    hashes. Every true pair is a candidate in some table and every candidate is verified, so the
    result is exactly the all-pairs one. Random 64-bit hashes at threshold 4 make keys of 25-26
    bits: candidates grow with n^2 / 2^25, a million images give a few thousand per table. Memory
    is one table's candidates at a time, capped by ``max_candidates`` (default 64 per image, at
    least a million), beyond which the caller falls back to :func:`all_pairs` (very clustered hashes).
    """
    n = len(phash)
    limit = max_candidates if max_candidates is not None else max(1_000_000, 64 * n)
    member = None if rows is None else np.isin(np.arange(n), np.asarray(rows, np.int64))
    found = []
    chunks = [(_chunk(phash, lo, hi), _chunk(dhash, lo, hi)) for lo, hi in _chunk_bounds(threshold)]
    for p_chunk, _ in chunks:
        for _, d_chunk in chunks:
            left, right = _equal_key_pairs(p_chunk, d_chunk, limit)
            if left is None:
                return None
            if member is not None:
                keep = member[left] | member[right]
                left, right = left[keep], right[keep]
            close = (hamming(phash[left], phash[right]) <= threshold) & (hamming(dhash[left], dhash[right]) <= threshold)
            found.append(_pair_codes(left[close], right[close], n))
    return _decode(np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64), n)


def _multi_index_pays(n: int, threshold: int) -> bool:
    """Whether chunk keys are long enough to prune: 2 x 64 / (threshold + 1) bits against log2(n) + 4."""
    return n > 4096 and 128 / (threshold + 1) >= np.log2(max(n, 2)) + 4


def _chunk_bounds(threshold: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, 64, threshold + 2).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _chunk(hashes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    mask = np.uint64((1 << (hi - lo)) - 1) if hi - lo < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    return (hashes >> np.uint64(lo)) & mask


def _equal_key_pairs(first: np.ndarray, second: np.ndarray, limit: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Index pairs (i, j), i != j, whose (first, second) keys are equal; (None, None) past ``limit`` pairs."""
    order = np.lexsort((second, first))
    a, b = first[order], second[order]
    starts = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    sizes = np.diff(np.r_[starts, len(order)])
    if int((sizes * (sizes - 1) // 2).sum()) > limit:
        return None, None
    ends = np.repeat(starts + sizes, sizes)  # for each sorted position, the end of its group
    after = ends - np.arange(len(order)) - 1  # group members after it
    left = np.repeat(np.arange(len(order)), after)
    offsets = np.arange(len(left)) - np.repeat(np.cumsum(after) - after, after)
    right = left + 1 + offsets
    return order[left].astype(np.int64), order[right].astype(np.int64)


def _pair_codes(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """One int64 per unordered pair: min * n + max."""
    return np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j).astype(np.int64)


def _decode(codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (codes // max(n, 1)).astype(np.int64), (codes % max(n, 1)).astype(np.int64)


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
    pairs = {(min(i, j), max(i, j)) for i, j in cached}
    if len(fresh):
        left, right = near_duplicate_pairs(phash, dhash, threshold, block=block, rows=fresh)
        pairs.update(zip(left.tolist(), right.tolist()))
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
    threshold: int = DedupSettings.threshold,
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
    threshold: int = DedupSettings.threshold,
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
