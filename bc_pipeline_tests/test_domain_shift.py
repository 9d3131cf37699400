"""Lab shift on real cells: the shifts themselves, external labelled folders, and how both are scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.evaluation.framing import CONFIDENCE, ZOOMS, apply_framing, bootstrap_evidence, calibrate_framing, zoom_images
from bc_pipeline.training.adaptation import AdaptationSettings
from bc_pipeline.evaluation.external import confusions_in_words, load_external_sets, parse_external_sets, score_external
from bc_pipeline.evaluation.lab_shift import (
    SHIFTS,
    ShiftSettings,
    balanced_accuracy,
    build_shift_set,
    seen_shifts,
    shift_images,
    shift_scores,
    with_shifted_copies,
)
from bc_pipeline.ingest.loaders import ImageSourceError
from bc_pipeline_tests.conftest import load_pbc96_arrays, pbc96_files


@pytest.fixture(scope="module")
def cells() -> tuple[np.ndarray, np.ndarray]:
    return load_pbc96_arrays(per_class=6, seed=4)


@pytest.mark.parametrize("shift", SHIFTS)
def test_each_shift_moves_real_cells_further_from_the_original_as_its_severity_rises(cells, shift):
    images, _ = cells
    distance = [np.abs(shift_images(images, shift, s, seed=0).astype(float) - images).mean() for s in (1, 3, 5)]
    assert 0 < distance[0] < distance[1] < distance[2], distance
    np.testing.assert_array_equal(shift_images(images, shift, 3, seed=0), shift_images(images, shift, 3, seed=0))
    assert not np.array_equal(shift_images(images, shift, 3, seed=0), shift_images(images, shift, 3, seed=1))


def _dark_share(images: np.ndarray) -> float:
    """Share of pixels darker than the cell's surroundings: nucleus and dense cytoplasm."""
    return float((images.astype(float).mean(axis=-1) < 120).mean())


def test_framing_enlarges_the_cell_and_stain_keeps_its_shape_but_not_its_colour(cells):
    images, _ = cells
    shares = [_dark_share(shift_images(images, "framing", s, seed=0)) for s in (1, 5)]
    assert _dark_share(images) < shares[0] < shares[1], "the cell fills more of the frame"

    stained = shift_images(images, "stain", 5, seed=0).astype(float)
    grey, grey_stained = images.astype(float).mean(-1), stained.mean(-1)
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(grey, grey_stained)]
    assert min(correlation) > 0.9, "the same cell, in the same place"
    hue_change = np.abs(stained.mean((1, 2)) - images.astype(float).mean((1, 2))).max(axis=1)
    assert np.median(hue_change) > 5, "another stain's colours"


def test_the_scale_preset_makes_cells_smaller_and_larger_and_stain_keeps_them_in_place(cells):
    from bc_pipeline.augmentation.presets import augment_images

    images, _ = cells
    scaled = augment_images(images, "scale", seed=0)
    assert scaled.shape == images.shape
    ratio = np.array([_dark_share(a[None]) / max(_dark_share(b[None]), 1e-3) for a, b in zip(scaled, images)])
    assert (ratio < 0.7).sum() >= 5 and (ratio > 1.3).sum() >= 5, "zoomed out and in, about as often"
    stained = augment_images(images, "stain", seed=0).astype(float)
    correlation = [np.corrcoef(a.mean(-1).ravel(), b.mean(-1).ravel())[0, 1] for a, b in zip(images.astype(float), stained)]
    assert min(correlation) > 0.9
    assert np.median(np.abs(stained.mean((1, 2)) - images.astype(float).mean((1, 2))).max(axis=1)) > 2


def test_turning_the_dyes_changes_the_hue_of_nuclei_not_the_cell(cells):
    """``stain_jitter(turn=30)`` draws the same amounts as without a turn, then turns the dye vectors: nuclei
    change chromaticity (median 0.05 on these cells, up to 0.14) while the cell's light and dark stay put."""
    from bc_pipeline.augmentation.lab import stain_jitter

    images, _ = cells
    plain = stain_jitter(3)(images.astype(np.float32)).numpy()
    turned = stain_jitter(3, turn=30.0)(images.astype(np.float32)).numpy()
    brightness = images.mean(-1)
    nuclei = brightness < np.percentile(brightness, 20, axis=(1, 2), keepdims=True)

    def chroma(x: np.ndarray) -> np.ndarray:
        return x / (x.sum(-1, keepdims=True) + 1e-3)

    change = np.array([np.abs(chroma(plain[i]) - chroma(turned[i]))[nuclei[i]].mean() for i in range(len(images))])
    assert np.median(change) > 0.025 and change.max() > 0.08, change
    kept = [np.corrcoef(plain[i].mean(-1).ravel(), turned[i].mean(-1).ravel())[0, 1] for i in range(len(images))]
    assert min(kept) > 0.95


def test_bad_shift_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown lab shift.*sunburn.*choose from stain"):
        ShiftSettings(shifts=("stain", "sunburn"))
    with pytest.raises(ValueError, match="severities must be in 1-5"):
        ShiftSettings(severities=(0, 3))
    with pytest.raises(ValueError, match="square uint8 RGB"):
        shift_images(np.zeros((2, 32, 48, 3), np.uint8), "stain", 1, seed=0)


def test_the_shift_set_covers_every_shift_and_severity_and_is_scored_per_cell(cells):
    images, labels = cells
    shifted, manifest = build_shift_set(images, labels, np.arange(len(labels)) + 100, ShiftSettings(shifts=("stain", "lab"), severities=(2, 4)))
    assert len(shifted) == len(manifest) == 4 * len(images)
    assert manifest.groupby(["shift", "severity"]).size().tolist() == [len(images)] * 4
    np.testing.assert_array_equal(shifted[: len(images)], shift_images(images, "stain", 2, seed=ShiftSettings().seed))
    assert manifest["clean_index"].min() == 100
    # A predictor that is right on every image but the first of each cell.
    predicted = manifest["label"].to_numpy().copy()
    predicted[:: len(images)] = (predicted[:: len(images)] + 1) % 8
    table = shift_scores(manifest["label"].to_numpy(), predicted, manifest)
    assert table["accuracy"].tolist() == pytest.approx([1 - 1 / len(images)] * 4)
    assert (table["balanced_accuracy"] < 1).all() and (table["balanced_accuracy"] > table["accuracy"] - 0.2).all()


def test_seen_shifts_follow_the_training_presets():
    assert seen_shifts(["augmix", "noise"]) == []
    assert seen_shifts(["illumination", "focus"]) == ["stain", "white_balance", "optics"]
    assert seen_shifts(["illumination", "focus", "light"]) == ["stain", "white_balance", "framing", "optics", "lab"]
    assert seen_shifts(["augmix"], selected_on_shifts=True) == list(SHIFTS)


def test_a_shifted_validation_set_keeps_the_cells_and_adds_each_shift_at_every_severity(cells):
    images, labels = cells
    shifted, shifted_labels = with_shifted_copies(images, labels, seed=7)
    n = len(images)
    assert shifted.shape == (6 * n, *images.shape[1:]) and shifted.dtype == np.uint8
    np.testing.assert_array_equal(shifted[:n], images)
    expected = np.concatenate([labels] + [labels[k::5] for _ in SHIFTS for k in range(5)])
    np.testing.assert_array_equal(shifted_labels, expected)
    assert np.bincount(shifted_labels, minlength=8).tolist() == (6 * np.bincount(labels, minlength=8)).tolist()
    # The first copy is the stain shift: every fifth cell at severity 1, the next at 2, ...
    block = shifted[n : 2 * n]
    np.testing.assert_array_equal(block[: len(images[0::5])], shift_images(images[0::5], "stain", 1, seed=7))
    assert not np.array_equal(block, images)
    np.testing.assert_array_equal(with_shifted_copies(images, labels, seed=7)[0], shifted)  # the same set every run


def test_selection_on_lab_shifts_is_refused_where_the_validation_split_is_not_only_judged():
    from bc_pipeline.training.settings import TrainingSettings

    assert TrainingSettings(selection="lab_shifts").selection == "lab_shifts"
    for conflicting in ({"cv_folds": 3}, {"retrain_on_validation": True}):
        with pytest.raises(ValueError, match="cannot be combined with cv_folds"):
            TrainingSettings(selection="lab_shifts", **conflicting)
    with pytest.raises(ValueError, match="unknown selection 'shifted'"):
        TrainingSettings(selection="shifted")


def test_balanced_accuracy_weighs_each_present_class_alike():
    truth = np.array([0] * 90 + [4] * 10)
    predicted = np.array([0] * 90 + [3] * 10)  # every lymphocyte called an immature granulocyte
    assert balanced_accuracy(truth, predicted) == pytest.approx(0.5)
    score = score_external(truth, predicted, CLASS_NAMES)
    assert score["accuracy"] == pytest.approx(0.9) and score["classes"] == ["basophil", "lymphocyte"]
    assert score["confusion"].loc["lymphocyte", "ig"] == 10 and score["recall"] == {"basophil": 1.0, "lymphocyte": 0.0}
    assert confusions_in_words(score) == ["10 of 10 lymphocyte called ig (100%)"]


def test_external_sets_are_parsed_with_clear_errors(tmp_path: Path):
    assert parse_external_sets("") == {}
    assert parse_external_sets(f" lab_a={tmp_path} ; lab-b = {tmp_path}/x ") == {"lab_a": tmp_path, "lab-b": tmp_path / "x"}
    with pytest.raises(ValueError, match="'lab_a' is not name=folder"):
        parse_external_sets("lab_a")
    with pytest.raises(ValueError, match="only letters"):
        parse_external_sets(f"my lab={tmp_path}")
    with pytest.raises(ValueError, match="given twice"):
        parse_external_sets(f"a={tmp_path};a={tmp_path}")


def test_an_external_folder_loads_known_classes_and_records_the_rest(tmp_path: Path):
    root = tmp_path / "otherlab"
    for file, label in pbc96_files(per_class=2, seed=9):
        if CLASS_NAMES[label] in ("monocyte", "platelet"):
            (root / CLASS_NAMES[label].upper()).mkdir(parents=True, exist_ok=True)  # names match case-insensitively
            Image.open(file).resize((150, 150)).save(root / CLASS_NAMES[label].upper() / f"{file.stem}.png")
    (root / "artifact").mkdir()
    (root / "artifact" / "a.png").write_bytes(b"")
    (root / "MONOCYTE" / "broken.jpg").write_bytes(b"not an image")
    loaded = load_external_sets({"otherlab": root}, class_names=CLASS_NAMES, image_size=96)
    assert loaded.images.shape == (4, 96, 96, 3)
    assert loaded.manifest["class_name"].value_counts().to_dict() == {"monocyte": 2, "platelet": 2}
    reasons = dict(zip(loaded.skipped["source"], loaded.skipped["reason"]))
    assert "not among the classes" in reasons["artifact/"] and any("broken.jpg" in source for source in reasons)
    with pytest.raises(ImageSourceError, match="external set 'gone': folder .*missing not found"):
        load_external_sets({"gone": tmp_path / "missing"}, class_names=CLASS_NAMES, image_size=96)
    empty = load_external_sets({}, class_names=CLASS_NAMES, image_size=96)
    assert empty.images.shape == (0, 96, 96, 3) and list(empty.manifest.columns) == ["set", "source", "label", "class_name"]
    assert isinstance(empty.skipped, pd.DataFrame)


def test_few_shot_draws_grow_by_prefix_and_always_leave_cells_to_score():
    from bc_pipeline.training.adaptation import few_shot_split

    labels = np.array([0] * 30 + [3] * 7 + [5] * 1)
    five, rest_five = few_shot_split(labels, 5, seed=0)
    ten, rest_ten = few_shot_split(labels, 10, seed=0)
    assert np.bincount(labels[five], minlength=6).tolist() == [5, 0, 0, 3, 0, 0], "half of a small class, none of a single cell"
    assert np.bincount(labels[ten], minlength=6).tolist() == [10, 0, 0, 3, 0, 0]
    assert set(five) <= set(ten) and set(rest_ten) <= set(rest_five)
    assert sorted([*ten, *rest_ten]) == list(range(len(labels)))


@pytest.fixture(scope="module")
def pbc_model():
    """A small CNN trained on 480 PBC cells (PBC framing and colours; ~75 % accurate), and its trained weights.

    Framing calibration reads the model's predictions, so it needs a model that knows its classes
    (at 6 epochs on 320 cells, 42 %, the choice is noise); both tests share this one."""
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec

    train_x, train_y = load_pbc96_arrays(per_class=60, seed=1)
    keras.utils.set_random_seed(0)
    model = build_model(model_spec("custom_cnn", image_size=48), 8)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(train_x.astype(np.float32), train_y, epochs=10, batch_size=32, verbose=0)
    return model, model.get_weights()


def test_zoom_scales_a_centred_disc_both_ways():
    yy, xx = np.mgrid[:96, :96]
    disc = np.where(((yy - 47.5) ** 2 + (xx - 47.5) ** 2 < 20**2)[..., None], 40, 220).astype(np.uint8)
    disc = np.repeat(disc[None], 1, axis=0).repeat(3, axis=-1)
    area = (disc[0, ..., 0] < 128).sum()
    for factor in (0.707, 2.0):
        zoomed = zoom_images(disc, factor)
        assert zoomed.shape == disc.shape and zoomed.dtype == np.uint8
        assert (zoomed[0, ..., 0] < 128).sum() / area == pytest.approx(factor**2, rel=0.08), factor
    assert zoom_images(disc, 1.0) is disc
    with pytest.raises(ValueError, match="positive"):
        zoom_images(disc, 0)
    never_called = lambda batch: pytest.fail("no prediction needed")  # noqa: E731
    assert apply_framing(never_called, disc, "none")[1:] == (1.0, "as given")
    np.testing.assert_array_equal(apply_framing(never_called, disc, 2.0)[0], zoom_images(disc, 2.0))
    with pytest.raises(ValueError, match="framing must be 'auto' or 'none'"):
        AdaptationSettings(framing="wide")


def test_framing_calibration_finds_the_zoom_of_cells_shown_at_half_their_size(pbc_model):
    """The zoom comes from the model's predictions over the unlabelled set: back to ~2x for shrunken cells, ~1x for PBC's own."""
    from bc_pipeline.models.inference import predict_proba

    model, weights = pbc_model
    model.set_weights(weights)
    lab_x, lab_y = load_pbc96_arrays(per_class=30, seed=5)
    predict = lambda batch: predict_proba(model, batch)  # noqa: E731
    own, _ = calibrate_framing(predict, lab_x)
    assert 0.8 <= own.zoom <= 1.2, own  # 0.84, 1 or 1.19
    small = zoom_images(lab_x, 0.5)
    found, probabilities = calibrate_framing(predict, small)
    assert 1.6 <= found.zoom <= 2.4, found
    assert found.information[found.zoom] > found.information[1.0]
    as_given = (predict(small).argmax(1) == lab_y).mean()
    assert (probabilities.argmax(1) == lab_y).mean() > as_given + 0.1
    few, _ = calibrate_framing(predict, small[:5])
    assert few.zoom == 1.0 and "fewer than" in few.reason
    reused, _ = calibrate_framing(predict, small, as_given=predict(small))
    assert reused.zoom == found.zoom and reused.information == pytest.approx(found.information)


@pytest.mark.parametrize(("power", "kept"), [(1.02, 1.0), (1.05, 1.0), (3.0, 1.189)])
def test_a_zoom_that_wins_only_by_which_cells_are_in_the_set_leaves_the_set_as_given(power, kept):
    """At 1.189x the same predictions, shuffled over the cells and sharpened by ``power``: a little sharper wins
    the information by chance of the sample (in 64 % and 80 % of resamples), much sharper in all of them."""
    rng = np.random.default_rng(0)
    given = rng.dirichlet(np.full(8, 0.5), 60)
    sharper = given[rng.permutation(60)] ** power
    sharper /= sharper.sum(1, keepdims=True)
    outputs = iter([sharper if zoom == 1.189 else given for zoom in ZOOMS])
    calibration, probabilities = calibrate_framing(lambda batch: next(outputs), np.zeros((60, 8, 8, 3), np.uint8))
    assert max(calibration.information, key=calibration.information.get) == 1.189
    assert calibration.zoom == kept and (calibration.evidence < CONFIDENCE) == (kept == 1.0), calibration
    np.testing.assert_array_equal(probabilities, given if kept == 1.0 else sharper)
    assert ("left as given" in calibration.reason) == (kept == 1.0)
    assert 0.3 < bootstrap_evidence(given[rng.permutation(60)], given) < 0.7  # the same predictions, other cells


def test_a_few_labelled_cells_of_another_lab_win_back_accuracy(cells, pbc_model):
    """A model trained on PBC framing and colours, facing a 'lab' with another stain, lamp, camera and crop."""
    from bc_pipeline.evaluation.external import adaptation_curve

    model, weights = pbc_model

    def fresh():
        model.set_weights(weights)
        return model

    lab_x, lab_y = load_pbc96_arrays(per_class=30, seed=5)
    other_lab = shift_images(lab_x, "lab", 5, seed=0)
    curve = adaptation_curve(fresh, other_lab, lab_y, CLASS_NAMES, shots=(10,), settings=AdaptationSettings(epochs=10, learning_rate=1e-3, copies=("stain", "scale")))
    assert curve["per_class"].tolist() == [0, 10] and curve["evaluated"].nunique() == 1 and curve["labelled"].tolist() == [0, 80]
    before, after = curve["balanced_accuracy"].tolist()
    assert after > before + 0.1, curve
