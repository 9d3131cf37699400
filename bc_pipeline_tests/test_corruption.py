"""The corruption / outlier stage on generated challenge-style files: real pbc96 cells, templates made in code.

The files come from :mod:`bc_pipeline_tests.challenge_files`, with settings drawn at random from the
ranges the stage must hold on (weights 0.2-0.85: fixed, varying by up to 0.1, drawn per image anywhere
in the range, or a mixture of a few values; each base blended once or 2-15 times with its own share; 1-6
templates of every kind, stain-coloured ones included; 2-40 bases; 1-50 repeats with conflicting
or agreeing labels; copies of the picture or none; rounding or truncation; any order). The seed
list is fixed, so a failure names the file that breaks the stage.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.ingest.loaders import image_id
from bc_pipeline.quality import blend_algebra as ba
from bc_pipeline.quality import blends as corruption
from bc_pipeline.quality import outliers
from bc_pipeline.quality.colour import atypicality
from bc_pipeline.quality.dedup import find_duplicates
from bc_pipeline.quality.hashing import compute_hashes
from bc_pipeline_tests import challenge_files as cf
from bc_pipeline_tests.conftest import load_pbc96_arrays

PROPERTY_SEEDS = list(range(100, 130))


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    """800 real cells (100 per class) to build files from."""
    return load_pbc96_arrays(per_class=100, seed=21)


def detect(images: np.ndarray, labels: np.ndarray) -> outliers.AnomalyResult:
    ids = pd.Series([image_id(x) for x in images])
    phash, dhash = compute_hashes(images, workers=1)
    return outliers.detect(images, find_duplicates(ids, labels, phash, dhash))


def describe(spec: cf.FileSpec) -> str:
    return "; ".join(f"{t.kind} a={t.weight:.2f}±{t.jitter:.2f}{' of ' + str(t.shares) if t.shares else ''} bases={t.bases}"
                     f" x{t.blends_per_base} repeats={t.repeats} copies={t.copies}"
                     for t in spec.templates) + f"; {spec.rounding}"  # fmt: skip


@pytest.mark.parametrize("seed", PROPERTY_SEEDS)
def test_random_challenge_files_are_cleaned_exactly(cells, seed: int):
    spec = cf.random_spec(np.random.default_rng(seed), clean=560)
    planted = cf.build_file(*cells, spec)
    result = detect(planted.images, planted.labels)
    score = cf.score_detection(planted, result.flagged(), result.report, result.templates)
    assert score.clean_flagged == 0, describe(spec)
    assert score.precision == 1.0 and score.recall >= 0.995, (score, describe(spec))
    assert min(score.template_psnr) >= 30.0, (score.template_psnr, describe(spec))
    assert score.weight_error <= 0.02, (score.weight_error, describe(spec))
    # One recovered template per true one, and each flagged blend attributed to its own template.
    truth = planted.truth
    blends = result.report[result.report["kind"] == corruption.BLEND]
    pairs = pd.crosstab(truth["template"].to_numpy()[blends["index"]], blends["template"].to_numpy())
    assert len(result.templates) == len(planted.templates), describe(spec)
    assert (pairs.astype(bool).sum(axis=0) == 1).all() and (pairs.astype(bool).sum(axis=1) == 1).all()
    # The base found is the planted cell (or a pixel-identical copy of it).
    for found, planted_base in zip(blends["base_index"], truth["base"].to_numpy()[blends["index"]]):
        np.testing.assert_array_equal(planted.images[found], planted.images[planted_base])


def test_every_report_row_says_why(cells):
    spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="stain", weight=0.6, bases=6, copies=2),), clean=300, seed=4)
    planted = cf.build_file(*cells, spec)
    result = detect(planted.images, planted.labels)
    report = result.report
    assert set(report["kind"]) == {corruption.BLEND, corruption.COPY}
    blend = report[report["kind"] == corruption.BLEND].iloc[0]
    assert f"blend of image {blend['base_index']} (cell share {blend['weight']:.3f}) with template 0" in blend["reason"]
    assert (report["residual_rms"] <= 3 * report["expected_rms"]).all()
    assert "rounding leaves" in blend["reason"] and result.corruption.noise.source == "rounding"
    assert blend["template_evidence"] >= 1 and blend["template_distance"] > 0
    copies = result.outliers[result.outliers["reason"].str.startswith("copy of template 0")]
    assert len(copies) == 2
    summary = result.corruption.template_summary.iloc[0]
    assert (summary["blends"], summary["copies"]) == (6, 1)  # two copies of the picture, one distinct image
    assert abs(summary["weight_median"] - 0.6) < 0.005


def test_one_cell_blended_many_times_at_any_share_is_one_template_with_the_cell_as_base(cells):
    """Issue 30's hidden file in small: grey, dark and stain-coloured templates, each base cell blended
    4-10 times with its own share anywhere in 0.2-0.85. All blends of one cell lie on one ray from the
    template, so each is an exact blend of its siblings too, and the lowest-share one passes as a
    "copy" of a template that only that cell's blends share. Expected: one template per true one, each
    blend's base the cell itself (not a sibling), its share within 0.02, every cell counted once, and
    every blend found whose template part (what the template explains beyond a scaled copy of the cell)
    stands above rounding with a margin of two."""
    low, high = cf.SHARE_RANGE
    spec = cf.FileSpec(templates=tuple(cf.TemplateSpec(kind=kind, weight=(low + high) / 2, jitter=(high - low) / 2,
                                                       bases=6, blends_per_base=(4, 10), copies=1)
                                       for kind in ("grey", "dark", "stain")), clean=300, seed=30)  # fmt: skip
    planted = cf.build_file(*cells, spec)
    result = detect(planted.images, planted.labels)
    score = cf.score_detection(planted, result.flagged(), result.report, result.templates)
    assert score.precision == 1.0 and score.outlier_recall == 1.0 and score.templates_found == 3
    assert min(score.template_psnr) >= 30.0 and score.weight_error <= 0.02
    truth = planted.truth
    corrupted = np.flatnonzero(truth["kind"] == "corrupted")
    a_images = planted.images[corrupted].reshape(len(corrupted), -1)
    b_images = planted.images[truth["base"].to_numpy()[corrupted]].reshape(len(corrupted), -1)
    true_templates = planted.templates[truth["template"].to_numpy()[corrupted]].reshape(len(corrupted), -1)
    part = ba.template_part(ba.scale_fit(a_images, b_images), ba.blend_fit(a_images, b_images, true_templates)[2])
    visible = corrupted[part >= 2 * ba.QUANTISATION_RMS]
    assert len(visible) > 0.9 * len(corrupted) and set(visible) <= set(result.flagged().tolist())
    blends = result.report[result.report["kind"] == corruption.BLEND]
    np.testing.assert_array_equal(planted.images[blends["base_index"]], planted.images[truth["base"].to_numpy()[blends["index"]]])
    summary = result.corruption.template_summary
    assert (summary["cells"] == 6).all() and (summary["copies"] == 1).all()
    assert (summary["weight_min"] < 0.4).all() and (summary["weight_max"] > 0.65).all()


def test_stain_coloured_templates_pass_every_colour_test(cells):
    """Why colour cannot be what finds the candidates: such templates look stained to the colour statistics."""
    rng = np.random.default_rng(0)
    stain = np.stack([cf.make_template("stain", rng, cells[0]) for _ in range(20)])
    photos = np.stack([cf.make_template("photo", rng, cells[0]) for _ in range(20)])
    score = atypicality(np.concatenate([cells[0], stain, photos]))
    assert score[-40:-20].max() < outliers.OUTLIER_ATYPICALITY < score[-20:].min()
    spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="stain", weight=0.3, bases=8),), clean=400, seed=9)
    planted = cf.build_file(*cells, spec)
    stats = detect(planted.images, planted.labels).stats
    blends = planted.truth["kind"].to_numpy() == "corrupted"
    assert stats["atypicality"].to_numpy()[blends].max() < outliers.OUTLIER_ATYPICALITY


def test_bases_missing_from_the_file(cells):
    """Half the bases absent: exact blends and the templates are found; so are template-dominated blends
    of the missing bases (of pictures unlike cells), never a clean cell. Cell-dominated blends of
    missing bases sit among the cells: the limit."""
    for weight, least_found in [(0.3, 0.5), (0.8, 0.0)]:
        spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="photo", weight=weight, bases=10),
                                      cf.TemplateSpec(kind="photo", weight=weight, bases=10, copies=2)),
                           clean=500, missing_bases=0.5, seed=3)  # fmt: skip
        planted = cf.build_file(*cells, spec)
        result = detect(planted.images, planted.labels)
        score = cf.score_detection(planted, result.flagged(), result.report, result.templates)
        truth = planted.truth
        blend = truth["kind"] == "corrupted"
        present = set(np.flatnonzero(blend & (truth["base"] >= 0)).tolist())
        absent = set(np.flatnonzero(blend & (truth["base"] < 0)).tolist())
        flagged = set(result.flagged().tolist())
        assert score.clean_flagged == 0
        assert present <= set(result.report.loc[result.report["kind"] == corruption.BLEND, "index"].tolist())
        assert min(score.template_psnr) >= 30.0
        assert len(flagged & absent) >= least_found * len(absent)


def test_no_base_in_the_file_flags_nothing_wrongly(cells):
    spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="stain", weight=0.5, bases=10),), clean=500, missing_bases=1.0)
    planted = cf.build_file(*cells, spec)
    result = detect(planted.images, planted.labels)
    assert cf.score_detection(planted, result.flagged(), result.report, result.templates).clean_flagged == 0


def test_clean_images_alone_give_empty_reports(cells):
    images, labels = cells
    result = detect(images, labels)
    assert result.report.empty and result.outliers.empty
    assert len(result.corruption.templates) == 0
    assert corruption.templates_from_report(images, result.report).shape == (0, 96, 96, 3)
    assert outliers.tinted_share(result.stats) > outliers.MIN_TINTED_SHARE


@pytest.mark.slow
def test_all_of_pbc96_is_clean(pbc96_dir):
    """Real smears hold odd but genuine cells; none of the 14,416 may look like a blend."""
    from bc_pipeline.ingest.loaders import load_folder

    loaded = load_folder(pbc96_dir)
    result = detect(loaded.images, loaded.manifest["label"].to_numpy())
    assert result.report.empty and result.outliers.empty


def test_a_set_of_non_cell_pictures_is_recognised_as_not_a_smear_data_set():
    rng = np.random.default_rng(3)
    pictures = np.stack([cf.make_template(["photo", "texture", "drawing"][i % 3], rng, np.zeros((1, 96, 96, 3), np.uint8))
                         for i in range(40)])  # fmt: skip
    result = detect(pictures, rng.integers(0, 8, size=40))
    assert outliers.tinted_share(result.stats) < outliers.MIN_TINTED_SHARE


def test_generated_files_hold_what_their_truth_says(cells):
    spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="grey", weight=0.4, jitter=0.1, bases=5, repeats=(2, 3), copies=2),
                                  cf.TemplateSpec(kind="dark", weight=0.7, bases=4, labels="agree")),
                       clean=200, rounding="floor", seed=8)  # fmt: skip
    planted = cf.build_file(*cells, spec)
    truth = planted.truth
    assert len(planted.images) == len(truth) == len(planted.labels)
    assert (truth["kind"] == "clean").sum() == 200
    for row in np.flatnonzero(truth["kind"] == "corrupted"):
        template = planted.templates[truth["template"].iat[row]]
        expected = cf.blend(planted.images[truth["base"].iat[row]], template, truth["weight"].iat[row], "floor")
        np.testing.assert_array_equal(planted.images[row], expected)
    for row in np.flatnonzero(truth["kind"] == "outlier"):
        np.testing.assert_array_equal(planted.images[row], planted.templates[truth["template"].iat[row]])
    weights = truth.loc[truth["template"] == 0, "weight"].dropna()
    assert weights[weights > 0].between(0.3, 0.5).all() and weights[weights > 0].nunique() == 5
    agree = truth.index[(truth["template"] == 1) & (truth["kind"] == "corrupted")]
    by_base = pd.Series(planted.labels[agree]).groupby(truth.loc[agree, "base"].to_numpy()).nunique()
    assert (by_base == 1).all()
    # Shuffled: the injected images are not all at the end.
    assert np.flatnonzero(truth["kind"] != "clean").min() < len(truth) // 2


def test_fit_members_recovers_template_and_per_image_weights_exactly():
    rng = np.random.default_rng(0)
    template = rng.uniform(0, 255, size=300)
    bases = rng.uniform(0, 255, size=(6, 300))
    weights = np.array([0.25, 0.4, 0.55, 0.7, 0.8, 0.9])
    blends = weights[:, None] * bases + (1 - weights[:, None]) * template
    fitted, fitted_weights, offsets = ba.fit_members(blends, bases, np.zeros(6, bool))
    np.testing.assert_allclose(fitted, template, atol=1e-6)
    np.testing.assert_allclose(fitted_weights, weights, atol=1e-9)
    np.testing.assert_allclose(offsets, 0.0, atol=1e-6)
    # A copy of the template pins it down together with one blend.
    fitted, _, _ = ba.fit_members(np.stack([blends[0], template]), np.stack([bases[0], bases[0]]), np.array([False, True]))
    np.testing.assert_allclose(fitted, template, atol=1e-6)


def test_estimate_template_inverts_exact_blends():
    rng = np.random.default_rng(0)
    template = rng.uniform(0, 255, size=(5, 12))
    bases = rng.uniform(0, 255, size=(5, 12))
    weights = np.array([0.3, 0.4, 0.5, 0.6, 0.7])
    blends = weights[:, None] * bases + (1 - weights[:, None]) * template[0]
    np.testing.assert_allclose(corruption.estimate_template(blends, bases, weights), template[0], atol=1e-9)


def test_rounding_noise_model_matches_stored_blends():
    """The residual of a stored blend against its true parts is what the model says rounding leaves."""
    rng = np.random.default_rng(1)
    base, template = rng.integers(0, 256, size=(2, 96 * 96 * 3)).astype(np.float64)
    stored = np.rint(0.6 * base + 0.4 * template)
    weight, _, residual = ba.blend_fit(stored[None], base[None], template)
    assert abs(weight[0] - 0.6) < 1e-3
    assert abs(residual[0] - ba.QUANTISATION_RMS) < 0.01
