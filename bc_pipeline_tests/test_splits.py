"""Group-aware stratified splits on a realistic imbalanced label set, and the checks that prove
them (which must also catch planted violations)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.preparation.splits import (
    SPLIT_COLUMNS,
    SPLITS,
    group_stratified_split,
    groups_crossing_splits,
    ids_crossing_splits,
    make_split_table,
    proportion_gaps,
    proportion_tolerance,
    proportion_violations,
)

# Class sizes of the full PBC / BloodMNIST data (17,092 images), scaled to about 3,000.
PBC_COUNTS = np.array([1218, 3117, 1551, 2895, 1214, 1420, 3329, 2348])
N_ITEMS = 3000


def _manifest(seed: int = 0, groups_per_size: int = 25, mixed_groups: int = 10) -> tuple[pd.DataFrame, dict[int, int]]:
    """~3000 items with PBC class proportions; planted near groups of sizes 2..6 (some of them with
    mixed labels), every other item a singleton group. Returns (manifest, {group: size})."""
    rng = np.random.default_rng(seed)
    counts = np.round(PBC_COUNTS / PBC_COUNTS.sum() * N_ITEMS).astype(int)
    labels = np.repeat(np.arange(8), counts)
    labels = labels[rng.permutation(len(labels))]
    pools = {label: list(np.flatnonzero(labels == label)) for label in range(8)}
    group = np.full(len(labels), -1, dtype=np.int64)
    planted: dict[int, int] = {}
    next_group = 0
    for size in range(2, 7):
        for g in range(groups_per_size):
            if g < mixed_groups // 5:  # a few groups hold two classes
                first, second = rng.choice(8, size=2, replace=False)
                members = [pools[first].pop() for _ in range(size - 1)] + [pools[second].pop()]
            else:
                label = rng.choice(8, p=counts / counts.sum())
                members = [pools[label].pop() for _ in range(size)]
            group[members] = next_group
            planted[next_group] = size
            next_group += 1
    singles = np.flatnonzero(group < 0)
    group[singles] = np.arange(next_group, next_group + len(singles))
    # Shuffle group numbers so they say nothing about size.
    relabel = rng.permutation(group.max() + 1)
    planted = {int(relabel[g]): size for g, size in planted.items()}
    manifest = pd.DataFrame(
        {
            "image_id": [f"{i:016x}" for i in rng.permutation(1 << 20)[: len(labels)]],
            "label": labels.astype(np.int64),
            "near_group": relabel[group].astype(np.int64),
            "source": [f"img{i}.jpg" for i in range(len(labels))],
        }
    )
    return manifest, planted


@pytest.fixture(scope="module")
def manifest_and_groups() -> tuple[pd.DataFrame, dict[int, int]]:
    return _manifest()


@pytest.fixture(scope="module")
def tables(manifest_and_groups) -> dict[int, pd.DataFrame]:
    """Split tables by seed, each made once (a split of 3,000 images takes most of a second)."""
    manifest, _ = manifest_and_groups
    return {seed: make_split_table(manifest, seed=seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def table(tables) -> pd.DataFrame:
    return tables[0]


def test_fixture_is_realistic(manifest_and_groups) -> None:
    manifest, planted = manifest_and_groups
    assert 2950 <= len(manifest) <= 3050
    shares = manifest["label"].value_counts(normalize=True).sort_index().to_numpy()
    assert shares.max() / shares.min() > 2.5  # imbalanced, as PBC is
    assert sorted(set(planted.values())) == [2, 3, 4, 5, 6]
    sizes = manifest.groupby("near_group").size()
    assert all(sizes[g] == size for g, size in planted.items())
    assert (manifest.groupby("near_group")["label"].nunique() > 1).sum() == 10
    assert manifest["image_id"].is_unique


def test_split_table_shape(manifest_and_groups, table: pd.DataFrame) -> None:
    manifest, _ = manifest_and_groups
    assert list(table.columns) == SPLIT_COLUMNS
    assert table["index"].tolist() == list(range(len(manifest)))
    assert table["image_id"].tolist() == manifest["image_id"].tolist()
    assert table["label"].tolist() == manifest["label"].tolist()
    assert table["near_group"].tolist() == manifest["near_group"].tolist()
    assert set(table["split"]) == set(SPLITS)


def test_no_group_crosses_splits(manifest_and_groups, table: pd.DataFrame) -> None:
    _, planted = manifest_and_groups
    assert groups_crossing_splits(table) == []
    assert ids_crossing_splits(table) == []
    per_group = table.groupby("near_group")["split"].nunique()
    assert (per_group == 1).all()
    for group in planted:
        assert table.loc[table["near_group"] == group, "split"].nunique() == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_class_proportions_within_tolerance(tables, seed: int) -> None:
    table = tables[seed]
    assert proportion_violations(table) == {}
    gaps = proportion_gaps(table)
    assert list(gaps.columns) == list(SPLITS)
    assert gaps.abs().to_numpy().max() <= 1.0


def test_split_sizes_near_80_10_10(table: pd.DataFrame) -> None:
    n = len(table)
    shares = table["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.01
    assert abs(shares["val"] - 0.1) < 0.01
    assert abs(shares["test"] - 0.1) < 0.01
    assert table["split"].value_counts().sum() == n


def test_other_fractions_are_followed(manifest_and_groups) -> None:
    manifest, _ = manifest_and_groups
    table = make_split_table(manifest, fractions=(0.6, 0.25, 0.15), seed=4)
    shares = table["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.6) < 0.01
    assert abs(shares["val"] - 0.25) < 0.01
    assert abs(shares["test"] - 0.15) < 0.01
    assert groups_crossing_splits(table) == [] and proportion_violations(table) == {}


def test_deterministic_for_a_seed_different_for_another(manifest_and_groups, tables) -> None:
    manifest, _ = manifest_and_groups
    labels, groups = manifest["label"].to_numpy(), manifest["near_group"].to_numpy()
    again = group_stratified_split(labels, groups, seed=0)
    np.testing.assert_array_equal(again, tables[0]["split"].to_numpy())
    other = tables[1]["split"].to_numpy()
    assert (again != other).sum() > 100
    # Different assignment, same quality.
    for seed in (0, 1):
        assert groups_crossing_splits(tables[seed]) == [] and proportion_violations(tables[seed]) == {}


@pytest.mark.parametrize(
    "fractions",
    [(0.8, 0.2), (0.5, 0.3, 0.3), (1.1, -0.05, -0.05), (0.8, 0.1, 0.05), (0.7, 0.1, 0.1, 0.1)],
)
def test_invalid_fractions_raise(manifest_and_groups, fractions) -> None:
    manifest, _ = manifest_and_groups
    with pytest.raises(ValueError, match="split fractions must be three non-negative numbers summing to 1"):
        group_stratified_split(manifest["label"].to_numpy(), manifest["near_group"].to_numpy(), fractions=fractions)
    with pytest.raises(ValueError, match="split fractions"):
        make_split_table(manifest, fractions=fractions)


def test_group_larger_than_a_split_stays_whole() -> None:
    # 20 images of one class; one near group of 6 is bigger than the val and test targets (2 each).
    labels = np.zeros(20, dtype=np.int64)
    groups = np.array([0] * 6 + list(range(1, 15)))
    split = group_stratified_split(labels, groups, seed=3)
    assert len(set(split[:6])) == 1
    assert set(split) == set(SPLITS)


# --- the checks catch violations ---------------------------------------------------------------


def test_groups_crossing_splits_detects_a_split_group(manifest_and_groups, table: pd.DataFrame) -> None:
    _, planted = manifest_and_groups
    group = next(g for g, size in planted.items() if size == 4)
    broken = table.copy()
    rows = broken.index[broken["near_group"] == group]
    old = broken.loc[rows[0], "split"]
    broken.loc[rows[0], "split"] = "test" if old != "test" else "train"
    assert groups_crossing_splits(broken) == [group]
    # A singleton moved to another split is not a crossing.
    single = broken.index[~broken["near_group"].isin(planted)][0]
    broken.loc[single, "split"] = "val" if broken.loc[single, "split"] != "val" else "train"
    assert groups_crossing_splits(broken) == [group]


def test_ids_crossing_splits_detects_a_copy_in_another_split(table: pd.DataFrame) -> None:
    train_row = table[table["split"] == "train"].iloc[0]
    test_row = table.index[table["split"] == "test"][0]
    broken = table.copy()
    broken.loc[test_row, "image_id"] = train_row["image_id"]
    assert ids_crossing_splits(broken) == [train_row["image_id"]]
    # The same id twice inside one split is not a crossing.
    ok = table.copy()
    train_rows = ok.index[ok["split"] == "train"][:2]
    ok.loc[train_rows[1], "image_id"] = ok.loc[train_rows[0], "image_id"]
    assert ids_crossing_splits(ok) == []


def test_proportion_violations_detects_a_skewed_split(table: pd.DataFrame) -> None:
    broken = table.copy()
    # Move 15 neutrophils (class 6) from test to train: test loses ~5 points of class 6.
    moved = broken.index[(broken["split"] == "test") & (broken["label"] == 6)][:15]
    broken.loc[moved, "split"] = "train"
    violations = proportion_violations(broken)
    assert "test" in violations
    assert violations["test"] > 3.0
    assert "train" not in violations  # 15 of ~2400 images barely move train
    # With a generous tolerance the same split passes.
    assert "test" not in proportion_violations(broken, points=10.0)


def test_proportion_violations_detects_a_missing_class(table: pd.DataFrame) -> None:
    broken = table.copy()
    broken.loc[(broken["split"] == "val") & (broken["label"] == 0), "split"] = "train"
    violations = proportion_violations(broken)
    assert "val" in violations
    overall = table["label"].value_counts(normalize=True)[0] * 100
    assert violations["val"] >= overall - 1.0


def test_proportion_tolerance_for_small_splits() -> None:
    assert proportion_tolerance(1000) == 1.0
    assert proportion_tolerance(100) == 1.0
    assert proportion_tolerance(50) == pytest.approx(2.0)
    assert proportion_tolerance(0) == pytest.approx(100.0)
    assert proportion_tolerance(1000, points=0.5) == 0.5


def test_multi_image_groups_spread_over_all_splits(manifest_and_groups, table: pd.DataFrame) -> None:
    """Near-duplicate groups are not all pushed into train: val and test get their share of them."""
    _, planted = manifest_and_groups
    sizes = table.groupby("near_group").size()
    split_of_group = table.groupby("near_group")["split"].first()
    multi = split_of_group[sizes > 1].value_counts(normalize=True)
    assert len(planted) == int((sizes > 1).sum())
    assert multi.get("val", 0) >= 0.05 and multi.get("test", 0) >= 0.05, multi.to_dict()
    assert multi.get("train", 0) >= 0.6, multi.to_dict()
