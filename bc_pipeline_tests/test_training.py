"""The CNN, its class weights, its config, and a saved model that predicts like the original."""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.assets.training import TrainingConfig
from bc_pipeline.lib.balancing import class_weights
from bc_pipeline.lib.training import TrainingSettings


def test_balanced_class_weights_equalise_class_mass():
    labels = np.array([0] * 60 + [1] * 30 + [3] * 10)
    weights = class_weights(labels, num_classes=4)
    assert set(weights) == {0, 1, 3}
    mass = {c: weights[c] * np.sum(labels == c) for c in weights}
    assert np.allclose(list(mass.values()), len(labels) / 3)


def test_config_maps_onto_every_training_setting():
    config = TrainingConfig(epochs=3, image_size=48, learning_rate=0.01, augment=False)
    settings = config.settings()
    assert isinstance(settings, TrainingSettings)
    assert (settings.epochs, settings.image_size, settings.learning_rate, settings.augment) == (3, 48, 0.01, False)
    assert TrainingConfig().settings() == TrainingSettings()
    with pytest.raises(Exception):
        TrainingConfig(image_size=16)


def test_cnn_follows_the_seed_design_and_takes_any_input_size():
    from bc_pipeline.lib.model import build_cnn

    model = build_cnn(8, image_size=32)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [layer.filters for layer in convs] == [32, 64, 128, 256, 512]
    assert sum(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers) == 5
    assert sum(layer.__class__.__name__ == "MaxPooling2D" for layer in model.layers) == 5
    for size in (28, 96):
        out = model.predict(np.zeros((2, size, size, 3), np.float32), verbose=0)
        assert out.shape == (2, 8)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="too small"):
        build_cnn(8, image_size=16)


@pytest.mark.slow
def test_training_learns_a_real_subset_and_logs_each_epoch():
    from bc_pipeline.lib.training import predict_proba, train_classifier
    from bc_pipeline_tests.conftest import load_pbc96_arrays

    images, labels = load_pbc96_arrays(per_class=80, seed=3)
    order = np.random.default_rng(0).permutation(len(images))
    train, val = order[:512], order[512:]
    lines: list[str] = []
    result = train_classifier(
        images[train], labels[train], images[val], labels[val], num_classes=8,
        settings=TrainingSettings(epochs=8, batch_size=32, patience=20), log=lines.append,
    )  # fmt: skip
    assert [line.split(":")[0] for line in lines[1:]] == [f"epoch {i}/8" for i in range(1, 9)]
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    # Inference-mode accuracy, well above chance (0.125) after 8 short epochs on 512 images.
    assert (predict_proba(result.model, images[train]).argmax(1) == labels[train]).mean() > 0.5
    assert (predict_proba(result.model, images[val]).argmax(1) == labels[val]).mean() > 0.35


def test_template_augmentation_blends_a_recovered_template_with_a_bounded_weight():
    import tensorflow as tf

    from bc_pipeline.lib.training import _template_blender

    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
    images = rng.uniform(0, 255, size=(200, 8, 8, 3)).astype(np.float32)
    tf.random.set_seed(1)
    blend = _template_blender(templates, probability=1.0, max_weight=0.3)
    weights = []
    for image in images:
        out = blend(tf.constant(image), 0)[0].numpy()
        # out = (1 - w) x + w T_k for one k: solve w for each template, keep the exact one.
        fits = []
        for template in templates:
            d = (template - image).ravel()
            w = float(((out - image).ravel() @ d) / (d @ d))
            fits.append((np.abs(image + w * (template - image) - out).max(), w))
        error, w = min(fits)
        assert error < 1e-3
        weights.append(w)
    assert 0.0 <= min(weights) and max(weights) <= 0.3 + 1e-6 and np.std(weights) > 0.05
    never = _template_blender(templates, probability=0.0, max_weight=0.3)
    np.testing.assert_array_equal(never(tf.constant(images[0]), 0)[0].numpy(), images[0])


def test_template_augmentation_is_off_by_default_and_skipped_without_templates():
    from bc_pipeline.lib.model import build_cnn
    from bc_pipeline.lib.training import _templates_for

    assert TrainingConfig().template_augmentation is False
    model = build_cnn(8, image_size=32)
    lines: list[str] = []
    on = TrainingSettings(template_augmentation=True)
    assert _templates_for(model, np.zeros((0, 96, 96, 3), np.uint8), on, lines.append) is None
    assert "no corruption templates" in lines[-1]
    resized = _templates_for(model, np.zeros((2, 96, 96, 3), np.uint8), on, lines.append)
    assert resized.shape == (2, 32, 32, 3)
    assert _templates_for(model, np.zeros((2, 96, 96, 3), np.uint8), TrainingSettings(), lines.append) is None
