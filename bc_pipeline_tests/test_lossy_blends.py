"""The corruption stage on files stored with loss (issue 30): JPEG at qualities 85-95, a mild resize.

Real pbc96 cells, templates made in code, the finished file stored the way a lab might have stored it
(:func:`bc_pipeline_tests.challenge_files.stored`). JPEG leaves every image a few grey levels off, so
no blend is exact any more: the stage must see the compression on the file, measure the noise it
left, and judge every relation against that (:mod:`bc_pipeline.quality.storage_noise`).
"""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.quality import blends as corruption
from bc_pipeline.quality import storage_noise
from bc_pipeline_tests import challenge_files as cf
from bc_pipeline_tests.conftest import load_pbc96_arrays
from bc_pipeline_tests.test_corruption import describe, detect


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    return load_pbc96_arrays(per_class=100, seed=21)


def any_share_file(cells, kinds: tuple[str, ...], seed: int) -> cf.PlantedFile:
    low, high = cf.SHARE_RANGE
    templates = tuple(cf.TemplateSpec(kind=kind, weight=(low + high) / 2, jitter=(high - low) / 2, bases=12,
                                      blends_per_base=(1, 4), copies=2) for kind in kinds)  # fmt: skip
    return cf.build_file(*cells, cf.FileSpec(templates=templates, clean=500, seed=seed))


@pytest.mark.parametrize("quality", [92, 85])
def test_jpeg_quality_and_noise_are_measured_on_the_file(cells, quality: int):
    """The quality is read off the file, and the noise measured is the error compression really left
    (compared here with the lossless originals, which the stage never sees)."""
    images = cells[0][:300]
    compressed = cf.stored(images, f"jpeg{quality}")
    noise = storage_noise.estimate(compressed, np.arange(len(compressed)), coarse_side=8)
    assert noise.source == "jpeg" and noise.quality == quality, noise.why
    truth = np.median(np.sqrt(((compressed.astype(float) - images) ** 2).mean(axis=(1, 2, 3))))
    assert 0.6 * truth <= noise.full_rms <= 1.5 * truth, (noise.full_rms, truth)
    assert noise.coarse_rms < noise.full_rms / 4  # compression noise is mostly fine detail
    assert f"quality {quality}" in noise.why


def test_content_never_encoded_on_the_grid_has_no_jpeg_trace(cells):
    """Resized cells (pbc96's cells are JPEG decodes; a resize takes their grid away) carry no trace."""
    resized = cf.stored(cells[0][:300], "resize88")
    noise = storage_noise.estimate(resized, np.arange(len(resized)), coarse_side=8)
    assert noise.source == "rounding" and not noise.lossy, noise.why
    assert "no JPEG trace" in noise.why


def test_blends_of_a_file_saved_as_jpeg_are_found(cells):
    """Issue 30's second hidden file in small: three kinds of template, any share per image, the whole
    file saved as JPEG quality 90. Every blend whose template part stands above the noise is found,
    one template per true one, none of the clean cells, and each row says what it was judged against."""
    planted = cf.store(any_share_file(cells, ("photo", "stain", "grey"), seed=31), "jpeg90")
    result = detect(planted.images, planted.labels)
    score = cf.score_detection(planted, result.flagged(), result.report, result.templates)
    assert result.corruption.noise.source == "jpeg", result.corruption.noise.why
    assert score.clean_flagged == 0 and score.precision == 1.0, score
    assert score.recall >= 0.9 and score.templates_found == 3, score
    assert min(score.template_psnr) >= 25.0, score.template_psnr
    blends = result.report[result.report["kind"] == corruption.BLEND]
    assert blends["reason"].str.contains("JPEG noise leaves").all()
    assert (blends["template_evidence"] >= 1).all()
    assert (blends["residual_rms"] <= 3 * blends["expected_rms"]).all()


def test_clean_cells_saved_as_jpeg_flag_nothing(cells):
    images, labels = cells
    result = detect(cf.stored(images, "jpeg85"), labels)
    assert result.corruption.noise.source == "jpeg"
    assert result.report.empty and result.outliers.empty


def test_a_resized_file_is_still_exact(cells):
    """A resize is linear: blends of the resized images are exact up to rounding, found at rounding noise."""
    planted = cf.store(any_share_file(cells, ("dark", "photo"), seed=32), "resize104")
    result = detect(planted.images, planted.labels)
    score = cf.score_detection(planted, result.flagged(), result.report, result.templates)
    assert result.corruption.noise.source == "rounding"
    assert score.precision == 1.0 and score.recall >= 0.98 and score.templates_found == 2, (score, describe(planted.spec))
    assert min(score.template_psnr) >= 30.0
