"""Balancing strategies on real, deliberately imbalanced pbc96 subsets: counts, provenance, pixels."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bc_pipeline.preparation.balancing import STRATEGIES, balance, parse_strategy, smote, target_counts

# Per-class counts of the imbalanced subset: one class of 2 images forces oversampling past the
# 7 plain symmetries into shifted repeats, and SMOTE down to k=1 / k=2 for the tiny classes.
COUNTS = (20, 12, 8, 2, 5, 16, 3, 10)
PIXELS = 96 * 96 * 3


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def imbalanced(pbc_subset_arrays):
    """Real images with COUNTS per class, shuffled so that the classes are interleaved."""
    images, labels = pbc_subset_arrays
    keep = np.concatenate([np.nonzero(labels == c)[0][:n] for c, n in enumerate(COUNTS)])
    keep = np.random.default_rng(7).permutation(keep)
    return np.ascontiguousarray(images[keep]), labels[keep].astype(np.int64)


@pytest.fixture(scope="module")
def oversampled(imbalanced):
    images, labels = imbalanced
    return balance(images, labels, num_classes=8, strategy="oversample", log=_quiet)


@pytest.fixture(scope="module")
def smoted(imbalanced):
    images, labels = imbalanced
    return balance(images, labels, num_classes=8, strategy="smote", log=_quiet)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_keeps_real_images_first_and_reaches_the_promised_counts(imbalanced, strategy):
    images, labels = imbalanced
    n = len(labels)
    result = balance(images, labels, num_classes=8, strategy=strategy, log=_quiet)
    resampler, weighted = parse_strategy(strategy)

    assert result.images.dtype == np.uint8 and result.images.shape[1:] == images.shape[1:]
    assert len(result.images) == len(result.labels) == len(result.origin) == len(result.source) == len(result.transform)
    np.testing.assert_array_equal(result.images[:n], images)
    np.testing.assert_array_equal(result.labels[:n], labels)

    counts = np.bincount(result.labels, minlength=8)
    if resampler:
        np.testing.assert_array_equal(counts, target_counts(labels, 8, 1.0))
        assert set(counts) == {max(COUNTS)}
    else:
        np.testing.assert_array_equal(counts, COUNTS)
    np.testing.assert_array_equal(result.counts["before"], COUNTS)
    np.testing.assert_array_equal(result.counts["after"], counts)

    assert list(result.origin[:n]) == ["real"] * n and list(result.transform[:n]) == [""] * n
    np.testing.assert_array_equal(result.source[:n], np.arange(n))
    added = slice(n, None)
    assert list(result.origin[added]) == [resampler] * (len(result.labels) - n)
    if resampler == "oversample":
        assert ((result.source[added] >= 0) & (result.source[added] < n)).all()
        np.testing.assert_array_equal(labels[result.source[added]], result.labels[added])
        assert all(result.transform[added])
    if resampler == "smote":
        assert (result.source[added] == -1).all() and not any(result.transform[added])

    if weighted:
        assert set(result.class_weight) == set(range(8))
        mass = [result.class_weight[c] * counts[c] for c in range(8)]
        np.testing.assert_allclose(mass, len(result.labels) / 8)
        np.testing.assert_allclose(result.counts["weight"], [result.class_weight[c] for c in range(8)])
    else:
        assert result.class_weight is None
        assert (result.counts["weight"] == 1.0).all()


@pytest.mark.parametrize("strategy", ["oversample+class_weights", "smote+class_weights"])
def test_partial_target_ratio_raises_minorities_part_way_and_weights_finish(imbalanced, strategy):
    images, labels = imbalanced
    result = balance(images, labels, num_classes=8, strategy=strategy, target_ratio=0.5, log=_quiet)
    counts = np.bincount(result.labels, minlength=8)
    expected = np.maximum(COUNTS, int(np.ceil(0.5 * max(COUNTS))))
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(counts, target_counts(labels, 8, 0.5))
    assert counts.max() == max(COUNTS) and counts.min() == 10 and len(set(counts)) > 1
    mass = [result.class_weight[c] * counts[c] for c in range(8)]
    np.testing.assert_allclose(mass, len(result.labels) / 8)
    assert result.class_weight[0] < 1.0 < result.class_weight[3]


def test_refused_and_unknown_strategies_and_bad_ratios_raise_clearly(imbalanced):
    images, labels = imbalanced
    for refused in ("smote+oversample", "oversample+smote+class_weights"):
        with pytest.raises(ValueError, match="oversampling and SMOTE"):
            balance(images, labels, num_classes=8, strategy=refused, log=_quiet)
    with pytest.raises(ValueError, match="unknown balancing strategy 'undersample'; choose one of none"):
        balance(images, labels, num_classes=8, strategy="undersample", log=_quiet)
    for ratio in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="target_ratio must be in"):
            balance(images, labels, num_classes=8, strategy="oversample", target_ratio=ratio, log=_quiet)
        with pytest.raises(ValueError, match="target_ratio must be in"):
            target_counts(labels, 8, ratio)


def _equal_up_to_shift(variant: np.ndarray, image: np.ndarray, dy: int, dx: int) -> bool:
    """``variant`` is ``image`` moved by (dy, dx), compared where both overlap (borders are fill)."""
    h, w = image.shape[:2]
    out_y, in_y = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    out_x, in_x = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    return np.array_equal(variant[out_y, out_x], image[in_y, in_x])


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(base, k) for base in (image, image[:, ::-1]) for k in range(4)]


def _geometric_match(variant: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """The shift (dy, dx) at which ``variant`` equals some flip / quarter turn of ``image``."""
    symmetries = _symmetries(image)
    for dy, dx in [(0, 0)] + [(y, x) for y in range(-8, 9) for x in range(-8, 9) if y or x]:
        if any(_equal_up_to_shift(variant, s, dy, dx) for s in symmetries):
            return dy, dx
    return None


def test_oversampled_images_are_geometric_variants_of_their_source_and_all_distinct(imbalanced, oversampled):
    images, labels = imbalanced
    n = len(labels)
    assert oversampled.images.dtype == np.uint8
    shifted = 0
    for i in range(n, len(oversampled.labels)):
        variant, source = oversampled.images[i], images[oversampled.source[i]]
        match = _geometric_match(variant, source)
        assert match is not None, f"repeat {i} ({oversampled.transform[i]}) is no flip/turn/shift of its source"
        shifted += match != (0, 0)
        assert not np.array_equal(variant, source)
    assert shifted > 0  # the 2-image class needs more than 7 repeats of each image
    # Real images carry no byte-identical pairs, and no repeat duplicates anything in the result.
    digests = {image.tobytes() for image in oversampled.images}
    assert len(digests) == len(oversampled.images)
    # Repeats are spread evenly over a class's images.
    for c in range(8):
        uses = np.bincount(oversampled.source[n:][oversampled.labels[n:] == c], minlength=n)[labels == c]
        if uses.sum():
            assert uses.max() - uses.min() <= 1


def test_oversampled_shift_names_match_the_geometry(oversampled):
    n = int((oversampled.origin == "real").sum())
    for i in range(n, len(oversampled.labels)):
        name = oversampled.transform[i]
        match = _geometric_match(oversampled.images[i], oversampled.images[oversampled.source[i]])
        if "shift(" in name:
            dy, dx = (int(v) for v in name.split("shift(")[1].rstrip(")").split(","))
            assert (dy, dx) != (0, 0) and match == (dy, dx), name
        else:
            assert match == (0, 0) and name != "rot0"


def _class_segments(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each synthetic s: the smallest RMS residual of s = a + t (b - a), t in [0, 1], over real pairs.

    Returns (residual RMS per synthetic, best t per synthetic, RMS distances between real pairs).
    Gram-matrix form: uint8 pixels make every inner product an exact integer in float64.
    """
    z = np.concatenate([real, synthetic]).reshape(len(real) + len(synthetic), -1).astype(np.float64)
    g = z @ z.T
    m = len(real)
    aa = np.diag(g)[:m]
    ab = g[:m, :m]
    nn = aa[:, None] + aa[None, :] - 2 * ab  # |b - a|^2
    residuals, ts = [], []
    for s in range(m, len(z)):
        sa = g[s, :m]
        dot = sa[None, :] - sa[:, None] - ab + aa[:, None]  # <s - a, b - a>, a along rows
        vv = g[s, s] - 2 * sa + aa  # |s - a|^2
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.clip(np.where(nn > 0, dot / nn, 0.0), 0.0, 1.0)
        r2 = vv[:, None] - 2 * t * dot + t**2 * nn
        best = np.unravel_index(np.argmin(r2), r2.shape)
        residuals.append(np.sqrt(max(r2[best], 0.0) / z.shape[1]))
        ts.append(t[best])
    pairs = nn[np.triu_indices(m, 1)]
    return np.array(residuals), np.array(ts), np.sqrt(pairs / z.shape[1])


def test_smote_samples_lie_on_segments_between_two_real_images_of_their_class(imbalanced, smoted):
    images, labels = imbalanced
    n = len(labels)
    assert smoted.images.dtype == np.uint8
    for c in range(8):
        synthetic = smoted.images[n:][smoted.labels[n:] == c]
        if not len(synthetic):
            continue
        real = images[labels == c]
        residual, t, real_gaps = _class_segments(real, synthetic)
        assert residual.max() < 1.0, f"class {c}: a SMOTE sample is off every segment (RMS {residual.max():.2f})"
        assert np.median(real_gaps) > 10.0  # real images are far apart, so a residual < 1 means something
        assert 0 < np.median(t) < 1
        # Not copies of real images: every sample differs from all of them, most of them by a lot.
        flat_real = real.reshape(len(real), -1).astype(np.float32)
        nearest = [np.sqrt(((flat_real - s) ** 2).mean(axis=1)).min() for s in synthetic.reshape(len(synthetic), -1)]
        assert min(nearest) > 0.0 and np.median(nearest) > 3.0


def test_smote_samples_of_other_classes_are_off_this_class_segments(imbalanced, smoted):
    images, labels = imbalanced
    n = len(labels)
    # The same residual measured against the wrong class is far above 1: the segment test has teeth.
    wrong = smoted.images[n:][smoted.labels[n:] == 3]
    residual, _, _ = _class_segments(images[labels == 0], wrong)
    assert residual.min() > 5.0


def test_smote_stays_within_the_per_pixel_range_of_its_class(imbalanced, smoted):
    images, labels = imbalanced
    n = len(labels)
    for c in range(8):
        synthetic = smoted.images[n:][smoted.labels[n:] == c]
        if not len(synthetic):
            continue
        real = images[labels == c]
        assert (synthetic >= real.min(axis=0)).all() and (synthetic <= real.max(axis=0)).all()
    # The class range is a real constraint: the whole split's range is much wider than class 3's.
    tiny = images[labels == 3]
    assert (tiny.max(axis=0).astype(int) - tiny.min(axis=0)).mean() < (images.max(axis=0).astype(int) - images.min(axis=0)).mean()


def test_smote_needs_two_images_of_a_class_and_shrinks_k_for_tiny_classes(pbc_subset_arrays):
    images, labels = pbc_subset_arrays
    first = [np.nonzero(labels == c)[0] for c in (0, 1)]
    lonely = np.concatenate([first[0][:6], first[1][:1]])
    with pytest.raises(ValueError, match="at least 2 images of class 1, found 1"):
        balance(images[lonely], labels[lonely], num_classes=8, strategy="smote", log=_quiet)

    few = np.concatenate([first[0][:6], first[1][:3]])
    lines: list[str] = []
    result = balance(images[few], labels[few], num_classes=8, strategy="smote", log=lines.append)
    np.testing.assert_array_equal(np.bincount(result.labels, minlength=8)[:2], [6, 6])
    assert lines == ["smote: class 1 3 -> 6 (3 synthetic, k=2)"]
    residual, _, _ = _class_segments(images[first[1][:3]], result.images[9:])
    assert residual.max() < 1.0


def test_resampling_is_reproducible_for_a_seed(imbalanced, oversampled, smoted):
    images, labels = imbalanced
    for strategy, first in (("oversample", oversampled), ("smote", smoted)):
        again = balance(images, labels, num_classes=8, strategy=strategy, seed=0, log=_quiet)
        np.testing.assert_array_equal(again.images, first.images)
        other = balance(images, labels, num_classes=8, strategy=strategy, seed=1, log=_quiet)
        assert not np.array_equal(other.images, first.images)


def test_smote_memory_peaks_at_one_class_not_the_whole_split(pbc_subset_arrays):
    import imblearn.over_sampling  # noqa: F401  (imported first so that the import is not measured)

    images, labels = pbc_subset_arrays
    keep = np.concatenate([np.nonzero(labels == c)[0][: 40 if c < 4 else 6] for c in range(8)])
    images, labels = images[keep], labels[keep]
    goal = target_counts(labels, 8, 0.3)
    np.testing.assert_array_equal(goal, [40] * 4 + [12] * 4)
    whole_float32 = images.size * 4
    tracemalloc.start()
    try:
        made, made_labels = smote(images, labels, goal, log=_quiet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.bincount(made_labels, minlength=8), [0] * 4 + [6] * 4)
    assert made.dtype == np.uint8
    # Converting the whole split to float32 would alone reach 1x; one small class stays well below.
    assert peak < whole_float32, f"peak {peak / 1e6:.1f} MB vs whole split as float32 {whole_float32 / 1e6:.1f} MB"
