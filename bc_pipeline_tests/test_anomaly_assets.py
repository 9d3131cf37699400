"""Asset-level tests of the outlier / corruption stage on the challenge-style file and edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.defs.checks import no_flagged_image_in_splits
from bc_pipeline.defs.resources import ImageSource, shared_datasets_dir
from bc_pipeline.quality.blends import psnr
from bc_pipeline.training.model_folder import read_record
from bc_pipeline_tests import challenge_files as cf
from bc_pipeline_tests.conftest import load_pbc96_arrays
from bc_pipeline_tests.test_assets import UP_TO_CLEAN, _materialize, _metadata

STAGE = [*UP_TO_CLEAN, "noise_templates", "data_splits"]


@pytest.fixture(scope="module")
def an2dl_run(tmp_path_factory: pytest.TempPathFactory):
    path = shared_datasets_dir() / "an2dl_style" / "training_set.npz"
    if not path.is_file():
        pytest.skip(f"shared dataset not found at {path} (set BC_SHARED_DATASETS)")
    data_dir = tmp_path_factory.mktemp("an2dl")
    result = _materialize(data_dir, ImageSource(kind="npz", path=str(path)), STAGE)
    assert result.success
    return result, data_dir


def test_an2dl_injected_images_are_all_flagged_and_templates_recovered(an2dl_run):
    """The file's README: clean cells first, then photos and cell/photo blends with random labels.

    The judging files shuffle those; detection does not use positions, so here the position only
    serves as ground truth. The outlier photographs are the templates themselves: an exact blend
    check (below) confirms it, so they are the reference for the recovered templates.
    """
    result, data_dir = an2dl_run
    raw = result.output_for_node("raw_images")
    corrupted = result.output_for_node("corruption_report")
    found_outliers = result.output_for_node("outlier_report")
    clean_part = raw.manifest["source"].str.extract(r"\[(\d+)\]")[0].astype(int) < 2400
    flagged = set(corrupted["index"]) | set(found_outliers["index"])
    injected = set(np.flatnonzero(~clean_part.to_numpy()))
    assert flagged == injected
    blends = corrupted[corrupted["kind"] == "blend"]
    assert not set(blends["index"]) & set(found_outliers["index"])
    # The copies of the photographs are the templates' copies, reported by both stages.
    copies = set(corrupted.loc[corrupted["kind"] == "template copy", "index"])
    assert copies == set(found_outliers["index"])

    templates = result.output_for_node("noise_templates")
    assert templates.dtype == np.uint8 and templates.shape[1:] == (96, 96, 3) and len(templates) >= 1
    photos = raw.images[found_outliers.drop_duplicates("image_id")["index"].to_numpy()]
    for template in templates:
        assert max(psnr(template, photo) for photo in photos) >= 30.0
    # Every corrupted image is explained almost exactly by its base and template.
    assert corrupted["score"].min() > 0.98
    metadata = _metadata(result, "noise_templates")
    assert metadata["decompositions"].value.startswith("![decompositions](data:image/png;base64,")
    report = _metadata(result, "corruption_report")  # the blends are exact: lossless storage, said so
    assert report["noise_assumed"].value.startswith("integer rounding only") and report["noise_rms"].value < 0.3
    assert (data_dir / "reports" / "noise_templates" / "templates.png").is_file()


def test_an2dl_clean_images_keep_exactly_the_clean_part_and_check_passes(an2dl_run):
    result, _ = an2dl_run
    clean = result.output_for_node("clean_images")
    removed = clean.tables["removed"]
    assert set(removed["kind"]) == {"corrupted", "outlier"}
    assert clean.manifest["source"].str.extract(r"\[(\d+)\]")[0].astype(int).max() < 2400
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations["no_flagged_image_in_splits"] is True
    metadata = _metadata(result, "clean_images")
    assert set(metadata["removed_by_reason"].value) >= {"corrupted", "outlier"}


def test_flagged_check_fails_when_a_flagged_image_reaches_a_split(an2dl_run):
    result, _ = an2dl_run
    splits = result.output_for_node("data_splits")
    corrupted = result.output_for_node("corruption_report")
    found_outliers = result.output_for_node("outlier_report")
    assert no_flagged_image_in_splits(splits, found_outliers, corrupted).passed
    leaked = pd.concat([splits, splits.head(1).assign(image_id=corrupted["image_id"].iat[0])], ignore_index=True)
    check = no_flagged_image_in_splits(leaked, found_outliers, corrupted)
    assert not check.passed and check.metadata["leaked"].value == 1


def test_clean_source_gives_empty_reports(pbc_subset_dir: Path, tmp_path: Path):
    result = _materialize(tmp_path / "data", ImageSource(kind="folder", path=str(pbc_subset_dir)), STAGE)
    assert result.success
    assert result.output_for_node("corruption_report").empty
    assert result.output_for_node("outlier_report").empty
    assert result.output_for_node("noise_templates").shape == (0, 96, 96, 3)
    assert len(result.output_for_node("clean_images").manifest) == 320
    # pbc96's cells are JPEG decodes: the trace is seen, and the search at its noise finds nothing either.
    assert _metadata(result, "corruption_report")["noise_assumed"].value.startswith("JPEG at quality")


def test_source_of_non_cell_pictures_fails_with_a_clear_message(tmp_path: Path):
    rng = np.random.default_rng(5)
    nothing = np.zeros((1, 96, 96, 3), np.uint8)
    pictures = np.stack([cf.make_template(["photo", "texture", "drawing"][i % 3], rng, nothing) for i in range(60)])
    path = tmp_path / "photos.npz"
    np.savez(path, images=pictures, labels=rng.integers(0, 8, size=60).astype(np.uint8))
    result = _materialize(tmp_path / "data", ImageSource(kind="npz", path=str(path)), STAGE, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "outlier_report"
    assert "do not look like stained blood smears" in failure.event_specific_data.error.message


def test_a_file_built_with_other_pictures_is_cleaned_through_the_assets(tmp_path: Path):
    """A shuffled file with stain-coloured and dark templates, varying weights, copies: nothing bad reaches a split."""
    cells, labels = load_pbc96_arrays(per_class=60, seed=13)
    spec = cf.FileSpec(templates=(cf.TemplateSpec(kind="stain", weight=0.75, jitter=0.08, bases=7, copies=4),
                                  cf.TemplateSpec(kind="dark", weight=0.35, bases=5, repeats=(3, 6))),
                       clean=420, seed=2)  # fmt: skip
    planted = cf.build_file(cells, labels, spec)
    path = planted.save(tmp_path / "challenge.npz")
    result = _materialize(tmp_path / "data", ImageSource(kind="npz", path=str(path)), STAGE)
    assert result.success
    corrupted = result.output_for_node("corruption_report")
    found_outliers = result.output_for_node("outlier_report")
    bad = set(np.flatnonzero(planted.truth["kind"] != "clean").tolist())
    assert set(corrupted["index"]) | set(found_outliers["index"]) == bad
    assert corrupted["reason"].str.len().min() > 20
    summary = _metadata(result, "noise_templates")["per_template"].value.records
    assert sorted(r.data["blends"] for r in summary) == [5, 7]
    templates = result.output_for_node("noise_templates")
    for truth in planted.templates:
        assert max(psnr(t, truth) for t in templates) >= 30.0
    clean = result.output_for_node("clean_images")
    assert not set(clean.manifest["raw_index"]) & bad
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations["no_flagged_image_in_splits"] is True


@pytest.mark.slow
def test_training_with_template_augmentation_uses_the_recovered_templates(an2dl_run):
    _, data_dir = an2dl_run
    path = shared_datasets_dir() / "an2dl_style" / "training_set.npz"
    config = {"epochs": 1, "image_size": 32, "template_augmentation": True, "template_probability": 1.0}
    result = _materialize(
        data_dir, ImageSource(kind="npz", path=str(path)), ["balanced_train_set", "augmented_train_set", "trained_model"],
        run_config={"ops": {"trained_model": {"config": config}, "augmented_train_set": {"config": {"copies": 0}}}},
        partition_key="custom_cnn",
    )  # fmt: skip
    assert result.success
    assert read_record(data_dir / "assets" / "trained_model" / "custom_cnn").training.augmentation_templates == 2
    assert _metadata(result, "trained_model")["augmentation_templates"].value == 2
