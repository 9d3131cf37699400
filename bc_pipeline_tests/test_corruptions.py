"""The ImageNet-C corruption suite on real pbc96 images, and the scores computed from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.evaluation.imagenet_c import (
    CORRUPTIONS,
    build_corrupted_set,
    check_corruptions,
    corrupt_images,
    corruption_errors,
    corruption_scores,
    mean_accuracy,
    mean_corruption_error,
    seen_in_training,
    subsample,
)
from bc_pipeline_tests.conftest import load_pbc96_arrays


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    return load_pbc96_arrays(per_class=1, seed=4)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_each_corruption_is_reproducible_and_grows_with_severity(cells, corruption: str):
    images, _ = cells
    state = np.random.get_state()
    mild = corrupt_images(images, corruption, 1, seed=7)
    assert np.array_equal(np.random.get_state()[1], state[1]), "the global generator is left as it was"
    severe = corrupt_images(images, corruption, 5, seed=7)
    assert mild.dtype == np.uint8 and mild.shape == images.shape
    assert np.array_equal(mild, corrupt_images(images, corruption, 1, seed=7))
    change = [np.abs(x.astype(np.int16) - images).mean() for x in (mild, severe)]
    assert 0 < change[0] < change[1], f"{corruption}: mean change {change}"


def test_random_corruptions_differ_between_seeds_and_images(cells):
    images, _ = cells
    a, b = corrupt_images(images, "gaussian_noise", 3, seed=1), corrupt_images(images, "gaussian_noise", 3, seed=2)
    assert not np.array_equal(a, b)
    same = np.repeat(images[:1], 2, axis=0)
    noisy = corrupt_images(same, "gaussian_noise", 3, seed=1)
    assert not np.array_equal(noisy[0], noisy[1]), "each image draws its own noise"


def test_the_set_is_the_same_in_one_process_or_two(cells):
    images, labels = cells
    kwargs = {"corruptions": ("glass_blur", "impulse_noise"), "severities": (2, 4), "seed": 3}
    one = build_corrupted_set(images, labels, np.arange(len(images)) + 100, workers=1, **kwargs)
    two = build_corrupted_set(images, labels, np.arange(len(images)) + 100, workers=2, **kwargs)
    assert np.array_equal(one.images, two.images)
    assert len(one.manifest) == len(images) * 4
    assert one.manifest["clean_index"].min() == 100
    first = one.manifest.index[(one.manifest["corruption"] == "impulse_noise") & (one.manifest["severity"] == 4)]
    alone = build_corrupted_set(images, labels, np.arange(len(images)), corruptions=("impulse_noise",), severities=(4,), seed=3)
    assert not np.array_equal(one.images[first], alone.images), "seeds follow the corruption's position"


def test_bad_requests_fail_with_a_clear_message(cells):
    images, _ = cells
    with pytest.raises(ValueError, match="unknown corruption.*fog_of_war"):
        check_corruptions(["fog_of_war"], [1])
    with pytest.raises(ValueError, match="severities must be in 1-5"):
        check_corruptions(["fog"], [0, 6])
    with pytest.raises(ValueError, match="at least 32x32"):
        corrupt_images(images[:, :28, :28], "fog", 1, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt_images(images.astype(np.float32), "fog", 1, seed=0)


def test_scores_and_the_imagenet_c_errors():
    manifest = pd.DataFrame({
        "corruption": ["fog"] * 4 + ["snow"] * 4, "severity": [1, 1, 5, 5] * 2, "family": ["weather"] * 8,
    })  # fmt: skip
    truth = np.zeros(8, np.int64)
    model = corruption_scores(truth, np.array([0, 0, 0, 1, 0, 0, 1, 1]), manifest)
    baseline = corruption_scores(truth, np.array([0, 1, 1, 1, 1, 0, 1, 1]), manifest)
    assert model.set_index(["corruption", "severity"])["accuracy"].to_dict() == {
        ("fog", 1): 1.0, ("fog", 5): 0.5, ("snow", 1): 1.0, ("snow", 5): 0.0
    }
    assert mean_accuracy(model) == pytest.approx(0.625)
    assert mean_accuracy(model, exclude=["snow"]) == pytest.approx(0.75)
    errors = corruption_errors(model, baseline, clean_error=0.0, baseline_clean_error=0.0).set_index("corruption")
    assert errors.loc["fog", "ce"] == pytest.approx(0.5 / 1.5)  # errors summed over severities
    assert errors.loc["snow", "ce"] == pytest.approx(1.0 / 1.5)
    assert mean_corruption_error(errors)[0] == pytest.approx(0.5)
    itself = corruption_errors(baseline, baseline, clean_error=0.1, baseline_clean_error=0.1)
    assert mean_corruption_error(itself) == pytest.approx((1.0, 1.0))


def test_training_presets_name_the_families_they_resemble():
    assert seen_in_training(["light"]) == ["gaussian_noise", "defocus_blur", "brightness", "contrast"]
    assert seen_in_training(["augmix"]) == [] and seen_in_training([]) == []


def test_subsample_is_stratified_and_reproducible():
    labels = np.repeat(np.arange(8), [100, 300, 50, 200, 80, 90, 400, 180])
    chosen = subsample(labels, 280, seed=0)
    assert len(chosen) == 280 and np.array_equal(chosen, subsample(labels, 280, seed=0))
    shares = np.bincount(labels[chosen], minlength=8) / 280
    assert np.allclose(shares, np.bincount(labels) / len(labels), atol=0.01)
    assert np.array_equal(subsample(labels, 0, seed=0), np.arange(len(labels)))
