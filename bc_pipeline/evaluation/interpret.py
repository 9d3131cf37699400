"""Looking into a trained classifier: test-time augmentation and Grad-CAM heatmaps.

- Test-time augmentation (TTA) averages the model's probabilities over a few label-preserving
  views of each image (flips and small rotations, the views the course reports used): a blood
  cell has no preferred orientation, so disagreement between views is noise worth averaging out.
- Grad-CAM (Selvaraju et al., 2017) shows where in the image the evidence for a class lies: the
  backbone's last feature map, its channels weighted by how much the class score rises with them.
  It relies on the zoo's fixed layout (``resize`` -> ``preprocess`` -> ``backbone`` -> ``head``,
  see :mod:`bc_pipeline.models.zoo`), so it works for every registered model alike.

Keras and TensorFlow are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.models.inference import predict_proba

# The eight symmetries of the square, exact on the pixel grid: no interpolation, no border fill.
EXACT_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda x: x.copy(),
    "flip_lr": lambda x: x[:, :, ::-1],
    "flip_ud": lambda x: x[:, ::-1],
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: x[:, ::-1, ::-1],
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "transpose": lambda x: x.transpose(0, 2, 1, 3),
    "antitranspose": lambda x: np.rot90(x, 2, axes=(1, 2)).transpose(0, 2, 1, 3),
}
TTA_VIEWS: tuple[str, ...] = ("identity", "flip_lr", "flip_ud", "rotate+10", "rotate-10")

# Images per TTA chunk: the views of one chunk are built, predicted and dropped before the next,
# so 20k images never exist five times over in memory.
TTA_CHUNK = 2048
GRADCAM_BATCH = 32


def tta_view(images_uint8: np.ndarray, view: str) -> np.ndarray:
    """One TTA view of a batch of (N, H, W, C) uint8 images, same shape and dtype.

    The eight symmetries of the square (:data:`EXACT_VIEWS`: flips, quarter turns, transposes)
    are exact (numpy). ``rotate+D`` / ``rotate-D`` turn each image by D degrees
    (counter-clockwise for +) about its centre, bilinearly, with reflected borders: a blood-smear
    background continues naturally past the edge, where constant padding would paint black corners
    the model never saw in training.
    """
    images = np.asarray(images_uint8)
    if view in EXACT_VIEWS:
        return np.ascontiguousarray(EXACT_VIEWS[view](images))
    angle = _rotation_angle(view)
    if angle is None:
        raise ValueError(f"unknown TTA view {view!r}; valid views: {', '.join(EXACT_VIEWS)} (or rotate+D / rotate-D)")
    return _rotate(images, angle)


def _rotation_angle(view: str) -> float | None:
    """The angle of a ``rotate+D`` / ``rotate-D`` view, None for anything else."""
    prefix = "rotate"
    if not view.startswith(prefix) or view[len(prefix) : len(prefix) + 1] not in ("+", "-"):
        return None
    try:
        return float(view[len(prefix) :])
    except ValueError:
        return None


def _rotate(images: np.ndarray, angle: float, block: int = 256) -> np.ndarray:
    """Every image turned by ``angle`` degrees: bilinear, reflected borders, vectorised over the batch.

    Equal (to rounding) to ``scipy.ndimage.rotate(image, angle, reshape=False, order=1,
    mode="reflect")`` per image, but the sampling grid is computed once and applied to a block of
    images with four gathers, about twice as fast as SciPy's plane-by-plane loop.
    """
    if len(images) == 0:
        return images.copy()
    corners, weights = _rotation_grid(images.shape[1], images.shape[2], angle)
    out = np.empty_like(images)
    for start in range(0, len(images), block):
        part = images[start : start + block]
        turned = sum(weight * part[:, rows, columns] for (rows, columns), weight in zip(corners, weights))
        out[start : start + block] = np.clip(np.rint(turned), 0, 255).astype(images.dtype)
    return out


def _rotation_grid(
    height: int, width: int, angle: float
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """For each output pixel, its four source neighbours (reflected into the image) and their weights."""
    theta = np.deg2rad(angle)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    # Inverse mapping: where in the input each output pixel comes from (counter-clockwise for angle > 0).
    source_y = cy + (y - cy) * np.cos(theta) + (x - cx) * np.sin(theta)
    source_x = cx - (y - cy) * np.sin(theta) + (x - cx) * np.cos(theta)
    y0, x0 = np.floor(source_y), np.floor(source_x)
    fy, fx = (source_y - y0)[..., None].astype(np.float32), (source_x - x0)[..., None].astype(np.float32)
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    rows = (_reflect(y0, height), _reflect(y0 + 1, height))
    columns = (_reflect(x0, width), _reflect(x0 + 1, width))
    corners = [(rows[i], columns[j]) for i in (0, 1) for j in (0, 1)]
    weights = [(fy if i else 1 - fy) * (fx if j else 1 - fx) for i in (0, 1) for j in (0, 1)]
    return corners, weights


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Indices mirrored about the edges of the border pixels (d c b a | a b c d), SciPy's ``reflect``."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


def predict_tta(
    model: Any, images: np.ndarray, views: Sequence[str] = TTA_VIEWS, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities (N, k) averaged over ``views`` of each image.

    The views are computed chunk by chunk (:data:`TTA_CHUNK` images), so memory stays that of one
    chunk's view whatever the number of images.
    """
    views = tuple(views)
    if not views:
        raise ValueError(f"predict_tta needs at least one view; valid views: {', '.join(TTA_VIEWS)}")
    for view in views:
        tta_view(images[:0], view)  # fail on a misspelt view before any prediction runs
    chunks = [
        _tta_chunk(model, images[start : start + TTA_CHUNK], views, batch_size)
        for start in range(0, len(images), TTA_CHUNK)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_shape[-1]), np.float32)


def _tta_chunk(model: Any, images: np.ndarray, views: tuple[str, ...], batch_size: int) -> np.ndarray:
    total = sum(
        predict_proba(model, tta_view(images, view), batch_size=batch_size).astype(np.float64) for view in views
    )
    return (total / len(views)).astype(np.float32)


def grad_cam(
    model: Any, images_uint8: np.ndarray, class_indices: Sequence[int] | np.ndarray, batch_size: int = GRADCAM_BATCH
) -> np.ndarray:
    """Grad-CAM heatmaps, float32 (N, H, W) in [0, 1] at the input images' own size.

    For image i the score is the pre-softmax logit of class ``class_indices[i]``, as in the
    original method: the softmax probability's gradient vanishes once a trained model is
    confident, which would leave exactly the examples worth showing with an empty map. Channels of
    the backbone's feature map are weighted by their spatially averaged gradient, summed, passed
    through a ReLU (only evidence *for* the class), scaled so each map peaks at 1 (a map with no
    positive evidence stays all zero) and upsampled bilinearly to the image.
    """
    images = np.asarray(images_uint8)
    classes = np.asarray(class_indices, dtype=np.int64).reshape(-1)
    if len(classes) != len(images):
        raise ValueError(f"grad_cam: {len(images)} images but {len(classes)} class indices")
    if len(images) == 0:
        return np.zeros((0, *images.shape[1:3]), np.float32)
    from bc_pipeline.training.ensemble import ensemble_members

    members = ensemble_members(model)
    if members:  # an ensemble: each member's evidence for the class, averaged
        return _unit_peak(np.mean([grad_cam(m, images, classes, batch_size) for m in members], axis=0))
    parts = _gradcam_parts(model)
    maps = [
        _gradcam_batch(parts, images[start : start + batch_size], classes[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(maps)


# Grad-CAM needs a feature map with some extent: at 32 px every zoo backbone ends in 1x1, which
# would make every heatmap flat. The map used is the deepest backbone layer at least this wide.
GRADCAM_MIN_SIDE = 4


def gradcam_layer(backbone: Any, min_side: int = GRADCAM_MIN_SIDE) -> Any:
    """The deepest layer of ``backbone`` whose output is a feature map at least ``min_side`` wide.

    That is the backbone's own output whenever it is wide enough (the original method); at small
    input sizes it is the last layer before the map shrinks below ``min_side``.
    """
    for layer in reversed(backbone.layers):
        shape = getattr(layer, "output", None)
        shape = getattr(shape, "shape", None)
        if shape is not None and len(shape) == 4 and (shape[1] or 0) >= min_side and (shape[2] or 0) >= min_side:
            return layer
    return backbone.layers[-1]


def _gradcam_parts(model: Any) -> dict[str, Any]:
    """The zoo model's stages, the backbone split at its Grad-CAM layer, and the head before softmax."""
    import keras

    head = model.get_layer("head")
    last = head.get_layer("probabilities")  # the zoo's softmax Dense: logits = input @ kernel + bias
    to_penultimate = keras.Model(head.inputs, last.input, name="head_without_softmax")
    backbone = model.get_layer("backbone")
    layer = gradcam_layer(backbone)
    return {
        "resize": model.get_layer("resize"),
        "preprocess": model.get_layer("preprocess"),
        "backbone": keras.Model(backbone.inputs, [layer.output, backbone.output], name="backbone_with_cam_layer"),
        "layer_name": layer.name,
        "to_penultimate": to_penultimate,
        "kernel": last.kernel,
        "bias": last.bias,
    }


def _gradcam_batch(parts: dict[str, Any], images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    x = parts["preprocess"](parts["resize"](tf.convert_to_tensor(images, tf.float32)), training=False)
    with tf.GradientTape() as tape:
        features, output = parts["backbone"](x, training=False)
        tape.watch(features)
        hidden = tf.cast(parts["to_penultimate"](output, training=False), tf.float32)
        logits = tf.matmul(hidden, tf.cast(parts["kernel"], tf.float32)) + tf.cast(parts["bias"], tf.float32)
        scores = tf.gather(logits, tf.constant(classes), axis=1, batch_dims=1)
    gradients = tf.cast(tape.gradient(scores, features), tf.float32)  # scores are independent per image
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1, keepdims=True))
    cam = tf.image.resize(cam, images.shape[1:3], method="bilinear")[..., 0].numpy()
    return _unit_peak(cam)


def _unit_peak(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (all-zero maps stay zero), clipped into [0, 1]."""
    peaks = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
    scaled = np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def gradcam_examples(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, per_class: int = 1, seed: int = 0
) -> pd.DataFrame:
    """Which images to explain: per true class up to ``per_class`` right and wrong predictions.

    Columns ``class`` (the true class), ``kind`` (``correct`` / ``wrong``) and ``index`` (into
    ``y_true``). Drawn with a fixed seed, so a report shows the same cells run after run.
    """
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if len(y_true) != len(y_pred):
        raise ValueError(f"gradcam_examples: {len(y_true)} labels but {len(y_pred)} predictions")
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(num_classes):
        members = y_true == label
        for kind, chosen in (("correct", members & (y_pred == label)), ("wrong", members & (y_pred != label))):
            candidates = np.flatnonzero(chosen)
            size = min(per_class, len(candidates))
            picked = rng.choice(candidates, size=size, replace=False) if size else []
            rows.extend({"class": label, "kind": kind, "index": int(index)} for index in sorted(picked))
    return pd.DataFrame(rows, columns=["class", "kind", "index"]).astype({"class": int, "index": int})


def example_titles(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Short captions for a Grad-CAM grid: ``neutrophil ok`` or ``monocyte -> neutrophil``."""
    return [
        f"{class_names[t]} ok" if t == p else f"{class_names[t]} -> {class_names[p]}"
        for t, p in zip(np.asarray(y_true).tolist(), np.asarray(y_pred).tolist())
    ]
