"""The model zoo: every registered model builds and trains, preprocessing matches Keras, weights load."""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.models.zoo import (
    CUSTOM_CNN,
    FAMILIES,
    REGISTRY,
    WeightsUnavailableError,
    backbone_layers,
    build_model,
    model_spec,
    parse_trainable,
    set_trainable,
)


def _batch(n: int = 8, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import keras

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3)).astype(np.float32)
    return images, keras.utils.to_categorical(np.arange(n) % 8, 8)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_model_builds_and_takes_a_training_step(name):
    """One optimizer step of each model, run eagerly: the same layers, loss and gradients, without
    tracing the step into a graph (38 s of a large backbone's 41 s here). The compiled step is what
    training runs: custom_cnn and mobilenetv3small train compiled in the asset, worker and fault
    tests, and ``bench/bench_models.py`` times every family's compiled step."""
    from bc_pipeline.training.worker.fit import make_loss, make_optimizer

    model = build_model(model_spec(name, image_size=32), num_classes=8)
    assert [layer.name for layer in model.layers] == ["image", "resize", "preprocess", "backbone", "head"]
    set_trainable(model, "all")
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"), run_eagerly=True)
    images, labels = _batch()
    before = [w.copy() for w in model.get_layer("head").get_weights()]
    loss = float(model.train_on_batch(images, labels))
    assert np.isfinite(loss)
    after = model.get_layer("head").get_weights()
    assert any(not np.array_equal(b, a) for b, a in zip(before, after))
    probabilities = model.predict_on_batch(images)
    assert probabilities.shape == (8, 8)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_registry_names_the_required_models_and_every_family_has_a_constructor():
    import keras

    from bc_pipeline.models.zoo import PACKAGED_WEIGHTS, _constructor

    assert {"custom_cnn", "efficientnetv2b0", "mobilenetv3small", "convnext_tiny", "resnet50", "efficientnet_lite0"} <= set(REGISTRY)
    for name, family in FAMILIES.items():
        # keras.applications' own, except the families whose weights install as a package (their port is here)
        assert callable(_constructor(family)), family.constructor
        assert (name in PACKAGED_WEIGHTS) != hasattr(keras.applications, family.constructor), name
    assert model_spec("resnet50", image_size=48, head="inception").image_size == 48
    with pytest.raises(KeyError, match="no model named"):
        model_spec("alexnet")
    with pytest.raises(ValueError, match="below the backbone's minimum"):
        model_spec("custom_cnn", image_size=16)
    with pytest.raises(ValueError, match="unknown head"):
        model_spec("custom_cnn", head="transformer")


def test_custom_cnn_keeps_the_seed_design():
    model = build_model(model_spec("custom_cnn"), num_classes=8)
    backbone = model.get_layer("backbone")
    convs = [layer for layer in backbone.layers if layer.__class__.__name__ == "Conv2D"]
    assert [layer.filters for layer in convs] == [32, 64, 128, 256, 512]
    assert sum(layer.__class__.__name__ == "MaxPooling2D" for layer in backbone.layers) == 5
    for size in (28, 96):
        out = model.predict(np.zeros((2, size, size, 3), np.float32), verbose=0)
        assert out.shape == (2, 8)


@pytest.mark.parametrize(
    ("family", "module"),
    [("resnet50", "resnet50"), ("densenet121", "densenet"), ("mobilenetv2", "mobilenet_v2"), ("vgg16", "vgg16")],
)
def test_preprocessing_layers_match_keras_preprocess_input(family, module):
    """The in-model preprocessing equals keras.applications.<module>.preprocess_input (caffe, torch, tf)."""
    import keras

    from bc_pipeline.models.zoo import _build_preprocessing

    images, _ = _batch(4, size=32, seed=1)
    ours = np.asarray(_build_preprocessing(FAMILIES[family].preprocessing, 32)(images))
    theirs = getattr(keras.applications, module).preprocess_input(images.copy())
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-3)


def test_a_run_can_standardise_each_image_of_any_model_and_it_becomes_blind_to_contrast():
    """``input_norm: image`` (robust-cpu's setting) reaches the model through the run config and makes
    its outputs the same for an image and any brighter or flatter copy of it; without it they differ."""
    from bc_pipeline.defs.assets.training import TrainingConfig

    images, _ = _batch(n=4)
    flatter = images * 0.2 + 90.0  # ImageNet-C contrast at severity 5 is a 0.05 gain towards the mean
    outputs = {}
    for norm in ("none", "image"):
        spec = TrainingConfig(input_norm=norm).spec(CUSTOM_CNN)  # its registry entry says "channel"
        assert spec.input_norm == norm
        model = build_model(spec, num_classes=8)
        outputs[norm] = np.abs(model.predict(images, verbose=0) - model.predict(flatter, verbose=0)).max()
    assert outputs["image"] < 1e-4 < outputs["none"]
    with pytest.raises(ValueError, match="unknown input_norm 'bogus' \\(none, image, channel, reference\\)"):
        TrainingConfig(input_norm="bogus").spec("efficientnet_lite0")


@pytest.mark.parametrize(("name", "norm"), [(CUSTOM_CNN, "group"), ("mobilenetv3small", "layer")])
def test_a_run_can_train_without_batch_norm_and_each_image_is_then_normalised_alone(name, norm, tmp_path):
    """``norm: group | layer`` reaches the model through the run config, replaces every BatchNorm (the
    custom CNN's own and a keras.applications backbone's), and in training mode a cell's output no
    longer depends on the other cells of its batch (BatchNorm's does: it normalises by the batch). The
    model trains and saves as a plain .keras file."""
    import keras

    from bc_pipeline.defs.assets.training import TrainingConfig
    from bc_pipeline.training.worker.fit import make_loss, make_optimizer

    images, labels = _batch(n=6, size=32)
    alone_vs_batch = {}
    for kind in ("batch", norm):
        model = build_model(TrainingConfig(norm=kind, image_size=32, dropout=0.0, head="inception").spec(name), 8)
        kinds = {layer.__class__.__name__ for part in ("backbone", "head") for layer in model.get_layer(part).layers}
        assert ("BatchNormalization" in kinds) == (kind == "batch") and ("GroupNormalization" in kinds) == (kind != "batch")
        alone = np.asarray(model(images[:1], training=True))
        alone_vs_batch[kind] = np.abs(alone - np.asarray(model(images, training=True))[:1]).max()
    assert alone_vs_batch[norm] < 1e-5 < alone_vs_batch["batch"]
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"), run_eagerly=True)
    assert np.isfinite(float(model.train_on_batch(images, labels)))
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)


def test_norm_is_refused_for_pretrained_weights_and_unknown_kinds():
    with pytest.raises(ValueError, match="norm 'group' needs weights='none'.*BatchNorm statistics"):
        model_spec("efficientnet_lite0", norm="group")
    with pytest.raises(ValueError, match="unknown norm 'instance' \\(batch, group, layer\\)"):
        model_spec(CUSTOM_CNN, norm="instance")


def test_reference_input_norm_shows_every_cell_in_the_training_cells_colours(pbc_subset_arrays, tmp_path):
    """``input_norm: reference`` (Reinhard's colour transfer inside the model): real cells under another
    lamp's white balance come out with the training cells' typical opponent-channel statistics and
    far closer to the same cells' normalised originals than the shifted pixels were; the saved model
    carries its reference; without training images there is nothing to build it from."""
    import keras

    from bc_pipeline.evaluation.lab_shift import shift_images
    from bc_pipeline.models.zoo import OPPONENT_BASIS, reference_statistics

    images = pbc_subset_arrays[0]
    train, held_out = images[::2], images[1::2]
    spec = model_spec(CUSTOM_CNN, image_size=96, input_norm="reference")
    model = build_model(spec, 8, reference_images=train)
    mean, std = reference_statistics(train)
    steps = model.get_layer("preprocess").layers[:3]
    assert [layer.name for layer in steps] == ["to_opponent", "per_image_standardize", "to_reference"]

    def normalised(batch: np.ndarray) -> np.ndarray:
        x = batch.astype(np.float32)
        for layer in steps:
            x = layer(x)
        return np.asarray(x)

    tinted = shift_images(held_out, "white_balance", 5, seed=0).astype(np.float32)
    out = normalised(tinted).reshape(len(tinted), -1, 3) @ np.asarray(OPPONENT_BASIS, np.float32)
    np.testing.assert_allclose(out.mean(axis=1), np.broadcast_to(mean, (len(out), 3)), atol=0.5)
    np.testing.assert_allclose(out.std(axis=1), np.broadcast_to(std, (len(out), 3)), rtol=0.02, atol=0.2)
    before = np.abs(tinted - held_out).mean()
    after = np.abs(normalised(tinted) - normalised(held_out)).mean()
    assert after < before / 2, (before, after)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(reloaded.predict(held_out[:4], verbose=0), model.predict(held_out[:4], verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="input_norm 'reference' needs training images"):
        build_model(spec, 8)


def test_trainable_phases_freeze_and_unfreeze_backbone_layers():
    model = build_model(model_spec("custom_cnn"), num_classes=8)
    layers = backbone_layers(model)
    assert len(layers) == 20  # 5 blocks of conv, bn, relu, pool
    head_weights = len(model.get_layer("head").trainable_weights)
    set_trainable(model, "frozen")
    assert len(model.trainable_weights) == head_weights
    set_trainable(model, "last:4")  # the last block: conv, bn, relu, pool
    assert [layer.trainable for layer in layers] == [False] * 16 + [True] * 4
    assert len(model.trainable_weights) == head_weights + 3  # conv kernel, bn gamma and beta
    # Back to all layers after a partial phase: the layers frozen one by one train again,
    # except the stem kept frozen by frozen_layers.
    set_trainable(model, "all", frozen_layers=4)
    assert [layer.trainable for layer in layers] == [False] * 4 + [True] * 16
    assert len(model.trainable_weights) == head_weights + 4 * 3
    set_trainable(model, "all")
    assert len(model.trainable_weights) == head_weights + 5 * 3
    set_trainable(model, "last:50%")
    assert sum(layer.trainable for layer in layers) == 10
    with pytest.raises(ValueError, match="last:N"):
        parse_trainable("some")


def test_imagenet_weights_fail_fast_offline_with_a_way_out(monkeypatch):
    from bc_pipeline.models import zoo

    monkeypatch.setattr(zoo, "_internet_reachable", lambda *a, **k: False)
    monkeypatch.setattr(zoo, "_imagenet_cached", lambda spec: False)
    with pytest.raises(WeightsUnavailableError, match="weights file"):
        build_model(model_spec("mobilenetv3small", image_size=32, weights="imagenet"), num_classes=8)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        model_spec("mobilenetv3small", weights="/nowhere/weights.h5")
    with pytest.raises(ValueError, match="no pretrained weights"):
        model_spec("custom_cnn", weights="imagenet")


def test_a_local_weights_file_loads_into_the_backbone(tmp_path):
    """The `weights: <path>` route, tested with a file saved here (ImageNet cannot be downloaded)."""
    import keras

    source = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "mobilenetv3small_notop.weights.h5"
    source.save_weights(path)
    model = build_model(model_spec("mobilenetv3small", image_size=32, weights=str(path)), num_classes=8)
    for ours, theirs in zip(model.get_layer("backbone").get_weights(), source.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    wrong = tmp_path / "resnet_notop.weights.h5"
    keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(wrong)
    with pytest.raises(WeightsUnavailableError, match="could not load weights file"):
        build_model(model_spec("mobilenetv3small", image_size=32, weights=str(wrong)), num_classes=8)


@pytest.mark.parametrize(
    ("model", "cached_file"),
    [
        ("mobilenetv3small", "mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
        ("efficientnetv2b0", "efficientnetv2-b0_notop.h5"),
        ("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    ],
)
def test_imagenet_weights_in_the_keras_cache_are_used_offline(tmp_path, monkeypatch, model, cached_file):
    from bc_pipeline.models import zoo

    monkeypatch.setattr(zoo.Path, "home", lambda: tmp_path)
    spec = model_spec(model, weights="imagenet")
    assert not zoo._imagenet_cached(spec)
    (tmp_path / ".keras" / "models").mkdir(parents=True)
    (tmp_path / ".keras" / "models" / cached_file).write_bytes(b"")
    assert zoo._imagenet_cached(spec)
    monkeypatch.setattr(zoo, "_internet_reachable", lambda *a, **k: False)
    assert zoo._resolve_weights(spec) == "imagenet"
