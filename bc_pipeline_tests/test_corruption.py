"""Outlier and corruption detection on planted data: real pbc96 cells, templates drawn here.

The planted set mimics the course file: clean cells, blends A = a*B + (1-a)*C of some of those cells
with two templates (a != 0.5), each blend repeated with random labels, copies of unrelated
pictures, everything shuffled to random positions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from bc_pipeline.lib import corruption, outliers
from bc_pipeline.lib.dedup import find_duplicates
from bc_pipeline.lib.hashing import compute_hashes
from bc_pipeline_tests.conftest import load_pbc96_arrays


def draw_templates(size: int = 96) -> np.ndarray:
    """Two colourful pictures with nothing of a stained cell in them."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    sunset = np.stack([230 - 60 * y, 150 * (1 - y) + 40, 40 + 180 * y], axis=-1)
    first = Image.fromarray(sunset.astype(np.uint8))
    pen = ImageDraw.Draw(first)
    pen.ellipse((20, 45, 60, 85), fill=(20, 20, 20))
    pen.rectangle((62, 10, 90, 40), fill=(250, 240, 60))
    stripes = np.zeros((size, size, 3))
    stripes[..., 1] = 120 + 100 * (np.sin(x * 18) > 0)
    stripes[..., 0] = 40 + 150 * x
    stripes[..., 2] = 30
    second = Image.fromarray(stripes.astype(np.uint8))
    ImageDraw.Draw(second).polygon([(48, 5), (90, 90), (6, 90)], outline=(255, 255, 255), width=4)
    return np.stack([np.asarray(first), np.asarray(second)])


def blend(base: np.ndarray, template: np.ndarray, weight: float) -> np.ndarray:
    return np.clip(np.rint(weight * base.astype(np.float64) + (1 - weight) * template), 0, 255).astype(np.uint8)


def plant(weight: float, seed: int = 0):
    """Clean cells + blends + outlier copies, shuffled. Returns (images, labels, truth frame, templates)."""
    rng = np.random.default_rng(seed)
    clean, clean_labels = load_pbc96_arrays(per_class=50, seed=seed)
    templates = draw_templates()
    images, labels, kinds, bases, template_of = list(clean), list(clean_labels), ["clean"] * len(clean), [-1] * len(clean), [-1] * len(clean)
    for t, template in enumerate(templates):
        for base in rng.choice(len(clean), size=8, replace=False):
            picture = blend(clean[base], template, weight)
            for _ in range(rng.integers(1, 4)):  # each blend repeated, with random labels
                images.append(picture)
                labels.append(int(rng.integers(0, 8)))
                kinds.append("corrupted")
                bases.append(int(base))
                template_of.append(t)
        for _ in range(3):  # the unrelated picture itself, repeated: an outlier
            images.append(template)
            labels.append(int(rng.integers(0, 8)))
            kinds.append("outlier")
            bases.append(-1)
            template_of.append(t)
    order = rng.permutation(len(images))
    truth = pd.DataFrame({"kind": kinds, "base": bases, "template": template_of}).iloc[order].reset_index(drop=True)
    # Bases were numbered before shuffling: map them to their new positions.
    new_position = np.empty(len(order), dtype=np.int64)
    new_position[order] = np.arange(len(order))
    truth["base"] = [new_position[b] if b >= 0 else -1 for b in truth["base"]]
    return np.stack(images)[order], np.asarray(labels)[order], truth, templates


def detect(images: np.ndarray, labels: np.ndarray):
    ids = pd.Series([corruption_id(x) for x in images])
    phash, dhash = compute_hashes(images, workers=1)
    duplicates = find_duplicates(ids, labels, phash, dhash)
    stats = outliers.colour_stats(images, duplicates)
    candidates, pool = outliers.candidates_and_pool(stats, outliers.CANDIDATE_ATYPICALITY)
    result = corruption.find_corruptions(images, candidates, pool)
    report = outliers.expand_to_copies(result.report, stats)
    found_outliers = outliers.find_outliers(stats, corrupted=report["index"].to_numpy())
    return stats, result, report, found_outliers


def corruption_id(pixels: np.ndarray) -> str:
    from bc_pipeline.lib.loaders import image_id

    return image_id(pixels)


@pytest.fixture(scope="module", params=[0.62, 0.4], ids=["a=0.62", "a=0.40"])
def planted(request):
    images, labels, truth, templates = plant(weight=request.param, seed=int(request.param * 100))
    return request.param, images, truth, templates, detect(images, labels)


def test_every_planted_image_is_found_and_no_clean_image_is_flagged(planted):
    _, _, truth, _, (_, _, report, found_outliers) = planted
    corrupted = set(truth.index[truth["kind"] == "corrupted"])
    planted_outliers = set(truth.index[truth["kind"] == "outlier"])
    assert set(report["index"]) == corrupted
    assert set(found_outliers["index"]) == planted_outliers
    clean = set(truth.index[truth["kind"] == "clean"])
    assert not clean & (set(report["index"]) | set(found_outliers["index"]))


def test_blend_weight_and_base_are_recovered(planted):
    weight, images, truth, _, (_, _, report, _) = planted
    assert np.all(np.abs(report["weight"] - weight) <= 0.02), report["weight"].describe()
    expected_base = truth.loc[report["index"], "base"].to_numpy()
    # The base found is the planted cell (same pixels; a duplicate of it would do as well).
    for found, planted_base in zip(report["base_index"], expected_base):
        np.testing.assert_array_equal(images[found], images[planted_base])


def test_each_template_is_recovered_with_psnr_at_least_30db(planted):
    _, images, truth, templates, (_, result, report, _) = planted
    recovered = corruption.templates_from_report(images, report)
    assert len(recovered) == len(templates) == len(result.templates)
    for t, template in enumerate(templates):
        # The recovered template whose members were blended with planted template t.
        members = truth.loc[report["index"], "template"].to_numpy()
        (ids,) = np.unique(report.loc[members == t, "template"]).reshape(1, -1)
        assert len(ids) == 1, "one planted template must map to one recovered template"
        assert corruption.psnr(recovered[ids[0]], template) >= 30.0
    # Each corrupted image belongs to exactly the template it was blended with.
    pairs = pd.crosstab(truth.loc[report["index"], "template"].to_numpy(), report["template"].to_numpy())
    assert (pairs.astype(bool).sum(axis=1) == 1).all()


def test_clean_images_alone_give_empty_reports():
    images, labels = load_pbc96_arrays(per_class=40, seed=7)
    stats, result, report, found_outliers = detect(images, labels)
    assert report.empty and found_outliers.empty
    assert len(result.templates) == 0
    assert corruption.templates_from_report(images, report).shape == (0, 96, 96, 3)
    assert outliers.tinted_share(stats) > outliers.MIN_TINTED_SHARE


def test_a_set_of_non_cell_pictures_is_recognised_as_not_a_smear_data_set():
    rng = np.random.default_rng(3)
    templates = draw_templates()
    pictures = [np.roll(templates[i % 2], shift=int(rng.integers(0, 96)), axis=1) for i in range(40)]
    pictures = [np.clip(p.astype(int) + rng.integers(-20, 20, size=3), 0, 255).astype(np.uint8) for p in pictures]
    stats, _, _, _ = detect(np.stack(pictures), rng.integers(0, 8, size=40))
    assert outliers.tinted_share(stats) < outliers.MIN_TINTED_SHARE


def test_leave_one_out_rejects_a_template_fitted_to_two_unrelated_cells():
    images, _ = load_pbc96_arrays(per_class=20, seed=11)
    # Two clean cells offered as the only candidates: a free template could average them together.
    result = corruption.find_corruptions(images, candidates=np.array([0, 1]), pool=np.arange(2, len(images)))
    assert result.report.empty


def test_estimate_template_inverts_exact_blends():
    rng = np.random.default_rng(0)
    template = rng.uniform(0, 255, size=(5, 12))
    bases = rng.uniform(0, 255, size=(5, 12))
    weights = np.array([0.3, 0.4, 0.5, 0.6, 0.7])
    blends = weights[:, None] * bases + (1 - weights[:, None]) * template[0]
    np.testing.assert_allclose(corruption.estimate_template(blends, bases, weights), template[0], atol=1e-9)
