"""Duplicate detection on real PBC images with planted exact copies, near copies (JPEG re-encode,
brightness shift) and label conflicts; the blocked pair search against a brute-force reference;
and the cleaning step that acts on the groups."""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bc_pipeline.ingest.loaders import image_id
from bc_pipeline.quality.cleaning import EXACT_DUPLICATE, LABEL_CONFLICT, REMOVED_COLUMNS, removal_counts, select_clean
from bc_pipeline.quality.dedup import (
    DUPLICATE_COLUMNS,
    NearPairs,
    all_pairs,
    duplicate_counts,
    find_duplicates,
    find_duplicates_cached,
    multi_index_pairs,
    near_duplicate_pairs,
    summarize_groups,
)
from bc_pipeline.quality.hashing import compute_hashes, hamming

THRESHOLD = 4


# --- perturbations -----------------------------------------------------------------------------


def jpeg90(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def brighter(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int16) + 2, 0, 255).astype(np.uint8)


def darker(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int16) - 2, 0, 255).astype(np.uint8)


def _distances(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    (pa, pb), (da, db) = compute_hashes(np.stack([a, b]), workers=1)
    return int(hamming(pa, pb)), int(hamming(da, db))


# --- the planted data set ----------------------------------------------------------------------


@dataclass
class Planted:
    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    phash: np.ndarray
    dhash: np.ndarray
    exact_key: list[str]  # items with equal keys must share an exact group, and only they
    near_key: list[str]  # likewise for near groups
    plants: dict[str, list[int]]  # planted group name -> positions (after shuffling)


@pytest.fixture(scope="module")
def distinct_real(pbc_subset_arrays) -> tuple[np.ndarray, np.ndarray]:
    """80 real images (10 per class) that are pairwise far apart: for every pair, phash or dhash
    differs in more than 2 * THRESHOLD bits, so no perturbed copy can be near a second image."""
    images, labels = pbc_subset_arrays
    phash, dhash = compute_hashes(images, workers=1)
    chosen: list[int] = []
    per_class: dict[int, int] = {}
    for i in range(len(images)):
        if per_class.get(int(labels[i]), 0) >= 10:
            continue
        if chosen:
            close = (hamming(phash[i], phash[chosen]) <= 2 * THRESHOLD) & (
                hamming(dhash[i], dhash[chosen]) <= 2 * THRESHOLD
            )
            if close.any():
                continue
        chosen.append(i)
        per_class[int(labels[i])] = per_class.get(int(labels[i]), 0) + 1
    assert len(chosen) == 80, "the real subset should hold 80 clearly distinct images"
    return images[chosen], labels[chosen]


def _best_near_copy(base: np.ndarray, candidates: list[int], perturb) -> tuple[int, np.ndarray, int]:
    """Among candidate base images, the one whose perturbed copy is furthest away while still within
    THRESHOLD on both hashes (so the threshold itself is exercised), with that copy."""
    best = None
    for k in candidates:
        copy = perturb(base[k])
        assert not np.array_equal(copy, base[k]), "a near copy must differ in pixels"
        dp, dd = _distances(base[k], copy)
        if dp <= THRESHOLD and dd <= THRESHOLD and (best is None or max(dp, dd) > best[2]):
            best = (k, copy, max(dp, dd))
    assert best is not None, f"no candidate stays within {THRESHOLD} bits under {perturb.__name__}"
    return best


@pytest.fixture(scope="module")
def planted(distinct_real) -> Planted:
    base, base_labels = distinct_real
    other = lambda label: (int(label) + 3) % 8  # noqa: E731

    items: list[tuple[np.ndarray, int, str, str, str]] = []  # pixels, label, exact key, near key, plant
    for k in range(len(base)):
        items.append((base[k], int(base_labels[k]), f"b{k}", f"b{k}", ""))
    groups = {k: f"b{k}" for k in range(len(base))}

    def plant(k: int, pixels: np.ndarray, label: int, *, exact: bool, name: str) -> None:
        exact_key = groups[k] if exact else f"{name}-copy"
        items.append((pixels, label, exact_key, groups[k], name))

    # Exact copies: a group of 3 and a group of 2.
    plant(0, base[0].copy(), int(base_labels[0]), exact=True, name="exact3")
    plant(0, base[0].copy(), int(base_labels[0]), exact=True, name="exact3")
    plant(11, base[11].copy(), int(base_labels[11]), exact=True, name="exact2")
    # Label conflict: an exact copy labelled as another class.
    plant(22, base[22].copy(), other(base_labels[22]), exact=True, name="conflict")
    # Near copies, each verified within THRESHOLD bits on both hashes.
    k, copy, _ = _best_near_copy(base, list(range(30, 40)), brighter)
    plant(k, copy, int(base_labels[k]), exact=False, name="near_bright")
    k, copy, _ = _best_near_copy(base, list(range(40, 50)), jpeg90)
    plant(k, copy, int(base_labels[k]), exact=False, name="near_jpeg")
    # A near copy with another label: a near conflict, but not an exact (label) conflict.
    k, copy, _ = _best_near_copy(base, list(range(50, 60)), darker)
    plant(k, copy, other(base_labels[k]), exact=False, name="near_mixed")
    # A near copy and an exact copy of the same image: one near group holding two exact groups.
    k, copy, _ = _best_near_copy(base, list(range(60, 70)), jpeg90)
    plant(k, copy, int(base_labels[k]), exact=False, name="near_and_exact")
    plant(k, base[k].copy(), int(base_labels[k]), exact=True, name="near_and_exact")

    # Name the originals of each plant after it, too.
    planted_keys = {}
    for _, _, _, near_key, name in items:
        if name:
            planted_keys.setdefault(near_key, name)
    items = [
        (px, lab, ek, nk, name or planted_keys.get(nk, "")) for px, lab, ek, nk, name in items
    ]

    order = np.random.default_rng(5).permutation(len(items))
    items = [items[i] for i in order]
    images = np.stack([item[0] for item in items])
    labels = np.array([item[1] for item in items], dtype=np.int64)
    phash, dhash = compute_hashes(images, workers=1)
    plants: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        if item[4]:
            plants.setdefault(item[4], []).append(position)
    return Planted(
        images=images,
        labels=labels,
        ids=[image_id(px) for px in images],
        phash=phash,
        dhash=dhash,
        exact_key=[item[2] for item in items],
        near_key=[item[3] for item in items],
        plants=plants,
    )


def _partition(keys) -> set[frozenset[int]]:
    blocks: dict = {}
    for position, key in enumerate(keys):
        blocks.setdefault(key, set()).add(position)
    return {frozenset(block) for block in blocks.values()}


# --- find_duplicates on the planted set --------------------------------------------------------


def test_plants_are_what_they_claim(planted: Planted) -> None:
    assert {name: len(pos) for name, pos in planted.plants.items()} == {
        "exact3": 3,
        "exact2": 2,
        "conflict": 2,
        "near_bright": 2,
        "near_jpeg": 2,
        "near_mixed": 2,
        "near_and_exact": 3,
    }
    for name, positions in planted.plants.items():
        if name.startswith("near"):
            p, d = planted.phash[positions], planted.dhash[positions]
            assert hamming(p[:, None], p[None, :]).max() <= THRESHOLD
            assert hamming(d[:, None], d[None, :]).max() <= THRESHOLD
            assert len({planted.ids[i] for i in positions}) >= 2, f"{name}: not only exact copies"
    # The threshold is really exercised: at least one near copy is not hash-identical.
    near_positions = [i for n, pos in planted.plants.items() if n.startswith("near") for i in pos]
    assert len({(int(planted.phash[i]), int(planted.dhash[i])) for i in near_positions}) > 4


def test_find_duplicates_finds_every_exact_group_and_nothing_else(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)

    assert list(table.columns) == DUPLICATE_COLUMNS
    assert table["index"].tolist() == list(range(len(planted.ids)))
    assert _partition(table["exact_group"]) == _partition(planted.exact_key)
    sizes = table.groupby("exact_group")["index"].transform("size")
    assert (table["exact_size"] == sizes).all()
    assert sorted(table.loc[table["exact_size"] > 1, "exact_size"].value_counts().to_dict().items()) == [(2, 6), (3, 3)]


def test_find_duplicates_finds_every_near_group_and_nothing_else(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)

    assert _partition(table["near_group"]) == _partition(planted.near_key)
    for name, positions in planted.plants.items():
        assert table.loc[positions, "near_group"].nunique() == 1, name
        assert (table.loc[positions, "near_size"] == len(positions)).all(), name
    # Untouched distinct images stay singletons.
    planted_positions = {i for pos in planted.plants.values() for i in pos}
    untouched = table.drop(index=sorted(planted_positions))
    assert len(untouched) == 80 - len(planted.plants)
    assert (untouched["near_size"] == 1).all() and (untouched["exact_size"] == 1).all()
    # Every exact group lies inside one near group.
    assert (table.groupby("exact_group")["near_group"].nunique() == 1).all()


@pytest.mark.parametrize("known_share", [0.0, 0.5, 0.9, 1.0])
def test_a_search_that_reuses_cached_pairs_equals_a_full_search(planted: Planted, known_share: float) -> None:
    """Whichever images were seen before (a share of every planted group among them), same result."""
    ids, labels = np.asarray(planted.ids), np.asarray(planted.labels)
    full = find_duplicates(ids, labels, planted.phash, planted.dhash, threshold=THRESHOLD)
    seen = np.random.default_rng(3).random(len(ids)) < known_share
    _, before, _ = find_duplicates_cached(
        ids[seen], labels[seen], planted.phash[seen], planted.dhash[seen], threshold=THRESHOLD, known=None
    )
    before = NearPairs.from_frame(before.to_frame())  # through the cache's table form
    table, after, compared = find_duplicates_cached(
        ids, labels, planted.phash, planted.dhash, threshold=THRESHOLD, known=before
    )
    pd.testing.assert_frame_equal(table, full)
    assert compared == len(set(ids) - set(ids[seen])), "only ids the cache lacks are compared"
    assert sorted(after.ids) == sorted(set(ids))


def test_cached_pairs_of_removed_images_or_another_threshold_are_not_used(planted: Planted) -> None:
    ids, labels = np.asarray(planted.ids), np.asarray(planted.labels)
    _, everything, _ = find_duplicates_cached(ids, labels, planted.phash, planted.dhash, threshold=THRESHOLD, known=None)
    keep = np.ones(len(ids), dtype=bool)
    keep[planted.plants["near_jpeg"][1:]] = False  # the near copy leaves: its partner is alone again
    table, _, compared = find_duplicates_cached(
        ids[keep], labels[keep], planted.phash[keep], planted.dhash[keep], threshold=THRESHOLD, known=everything
    )
    assert compared == 0
    pd.testing.assert_frame_equal(table, find_duplicates(ids[keep], labels[keep], planted.phash[keep], planted.dhash[keep], threshold=THRESHOLD))
    _, _, compared = find_duplicates_cached(ids, labels, planted.phash, planted.dhash, threshold=THRESHOLD + 1, known=everything)
    assert compared == len(set(ids)), "a cache made at another threshold is ignored"


def test_groups_are_numbered_by_first_appearance(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)
    for column in ("exact_group", "near_group"):
        first_seen = pd.unique(table[column])
        assert first_seen.tolist() == list(range(len(first_seen))), column


def test_exact_conflict_flags_exactly_the_conflicting_copies(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)

    conflict = planted.plants["conflict"]
    assert sorted(np.flatnonzero(table["exact_conflict"].to_numpy())) == sorted(conflict)
    assert table.loc[conflict, "label"].nunique() == 2
    near_conflicts = sorted(conflict + planted.plants["near_mixed"])
    assert sorted(np.flatnonzero(table["near_conflict"].to_numpy())) == near_conflicts


def test_threshold_zero_keeps_only_hash_identical_copies(planted: Planted) -> None:
    strict = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=0)
    # Exact groups never depend on the threshold.
    assert _partition(strict["exact_group"]) == _partition(planted.exact_key)
    for name in ("near_bright", "near_jpeg", "near_mixed"):
        a, b = planted.plants[name]
        same_hashes = planted.phash[a] == planted.phash[b] and planted.dhash[a] == planted.dhash[b]
        assert (strict.at[a, "near_group"] == strict.at[b, "near_group"]) == same_hashes, name


def test_summarize_groups_matches_the_plants(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)

    exact = summarize_groups(table, "exact")
    assert exact["size"].tolist() == [3, 2, 2, 2]
    exact_members = {frozenset(m) for m in exact["members"]}
    p = planted.plants
    near_and_exact_copies = [i for i in p["near_and_exact"] if planted.exact_key[i] == planted.near_key[i]]
    assert exact_members == {
        frozenset(p["exact3"]),
        frozenset(p["exact2"]),
        frozenset(p["conflict"]),
        frozenset(near_and_exact_copies),
    }
    conflict_row = exact[exact["conflict"]]
    assert len(conflict_row) == 1
    assert set(conflict_row["members"].iat[0]) == set(p["conflict"])
    assert conflict_row["labels"].iat[0] == sorted(set(planted.labels[p["conflict"]].tolist()))

    near = summarize_groups(table, "near")
    assert sorted(near["size"].tolist(), reverse=True) == [3, 3, 2, 2, 2, 2, 2]
    assert {frozenset(m) for m in near["members"]} == {frozenset(pos) for pos in p.values()}
    assert int(near["conflict"].sum()) == 2
    assert near["size"].is_monotonic_decreasing


def test_duplicate_counts_match_the_plants(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)
    assert duplicate_counts(table) == {
        "images": len(planted.ids),
        "exact_groups": 4,  # exact3, exact2, conflict, the exact copy inside near_and_exact
        "exact_duplicate_images": 2 + 1 + 1 + 1,
        "near_groups": 4,  # near_bright, near_jpeg, near_mixed, near_and_exact
        "near_groups_incl_exact": 7,
        "label_conflict_groups": 1,
        "near_groups_with_mixed_labels": 2,  # conflict, near_mixed
    }


def test_untouched_distinct_images_have_no_groups(distinct_real) -> None:
    images, labels = distinct_real
    phash, dhash = compute_hashes(images, workers=1)
    table = find_duplicates([image_id(x) for x in images], labels, phash, dhash, threshold=THRESHOLD)
    assert table["exact_group"].nunique() == table["near_group"].nunique() == len(images)
    assert summarize_groups(table, "exact").empty and summarize_groups(table, "near").empty
    counts = duplicate_counts(table)
    assert counts["images"] == 80 and sum(v for k, v in counts.items() if k != "images") == 0


def test_find_duplicates_rejects_bad_arguments() -> None:
    hashes = np.zeros(3, np.uint64)
    with pytest.raises(ValueError, match="threshold must be between 0 and 64"):
        find_duplicates(["a", "b", "c"], [0, 0, 0], hashes, hashes, threshold=65)
    with pytest.raises(ValueError, match="threshold must be between 0 and 64"):
        find_duplicates(["a", "b", "c"], [0, 0, 0], hashes, hashes, threshold=-1)
    with pytest.raises(ValueError, match="one entry per image"):
        find_duplicates(["a", "b"], [0, 0, 0], hashes, hashes)


def test_near_groups_join_chains_transitively() -> None:
    # a-b: 3 bits, b-c: 3 bits, a-c: 6 bits. With threshold 3 all three form one group.
    phash = np.array([0b000000, 0b000111, 0b111111, 0xFFFF_0000_0000_0000], dtype=np.uint64)
    dhash = phash.copy()
    table = find_duplicates(["a", "b", "c", "d"], [0, 0, 1, 0], phash, dhash, threshold=3)
    assert table["near_group"].tolist() == [0, 0, 0, 1]
    assert table["near_size"].tolist() == [3, 3, 3, 1]
    assert table["near_conflict"].tolist() == [True, True, True, False]
    # phash close but dhash far: not a near duplicate (both hashes must agree).
    far_d = dhash.copy()
    far_d[1] = 0xFFFF_FFFF_FFFF_FFFF
    table = find_duplicates(["a", "b", "c", "d"], [0, 0, 1, 0], phash, far_d, threshold=3)
    assert table["near_group"].tolist() == [0, 1, 2, 3]


# --- near_duplicate_pairs against brute force --------------------------------------------------


def _clustered_hashes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes in clusters (a centre with ~10% of its bits flipped), some random, some repeated."""
    rng = np.random.default_rng(seed)
    weights = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)

    def pack(bits: np.ndarray) -> np.ndarray:
        return (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)

    cluster = rng.integers(0, 8, size=n)  # the same clusters for both hashes
    out = []
    for _ in range(2):
        centres = rng.random((8, 64)) < 0.5
        flips = rng.random((n, 64)) < 0.1
        bits = centres[cluster] ^ flips
        bits[-20:] = rng.random((20, 64)) < 0.5  # unrelated hashes
        out.append(pack(bits))
    phash, dhash = out
    phash[5], dhash[5] = phash[4], dhash[4]  # hash-identical pair
    phash[9], dhash[9] = phash[4], dhash[4]
    return phash, dhash


def _brute_force(phash: np.ndarray, dhash: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    pairs = set()
    for i, j in itertools.combinations(range(len(phash)), 2):
        dp = bin(int(phash[i]) ^ int(phash[j])).count("1")
        dd = bin(int(dhash[i]) ^ int(dhash[j])).count("1")
        if dp <= threshold and dd <= threshold:
            pairs.add((i, j))
    return pairs


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    return _clustered_hashes(150, seed=1)


@pytest.mark.parametrize("threshold", [0, 12, 20, 64])
@pytest.mark.parametrize("block", [1, 7, 64, 149, 150, 2048])
def test_near_duplicate_pairs_equal_brute_force(clustered, threshold: int, block: int) -> None:
    phash, dhash = clustered
    expected = _brute_force(phash, dhash, threshold)
    left, right = near_duplicate_pairs(phash, dhash, threshold, block=block)

    assert left.dtype == np.int64 and right.dtype == np.int64
    assert (left < right).all()
    found = list(zip(left.tolist(), right.tolist()))
    assert len(found) == len(set(found)), "no pair may be reported twice"
    assert set(found) == expected
    if threshold == 20:
        assert 500 < len(expected) < 150 * 149 // 2, "the data should give many pairs, not all"
    if threshold == 64:
        assert len(expected) == 150 * 149 // 2


def test_near_duplicate_pairs_default_block_and_empty_input(clustered) -> None:
    phash, dhash = clustered
    left, right = near_duplicate_pairs(phash, dhash, 20)
    assert set(zip(left.tolist(), right.tolist())) == _brute_force(phash, dhash, 20)
    empty = np.zeros(0, np.uint64)
    left, right = near_duplicate_pairs(empty, empty, 4)
    assert left.shape == right.shape == (0,)


@pytest.mark.parametrize("threshold", [0, 1, 4, 7, 12])
def test_multi_index_search_equals_brute_force_on_clustered_hashes(clustered, threshold: int) -> None:
    """Every pair, and only pairs, within the threshold on both hashes; also restricted to some rows."""
    phash, dhash = clustered
    expected = _brute_force(phash, dhash, threshold)
    left, right = multi_index_pairs(phash, dhash, threshold)
    assert set(zip(left.tolist(), right.tolist())) == expected and (left < right).all()
    rows = np.array([4, 9, 30, 149])
    left, right = multi_index_pairs(phash, dhash, threshold, rows=rows)
    assert set(zip(left.tolist(), right.tolist())) == {(i, j) for i, j in expected if i in rows or j in rows}


def _planted_hashes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random hashes with a tenth of them near copies of others (0-8 bits flipped in each hash)."""
    rng = np.random.default_rng(seed)
    phash = rng.integers(0, 2**64, n, dtype=np.uint64)
    dhash = rng.integers(0, 2**64, n, dtype=np.uint64)
    copies = rng.integers(0, n, (n // 10, 2))
    for source, target in copies:
        for hashes in (phash, dhash):
            flips = rng.choice(64, rng.integers(0, 9), replace=False)
            hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flips))
    return phash, dhash


@pytest.mark.parametrize(("n", "threshold", "seed"), [(5000, 0, 0), (5000, 3, 1), (6000, 4, 2), (6000, 6, 3), (4500, 9, 4)])
def test_near_duplicate_search_is_identical_to_all_pairs_across_generated_sets(n: int, threshold: int, seed: int) -> None:
    phash, dhash = _planted_hashes(n, seed)
    expected = all_pairs(phash, dhash, threshold)
    assert len(expected[0]) > 0, "the planted copies should give pairs"
    for found in (near_duplicate_pairs(phash, dhash, threshold), multi_index_pairs(phash, dhash, threshold)):
        np.testing.assert_array_equal(found[0], expected[0])
        np.testing.assert_array_equal(found[1], expected[1])
    rows = np.random.default_rng(seed).choice(n, 100, replace=False)  # the incremental search
    expected_rows = all_pairs(phash, dhash, threshold, rows=rows)
    np.testing.assert_array_equal(np.stack(near_duplicate_pairs(phash, dhash, threshold, rows=rows)), np.stack(expected_rows))


def test_very_clustered_hashes_fall_back_to_all_pairs_with_the_same_result() -> None:
    phash, dhash = _clustered_hashes(5000, seed=2)  # 8 clusters: chunk keys barely prune
    assert multi_index_pairs(phash, dhash, 4, max_candidates=10_000) is None
    np.testing.assert_array_equal(np.stack(near_duplicate_pairs(phash, dhash, 4)), np.stack(all_pairs(phash, dhash, 4)))


def test_near_groups_equal_components_of_brute_force_pairs(clustered) -> None:
    phash, dhash = clustered
    n = len(phash)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in _brute_force(phash, dhash, 12):
        parent[root(i)] = root(j)
    ids = [f"id{i}" for i in range(n)]
    table = find_duplicates(ids, np.zeros(n, np.int64), phash, dhash, threshold=12)
    assert _partition(table["near_group"]) == _partition([root(i) for i in range(n)])
    assert 1 < table["near_group"].nunique() < n


# --- cleaning ----------------------------------------------------------------------------------


def test_select_clean_keeps_one_per_exact_group_and_drops_conflicts(planted: Planted) -> None:
    table = find_duplicates(planted.ids, planted.labels, planted.phash, planted.dhash, threshold=THRESHOLD)
    keep, removed = select_clean(table)

    p = planted.plants
    conflict = sorted(p["conflict"])
    exact_sets = [
        sorted(p["exact3"]),
        sorted(p["exact2"]),
        sorted(i for i in p["near_and_exact"] if planted.exact_key[i] == planted.near_key[i]),
    ]
    repeats = sorted(i for group in exact_sets for i in group[1:])
    expected_removed = sorted(conflict + repeats)

    assert list(removed.columns) == REMOVED_COLUMNS
    assert removed["index"].tolist() == expected_removed
    assert keep.dtype == np.int64
    assert keep.tolist() == sorted(set(range(len(planted.ids))) - set(expected_removed))
    # One image of every non-conflicting exact group survives; no conflicting one does.
    kept_ids = [planted.ids[i] for i in keep]
    assert len(kept_ids) == len(set(kept_ids))
    assert set(kept_ids) == set(planted.ids) - {planted.ids[conflict[0]]}
    # Near copies are kept (the split keeps them together instead).
    for name in ("near_bright", "near_jpeg", "near_mixed"):
        assert set(p[name]) <= set(keep.tolist()), name

    kinds = dict(zip(removed["index"], removed["kind"]))
    reasons = dict(zip(removed["index"], removed["reason"]))
    labels = sorted(set(planted.labels[conflict].tolist()))
    for i in conflict:
        assert kinds[i] == LABEL_CONFLICT
        assert reasons[i] == f"identical image labelled {labels}"
    for group in exact_sets:
        for i in group[1:]:
            assert kinds[i] == EXACT_DUPLICATE
            assert reasons[i] == f"same pixels as image {group[0]}"
    assert removed["image_id"].tolist() == [planted.ids[i] for i in expected_removed]
    assert removed["label"].tolist() == planted.labels[expected_removed].tolist()
    assert removal_counts(removed) == {EXACT_DUPLICATE: len(repeats), LABEL_CONFLICT: 2}


def test_select_clean_conflict_group_of_three_dropped_entirely() -> None:
    # ids: x (labels 0, 0, 1) is a conflict group of three; y twice is a plain duplicate.
    ids = ["x", "y", "x", "z", "y", "x"]
    labels = [0, 2, 0, 3, 2, 1]
    hashes = np.arange(6, dtype=np.uint64) << np.uint64(20)  # all far apart
    table = find_duplicates(ids, labels, hashes, hashes, threshold=0)
    keep, removed = select_clean(table)
    assert keep.tolist() == [1, 3]
    assert removed["index"].tolist() == [0, 2, 4, 5]
    assert removed["kind"].tolist() == [LABEL_CONFLICT, LABEL_CONFLICT, EXACT_DUPLICATE, LABEL_CONFLICT]
    assert removed["reason"].tolist()[0] == "identical image labelled [0, 1]"
    assert removed["reason"].tolist()[2] == "same pixels as image 1"
    # Row order of the input table does not matter.
    keep2, removed2 = select_clean(table.sample(frac=1.0, random_state=0))
    assert keep2.tolist() == keep.tolist()
    pd.testing.assert_frame_equal(removed2, removed)
