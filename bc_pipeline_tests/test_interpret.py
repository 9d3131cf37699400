"""Test-time augmentation and Grad-CAM on real PBC images: exact views, faithful averages, and heatmaps
that follow the cells."""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.core.plots import gradcam_grid
from bc_pipeline.evaluation import interpret
from bc_pipeline.evaluation.interpret import (
    EXACT_VIEWS,
    TTA_VIEWS,
    example_titles,
    grad_cam,
    gradcam_examples,
    predict_tta,
    tta_view,
)
from bc_pipeline.models.zoo import REGISTRY, build_model, model_spec

NUM_CLASSES = len(CLASS_NAMES)
TRAINED_SIZE = 64  # the custom CNN's smallest size with a 2x2 feature map, so a heatmap can vary


def _centre(images: np.ndarray) -> np.ndarray:
    """The middle half of each image: the cell, away from the corners a rotation fills by reflection."""
    h, w = images.shape[1:3]
    return images[:, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].astype(np.int16)


def _recalibrate_batch_norm(model, images: np.ndarray, passes: int = 2, batch_size: int = 32) -> None:
    """Re-estimate the backbone's batch-norm statistics with the trained weights.

    After a few epochs the moving averages still describe the first, random weights, so inference
    predictions are near chance; a longer run catches up by itself. Two forward passes in training
    mode (20 updates at momentum 0.9) do it in a few seconds instead of more epochs.
    """
    import tensorflow as tf

    resize, preprocess, backbone = (model.get_layer(name) for name in ("resize", "preprocess", "backbone"))
    for _ in range(passes):
        for start in range(0, len(images), batch_size):
            batch = tf.convert_to_tensor(images[start : start + batch_size], tf.float32)
            backbone(preprocess(resize(batch)), training=True)


@pytest.fixture(scope="module")
def trained_cnn(pbc_subset_arrays):
    """The custom CNN at 64 px after four epochs on the 320 real images (~15-25 s on two cores)."""
    import keras

    images, labels = pbc_subset_arrays
    keras.utils.set_random_seed(0)
    model = build_model(model_spec("custom_cnn", image_size=TRAINED_SIZE), NUM_CLASSES)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=4, batch_size=32, verbose=0)
    _recalibrate_batch_norm(model, images)
    return model


@pytest.fixture(scope="module")
def trained_predictions(trained_cnn, pbc_subset_arrays) -> np.ndarray:
    from bc_pipeline.models.inference import predict_proba

    return predict_proba(trained_cnn, pbc_subset_arrays[0]).argmax(axis=1)


@pytest.fixture(scope="module")
def zoo_models() -> dict:
    """Every registered model, untrained, at 32 px: built once for the module (~10-30 s)."""
    return {name: build_model(model_spec(name, image_size=32), NUM_CLASSES) for name in REGISTRY}


# --- test-time augmentation views -------------------------------------------------------------


def test_identity_and_flip_views_are_exact(pbc_subset_arrays):
    images, _ = pbc_subset_arrays
    identity = tta_view(images, "identity")
    assert identity.dtype == np.uint8 and identity.tobytes() == images.tobytes()
    assert identity is not images
    np.testing.assert_array_equal(tta_view(images, "flip_lr"), images[:, :, ::-1])
    np.testing.assert_array_equal(tta_view(images, "flip_ud"), images[:, ::-1])
    for flip in ("flip_lr", "flip_ud"):
        assert not np.array_equal(tta_view(images, flip), images)
        np.testing.assert_array_equal(tta_view(tta_view(images, flip), flip), images)


def test_exact_views_are_the_eight_symmetries_of_the_square(pbc_subset_arrays):
    images = pbc_subset_arrays[0][:6]
    views = {name: tta_view(images, name) for name in EXACT_VIEWS}
    assert len(views) == 8
    for name, view in views.items():
        assert view.shape == images.shape and view.dtype == np.uint8 and view.flags.c_contiguous, name
        np.testing.assert_array_equal(np.sort(view, axis=None), np.sort(images, axis=None))  # pixels moved, none changed
    keys = {view.tobytes() for view in views.values()}
    assert len(keys) == 8, "real cells are not symmetric: every symmetry gives another image"
    np.testing.assert_array_equal(views["rot90"], tta_view(images, "rotate+90"))
    np.testing.assert_array_equal(tta_view(tta_view(views["rot90"], "rot90"), "rot180"), images)
    np.testing.assert_array_equal(tta_view(views["transpose"], "rot180"), views["antitranspose"])


def test_small_rotations_turn_the_cell_and_undo_each_other(pbc_subset_arrays):
    images, _ = pbc_subset_arrays
    turned = tta_view(images, "rotate+10")
    back = tta_view(turned, "rotate-10")
    assert turned.shape == images.shape and turned.dtype == np.uint8
    moved = np.abs(_centre(turned) - _centre(images)).mean(axis=(1, 2, 3))
    residual = np.abs(_centre(back) - _centre(images)).mean(axis=(1, 2, 3))
    # Undoing leaves only the blur of two bilinear resamplings; the turn itself moves every cell more.
    assert residual.mean() < 6 and moved.mean() > 10
    assert np.mean(residual < moved) >= 0.95


def test_rotation_direction_and_agreement_with_scipy(pbc_subset_arrays):
    from scipy import ndimage

    images = pbc_subset_arrays[0][:12]
    # A quarter turn is exact: counter-clockwise, like np.rot90.
    np.testing.assert_array_equal(tta_view(images, "rotate+90"), np.rot90(images, 1, axes=(1, 2)))
    for angle in (10, -10):
        turned = ndimage.rotate(images.astype(np.float32), angle, axes=(2, 1), reshape=False, order=1, mode="reflect")
        reference = np.clip(np.rint(turned), 0, 255)
        assert np.abs(tta_view(images, f"rotate{angle:+d}") - reference).max() <= 1


def test_unknown_view_names_the_valid_ones(pbc_subset_arrays):
    images = pbc_subset_arrays[0][:2]
    with pytest.raises(ValueError, match="identity, flip_lr, flip_ud, rot90, rot180, rot270, transpose, antitranspose \\(or rotate\\+D / rotate-D\\)"):
        tta_view(images, "mirror")
    with pytest.raises(ValueError, match="unknown TTA view"):
        tta_view(images, "rotate10")


@pytest.mark.slow
def test_predict_tta_is_the_mean_over_views_chunk_by_chunk(trained_cnn, pbc_subset_arrays, monkeypatch):
    from bc_pipeline.models.inference import predict_proba

    images = pbc_subset_arrays[0][::13]  # 25 images across the classes
    per_view = np.stack([predict_proba(trained_cnn, tta_view(images, view)) for view in TTA_VIEWS])
    assert np.abs(per_view - per_view[0]).max() > 1e-3  # the views do change the predictions
    monkeypatch.setattr(interpret, "TTA_CHUNK", 10)  # three chunks: 10, 10, 5
    averaged = predict_tta(trained_cnn, images, batch_size=4)
    assert averaged.shape == (len(images), NUM_CLASSES) and averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, per_view.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(averaged.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown TTA view"):
        predict_tta(trained_cnn, images, views=("identity", "flip"))


# --- Grad-CAM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REGISTRY))
def test_grad_cam_works_for_every_registered_model(name, zoo_models, pbc_subset_arrays):
    images = pbc_subset_arrays[0][[0, 50, 150, 300]]
    maps = grad_cam(zoo_models[name], images, [0, 3, 5, 7])
    assert maps.shape == (4, 96, 96) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    crops = np.ascontiguousarray(images[:2, 8:88, 16:80])  # any input size: maps come back at it
    assert grad_cam(zoo_models[name], crops, [1, 2]).shape == (2, 80, 64)


def test_grad_cam_checks_its_arguments(zoo_models, pbc_subset_arrays):
    model, images = zoo_models["custom_cnn"], pbc_subset_arrays[0][:3]
    with pytest.raises(ValueError, match="3 images but 2 class indices"):
        grad_cam(model, images, [0, 1])
    assert grad_cam(model, images[:0], []).shape == (0, 96, 96)


@pytest.mark.slow
def test_trained_heatmaps_vary_over_the_image(trained_cnn, trained_predictions, pbc_subset_arrays):
    images = pbc_subset_arrays[0][::20]
    maps = grad_cam(trained_cnn, images, trained_predictions[::20], batch_size=8)
    assert maps.shape == (16, 96, 96) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)  # every map has evidence, scaled to peak at 1
    spread = maps.max(axis=(1, 2)) - maps.min(axis=(1, 2))
    # A 2x2 feature map upsampled: never flat, though a cell spread over all four cells varies little.
    assert (spread > 0.01).all() and np.median(spread) > 0.1, spread


@pytest.mark.slow
def test_grad_cam_follows_the_cell_of_its_class(trained_cnn, pbc_subset_arrays):
    """Mosaics of real cells: two of class a on the left, two of class b on the right.

    The map for a must lie on the left, the map for b on the right (Grad-CAM's class-discriminative
    localisation). The trained network is applied at 128 px to the 192 px mosaic (same weights:
    convolutions and global pooling take any size), so cells keep the 2/3 scale it trained on and the
    4x4 feature map has positions that see one half of the mosaic; at 64 px each of the 2x2
    positions sees the whole input (receptive field 94 px) and nothing can be localised.
    """
    images, labels = pbc_subset_arrays
    wide = build_model(model_spec("custom_cnn", image_size=2 * TRAINED_SIZE), NUM_CLASSES)
    wide.set_weights(trained_cnn.get_weights())
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(NUM_CLASSES) for b in range(NUM_CLASSES) if a != b]
    mosaics = []
    for a, b in pairs:
        left = images[rng.choice(np.flatnonzero(labels == a), 2, replace=False)]
        right = images[rng.choice(np.flatnonzero(labels == b), 2, replace=False)]
        mosaics.append(np.concatenate([np.concatenate(left, axis=0), np.concatenate(right, axis=0)], axis=1))
    mosaics = np.stack(mosaics)  # (56, 192, 192, 3)
    maps_a = grad_cam(wide, mosaics, [a for a, _ in pairs])
    maps_b = grad_cam(wide, mosaics, [b for _, b in pairs])
    half = mosaics.shape[2] // 2

    def left_share(maps: np.ndarray) -> np.ndarray:
        return maps[:, :, :half].sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-9)

    share_a, share_b = left_share(maps_a), left_share(maps_b)
    assert np.mean(share_a > 0.5) >= 0.75 and np.mean(share_b < 0.5) >= 0.75, (share_a, share_b)
    assert np.mean(share_a > share_b) >= 0.85
    assert share_a.mean() - share_b.mean() > 0.3


@pytest.mark.slow
def test_gradcam_examples_pick_right_and_wrong_predictions(trained_predictions, pbc_subset_arrays):
    labels = pbc_subset_arrays[1]
    predictions = trained_predictions
    assert 0 < np.mean(predictions == labels) < 1  # both kinds exist
    for per_class in (1, 2):
        chosen = gradcam_examples(labels, predictions, NUM_CLASSES, per_class=per_class, seed=0)
        assert list(chosen.columns) == ["class", "kind", "index"]
        assert set(chosen["kind"]) == {"correct", "wrong"}
        for label, kind, index in chosen.itertuples(index=False, name=None):
            assert labels[index] == label  # "class" is the true class
            assert (predictions[index] == label) == (kind == "correct")
        for label in range(NUM_CLASSES):
            members = labels == label
            right = members & (predictions == label)
            available = {"correct": np.sum(right), "wrong": np.sum(members & ~right)}
            for kind, count in available.items():
                picked = chosen[(chosen["class"] == label) & (chosen["kind"] == kind)]
                assert len(picked) == min(per_class, count)
        assert not chosen["index"].duplicated().any()
        again = gradcam_examples(labels, predictions, NUM_CLASSES, per_class=per_class, seed=0)
        assert chosen.equals(again)  # a fixed seed: the same cells every run


def test_gradcam_examples_without_mistakes_has_no_wrong_rows():
    labels = np.array([0, 0, 1, 1, 1])
    chosen = gradcam_examples(labels, labels, num_classes=3, per_class=5)
    assert set(chosen["kind"]) == {"correct"}
    assert sorted(chosen["index"]) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_gradcam_grid_renders_a_png(trained_cnn, trained_predictions, pbc_subset_arrays):
    from io import BytesIO

    from PIL import Image

    images, labels = pbc_subset_arrays
    picks = gradcam_examples(labels, trained_predictions, NUM_CLASSES, per_class=1)["index"].to_numpy()[:6]
    maps = grad_cam(trained_cnn, images[picks], trained_predictions[picks])
    titles = example_titles(labels[picks], trained_predictions[picks], CLASS_NAMES)
    assert all(t.endswith(" ok") or " -> " in t for t in titles)
    png = gradcam_grid(images[picks], maps, titles, columns=3, title="Grad-CAM")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(BytesIO(png)).size[0] > 100


def test_example_titles_read_like_the_reports():
    assert example_titles([2, 3], [2, 1], ["basophil", "eosinophil", "neutrophil", "monocyte"]) == [
        "neutrophil ok",
        "monocyte -> eosinophil",
    ]
