"""Augmentation presets, batch mixers and the training input pipeline on real pbc96 images; shard artifacts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.augmentation.presets import (
    BATCH_PRESETS,
    IMAGE_PRESETS,
    PRESETS,
    augment_images,
    check_image_preset,
)
from bc_pipeline.training.worker.data import BatchRecipe, ImagePool, evaluation_batches, mix_batch, training_batches


@pytest.fixture(scope="module")
def images32(pbc_subset_arrays):
    """4 real images of each class (32), classes in blocks; and their labels."""
    images, labels = pbc_subset_arrays
    keep = np.concatenate([np.nonzero(labels == c)[0][:4] for c in range(8)])
    return np.ascontiguousarray(images[keep]), labels[keep].astype(np.int64)


@pytest.fixture(scope="module")
def augmented(images32):
    """preset -> (input copy taken before the call, output); each preset runs once per module."""
    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(preset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if preset not in cache:
            images = images32[0].copy()
            before = images.copy()
            cache[preset] = (before, images, augment_images(images, preset, seed=0))
        return cache[preset]

    return get


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("preset", IMAGE_PRESETS)
def test_image_preset_changes_real_images_plausibly_and_leaves_the_input_alone(augmented, preset):
    before, images, out = augmented(preset)
    np.testing.assert_array_equal(images, before)  # the caller's array is untouched
    assert out.shape == before.shape and out.dtype == np.uint8
    per_image = np.abs(out.astype(np.float32) - before).mean(axis=(1, 2, 3))
    assert per_image.mean() > 5.0, f"{preset} barely changes the images ({per_image.mean():.2f})"
    assert (per_image > 0.5).mean() >= 0.75, f"{preset} leaves most images as they were"
    # Still blood-cell images: bright smear background, not black or saturated frames.
    assert 100 < out.mean() < 235, f"{preset}: mean pixel {out.mean():.1f} (input {before.mean():.1f})"
    assert (out.mean(axis=(1, 2, 3)) < 20).mean() <= 0.25
    assert (out == 0).all(axis=-1).mean() < 0.3
    assert np.median(out.std(axis=(1, 2, 3))) > 10


def _distances(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """d[i, j]: mean absolute pixel difference between output i and input j."""
    flat_out = out.reshape(len(out), -1).astype(np.float32)
    flat_in = images.reshape(len(images), -1).astype(np.float32)
    return np.stack([np.abs(flat_in - row).mean(axis=1) for row in flat_out])


def test_gridmask_keeps_the_image_order(augmented):
    before, _, out = augmented("gridmask")
    d = _distances(out, before)
    # Holes leave the rest of each image in place: every output is nearest to its own input.
    assert (d.argmin(axis=1) == np.arange(len(before))).mean() >= 0.9
    off = d[~np.eye(len(d), dtype=bool)].mean()
    assert np.diag(d).mean() < 0.6 * off
    # The same measure on a shuffled order does not pass: the check has teeth.
    shuffled = _distances(out[::-1], before)
    assert (shuffled.argmin(axis=1) == np.arange(len(before))).mean() < 0.5


@pytest.mark.parametrize("preset", ["light", "categorical"])
def test_geometric_presets_keep_each_output_closer_to_its_own_input(augmented, preset):
    before, _, out = augmented(preset)
    d = _distances(out, before)
    off = d[~np.eye(len(d), dtype=bool)].mean()
    assert np.diag(d).mean() < 0.93 * off, f"{preset}: own {np.diag(d).mean():.1f} vs others {off:.1f}"
    reversed_d = _distances(out[::-1], before)
    assert np.diag(reversed_d).mean() > 0.95 * off


def test_noise_preset_draws_a_new_strength_per_image():
    flat = np.full((256, 24, 24, 3), 128, np.uint8)  # mid-grey: no clipping hides the noise
    deviation = (augment_images(flat, "noise", seed=3).astype(np.float32) - 128).std(axis=(1, 2, 3))
    # Uniform strengths from 0 to 0.4 x 255 (102): faint and heavy noise in one copy. Clipping to
    # [0, 255] trims the heaviest (a deviation of 102 around 128 keeps about 84).
    assert deviation.min() < 8 and deviation.max() > 70
    assert 35 < deviation.mean() < 60
    assert np.corrcoef(np.sort(deviation), np.linspace(0, 1, len(deviation)))[0, 1] > 0.97


def test_focus_preset_blurs_each_cell_by_its_own_amount_and_moves_nothing(augmented):
    before, _, out = augmented("focus")

    def detail(x: np.ndarray) -> np.ndarray:  # high-frequency energy per image
        x = x.astype(np.float32).mean(axis=-1)
        return (np.diff(x, axis=1) ** 2).mean(axis=(1, 2)) + (np.diff(x, axis=2) ** 2).mean(axis=(1, 2))

    kept = detail(out) / detail(before)
    assert kept.max() > 0.95 and kept.min() < 0.2, "sharp and heavily blurred cells in one copy"
    assert (kept <= 1.01).all(), "blurring never adds detail"
    d = _distances(out, before)
    assert (d.argmin(axis=1) == np.arange(len(before))).all(), "no geometric change: each output is its own input"


def test_pixmix_overlays_structure_on_most_cells_but_keeps_each_cell(images32):
    images = np.concatenate([images32[0]] * 4)  # 128 cells: per-image draws have room to vary
    out = augment_images(images, "pixmix", seed=0)
    change = np.abs(out.astype(np.float32) - images).mean(axis=(1, 2, 3))
    # 0-4 rounds per image and a coin for the starting view: about 1 in 10 come out untouched.
    assert 0.03 < (change < 0.5).mean() < 0.25
    assert (change > 30).mean() > 0.4, "most cells carry heavy mixed-in structure"

    def standardised_grey(x: np.ndarray) -> np.ndarray:
        grey = x.astype(np.float32).mean(axis=-1).reshape(len(x), -1)
        return (grey - grey.mean(axis=1, keepdims=True)) / (grey.std(axis=1, keepdims=True) + 1e-6)

    grey_out, grey_in = standardised_grey(out), standardised_grey(images)
    own = (grey_out * grey_in).mean(axis=1).mean()
    other = (grey_out * np.roll(grey_in, 16, axis=0)).mean(axis=1).mean()  # cells of another class
    assert own > other + 0.12, f"the cell should survive the mixing: {own:.2f} with its own input, {other:.2f} with another"


def test_batch_level_and_unknown_presets_are_refused_as_image_presets():
    for name in ("mixup", "cutmix"):
        with pytest.raises(ValueError, match=f"'{name}' mixes images and labels in a batch: use it in training"):
            check_image_preset(name)
    with pytest.raises(ValueError, match="unknown augmentation preset 'blur'; choose one of light"):
        check_image_preset("blur")
    with pytest.raises(ValueError, match="mixes images and labels"):
        augment_images(np.zeros((2, 8, 8, 3), np.uint8), "mixup")
    with pytest.raises(ValueError, match="expects uint8"):
        augment_images(np.zeros((2, 8, 8, 3), np.float32), "light")
    for name in IMAGE_PRESETS:
        check_image_preset(name)


def test_presets_describe_all_fourteen_names():
    names = {"light", "randaugment", "augmix", "gridmask", "strong", "categorical", "illumination", "focus", "noise", "pixmix",
             "stain", "scale", "mixup", "cutmix"}
    assert set(PRESETS) == names
    assert set(IMAGE_PRESETS) | set(BATCH_PRESETS) == names and not set(IMAGE_PRESETS) & set(BATCH_PRESETS)
    assert set(BATCH_PRESETS) == {"mixup", "cutmix"}
    assert all(PRESETS[n].name == n and len(PRESETS[n].description) > 10 for n in names)


@pytest.fixture(scope="module")
def one_per_class(pbc_subset_arrays):
    """8 real images, one of each class, as a uint8 batch with one-hot labels."""
    images, labels = pbc_subset_arrays
    rows = [int(np.nonzero(labels == c)[0][0]) for c in range(8)]
    return np.ascontiguousarray(images[rows]), np.eye(8, dtype=np.float32)


def _mix(name: str, batch: tuple[np.ndarray, np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = batch
    out_images, out_labels = mix_batch(name, images, labels, np.random.default_rng(seed))
    return out_images.astype(np.float32), out_labels


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup+cutmix"])
def test_batch_mixers_mix_real_images_and_make_soft_labels(one_per_class, name):
    images, labels = one_per_class
    soft = 0
    for seed in range(3):
        out, mixed = _mix(name, one_per_class, seed)
        assert out.shape == images.shape and mixed.shape == labels.shape
        np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-5)
        assert (mixed >= -1e-6).all() and out.min() >= 0.0 and out.max() <= 255.001  # float rounding only
        soft += int((mixed.max(axis=1) < 0.999).sum())
        assert _mean_abs(out, images) > 0.0
    assert soft > 0


def _partner(row: np.ndarray, own: int) -> tuple[int, float]:
    """(other class, its label weight) of a mixed one-hot row (own class when unmixed)."""
    other = row.copy()
    other[own] = -1
    j = int(other.argmax())
    return (j, float(row[j])) if row[j] > 1e-6 else (own, 0.0)


def test_mixup_is_the_same_convex_mix_of_images_and_labels(one_per_class):
    images, _ = one_per_class
    for seed in range(3):
        out, mixed = _mix("mixup", one_per_class, seed)
        for i in range(8):
            j, weight = _partner(mixed[i], i)
            np.testing.assert_allclose(mixed[i, i], 1 - weight, atol=1e-5)
            expected = (1 - weight) * images[i].astype(np.float32) + weight * images[j]
            np.testing.assert_allclose(out[i], expected, atol=0.5 + 1e-3)  # rounded to uint8


def _cutmix_rows(batch, seeds=range(3)):
    """(pasted share, label weight of the partner) of every mixed CutMix row, checking each pixel's origin."""
    images, _ = batch
    rows = []
    for seed in seeds:
        out, mixed = _mix("cutmix", batch, seed)
        for i in range(8):
            j, weight = _partner(mixed[i], i)
            from_own = (out[i] == images[i]).all(axis=-1)
            from_other = (out[i] == images[j]).all(axis=-1)
            assert (from_own | from_other).all(), "a CutMix pixel comes from neither image"
            pasted = from_other & ~from_own
            if pasted.any():  # the patch is one axis-aligned rectangle: partner inside, own image outside
                ys, xs = np.nonzero(pasted)
                box = np.zeros_like(pasted)
                box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
                assert from_other[box].all() and from_own[~box].all()
            rows.append((float(pasted.mean()), weight))
    return np.array(rows)


def test_cutmix_pastes_one_rectangle_from_the_partner_image(one_per_class):
    rows = _cutmix_rows(one_per_class)
    pasted, weight = rows[:, 0], rows[:, 1]
    assert (pasted > 0).sum() >= 8
    assert ((pasted > 0) == (weight > 0)).all()
    assert (pasted <= weight + 0.01).all()  # never more than the labelled share


def test_cutmix_labels_match_the_pasted_area(one_per_class):
    rows = _cutmix_rows(one_per_class)
    np.testing.assert_allclose(rows[:, 0], rows[:, 1], atol=0.03)


def one_per_class_stub() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((2, 4, 4, 3), np.uint8), np.eye(2, dtype=np.float32)


def test_unknown_batch_mixer_raises():
    for name in ("mosaic", "mixup+", "mixup+mosaic", "none"):
        with pytest.raises(ValueError, match="unknown batch augmentation .*use mixup, cutmix or mixup\\+cutmix"):
            mix_batch(name, *one_per_class_stub(), np.random.default_rng(0))


def _batches(images, labels, **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    """One pass over the pool: len(images) / 8 batches of the endless training PyDataset."""
    data = training_batches(ImagePool([(images, labels)]), BatchRecipe(num_classes=8, batch_size=8, seed=0, **kwargs))
    return [data[i] for i in range(len(images) // 8)]


def test_training_pipeline_with_mixup_yields_float_images_and_soft_one_hot_labels(images32):
    images, labels = images32
    batches = _batches(images, labels, batch_augment="mixup", batch_augment_probability=1.0)
    assert len(batches) == 4
    soft = 0
    for x, y in batches:
        assert x.dtype == np.uint8 and x.shape == (8, 96, 96, 3)  # uint8 into the model
        assert y.dtype == np.float32 and y.shape == (8, 8)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
        soft += int((y.max(axis=1) < 0.999).sum())
    assert soft > 0


def test_training_pipeline_without_batch_augment_keeps_exact_one_hot_labels_and_symmetric_images(images32):
    images, labels = images32
    batches = _batches(images, labels, batch_augment="none")
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.dtype == np.uint8 and x.shape == images.shape
    assert set(np.unique(y)) == {0.0, 1.0} and (y.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(np.bincount(y.argmax(axis=1), minlength=8), np.bincount(labels, minlength=8))
    # Each output is a flip / quarter turn of exactly one input image, with that image's label.
    variants = {
        np.rot90(base, k).tobytes(): i
        for i, image in enumerate(images)
        for base in (image, image[:, ::-1])
        for k in range(4)
    }
    found = [variants.get(image.tobytes()) for image in x]
    assert None not in found and sorted(found) == list(range(len(images)))
    np.testing.assert_array_equal(y.argmax(axis=1), labels[found])


def _staged_shards(root, images, labels, sizes, policy):
    from bc_pipeline.core.artifacts import ShardSet

    root.mkdir(parents=True)
    rows, start = [], 0
    for part, size in enumerate(sizes):
        file, labels_file = f"shard_{part:03d}.npy", f"labels_{part:03d}.npy"
        np.save(root / file, images[start : start + size], allow_pickle=False)
        np.save(root / labels_file, labels[start : start + size], allow_pickle=False)
        rows.append({"file": file, "labels_file": labels_file, "copy": part % 2, "part": part,
                     "policy": policy, "start": start, "count": size})  # fmt: skip
        start += size
    return ShardSet(directory=root, manifest=pd.DataFrame(rows))


def test_shardset_round_trip_moves_the_staging_folder_and_reloads_every_shard(tmp_path, images32):
    from bc_pipeline.core.artifacts import ShardSet, read_artifact, write_artifact

    images, labels = images32
    sizes = [12, 12, 8]
    staging = tmp_path / "staging" / "run1"
    shards = _staged_shards(staging, images, labels, sizes, "light")
    base = tmp_path / "store" / "augmented_shards"
    assert write_artifact(base, shards) == base
    assert not staging.exists() and shards.directory == base

    loaded = read_artifact(base)
    assert isinstance(loaded, ShardSet) and loaded.directory == base
    pd.testing.assert_frame_equal(loaded.manifest, shards.manifest)
    assert len(loaded) == sum(sizes) == len(images)
    got_images, got_labels = zip(*(loaded.load(i) for i in range(len(sizes))))
    np.testing.assert_array_equal(np.concatenate(got_images), images)
    np.testing.assert_array_equal(np.concatenate(got_labels), labels)
    assert all(shard.dtype == np.uint8 for shard in got_images)
    assert all(shard.dtype == labels.dtype for shard in got_labels)

    # A second run replaces the stored shards whole, and leaves nothing else next to them.
    again = _staged_shards(tmp_path / "staging" / "run2", images[::-1], labels[::-1], [20, 12], "strong")
    write_artifact(base, again)
    reloaded = read_artifact(base)
    assert len(reloaded) == 32 and list(reloaded.manifest["policy"]) == ["strong", "strong"]
    np.testing.assert_array_equal(reloaded.load(0)[0], images[::-1][:20])
    assert sorted(p.name for p in base.iterdir()) == ["labels_000.npy", "labels_001.npy", "shard_000.npy",
                                                     "shard_001.npy", "shards.parquet"]  # fmt: skip
    assert [p.name for p in base.parent.iterdir()] == ["augmented_shards"]
    assert len(ShardSet(directory=base, manifest=reloaded.manifest.iloc[:0])) == 0


def test_flips_and_turns_draw_all_eight_symmetries_evenly(images32):
    from bc_pipeline.training.worker.data import flip_and_turn

    image = images32[0][0]
    variants = [np.rot90(base, k).tobytes() for base in (image, image[:, ::-1]) for k in range(4)]
    assert len(set(variants)) == 8  # a real cell image has no symmetry of its own
    batch = np.repeat(image[None], 64, axis=0)
    rng = np.random.default_rng(0)
    counts = np.zeros(8)
    for _ in range(50):
        for out in flip_and_turn(batch, rng):
            counts[variants.index(out.tobytes())] += 1
    # 3200 draws of 8 equally likely outcomes: each within 5 standard deviations of 400
    assert np.abs(counts - 400).max() < 5 * np.sqrt(3200 * (1 / 8) * (7 / 8))


def test_the_pool_reads_memory_mapped_shards_and_each_batch_depends_only_on_its_index(tmp_path, images32):
    images, labels = images32
    np.save(tmp_path / "a.npy", images[:20])
    np.save(tmp_path / "b.npy", images[20:])
    parts = [(np.load(tmp_path / f, mmap_mode="r"), y) for f, y in (("a.npy", labels[:20]), ("b.npy", labels[20:]))]
    pool = ImagePool(parts)
    rows = np.array([31, 2, 19, 20, 7])
    got, got_labels = pool.gather(rows)
    np.testing.assert_array_equal(got, images[np.sort(rows)])
    np.testing.assert_array_equal(got_labels, labels[np.sort(rows)])
    recipe = BatchRecipe(num_classes=8, batch_size=8, seed=3, batch_augment="mixup+cutmix")
    one, other = training_batches(pool, recipe), training_batches(pool, recipe)
    for index in (5, 0, 11):  # any order, as Keras' worker threads ask
        np.testing.assert_array_equal(one[index][0], other[index][0])
        np.testing.assert_array_equal(one[index][1], other[index][1])
    assert not np.array_equal(one[0][0], one[4][0])  # a new pass, a new permutation
    val = evaluation_batches(images, labels, num_classes=8, batch_size=12)
    assert val.num_batches == 3
    np.testing.assert_array_equal(np.concatenate([val[i][0] for i in range(3)]), images)
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        ImagePool([(images[:4], labels[:3])])
