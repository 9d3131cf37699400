"""Augmentations for another laboratory's cells: its stain and its framing (the ``stain`` and ``scale`` presets).

Measured on other labs' cells (docs/domain_shift.md), models trained on PBC alone fail first on
scale (LISC shows a white cell at a third of the frame: called a platelet) and on colour (a quick
stain on a yellow background: neutrophils called eosinophils). The RGB gains of ``illumination``
do not model a stain: a dye changes the optical density of the pixels it stains, not a channel of
the whole image.

- ``stain``: stain jitter in a colour-deconvolution space (Tellez et al., 2018; Ruifrok and
  Johnston's haematoxylin/eosin/DAB basis): each pixel's optical density is split into dye
  amounts, and each image's amounts are scaled by 0.7-1.3 and shifted by +-0.05 per dye, so nuclei,
  granules and background change depth and hue the way two stainings do.
- ``scale``: each image zoomed by a factor drawn log-uniformly from 0.5 to 1.5 (a cell half as
  wide, with the reflected surroundings filling the frame, up to one filling it) and moved by up to
  10 % of the frame: the cell's size in the frame stops being a feature.

Both are graph functions of float32 batches in [0, 255], like every preset of ``presets``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Optical-density colour vectors of haematoxylin, eosin and DAB (scikit-image's rgb_from_hed), rows normalised.
DYES = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
DYES = DYES / np.linalg.norm(DYES, axis=1, keepdims=True)


def stain_jitter(seed: int, *, scale: float = 0.3, shift: float = 0.05, turn: float = 0.0) -> Any:
    """Per image and dye: amounts times U(1 - scale, 1 + scale) plus U(-shift, shift); with ``turn``
    (degrees) the haematoxylin and eosin colour vectors are also turned by U(0, turn) towards a random
    direction, so nuclei and granules change hue as with another dye formulation, not only depth."""
    import tensorflow as tf

    generator = tf.random.Generator.from_seed(seed)
    to_amounts = tf.constant(np.linalg.inv(DYES), tf.float32)
    dyes = tf.constant(DYES, tf.float32)

    def apply(batch: Any, training: bool = True) -> Any:
        n = tf.shape(batch)[0]
        density = -tf.math.log((batch + 1.0) / 256.0)
        amounts = tf.einsum("nhwc,cd->nhwd", density, to_amounts)
        gain = generator.uniform(tf.stack([n, 1, 1, 3]), 1.0 - scale, 1.0 + scale)
        offset = generator.uniform(tf.stack([n, 1, 1, 3]), -shift, shift)
        to_density = _turned_dyes(generator, dyes, n, turn) if turn > 0 else tf.broadcast_to(dyes, tf.stack([n, 3, 3]))
        density = tf.einsum("nhwd,ndc->nhwc", amounts * gain + offset, to_density)
        return 256.0 * tf.exp(-density) - 1.0

    return apply


def _turned_dyes(generator: Any, dyes: Any, n: Any, turn: float) -> Any:
    """(n, 3, 3): per image, the first two dye vectors turned by U(0, turn) degrees (kept non-negative, unit length)."""
    import tensorflow as tf

    direction = generator.normal(tf.stack([n, 2, 3]))
    direction -= tf.reduce_sum(direction * dyes[:2], axis=-1, keepdims=True) * dyes[:2]
    direction = tf.math.l2_normalize(direction, axis=-1)
    angle = generator.uniform(tf.stack([n, 2, 1]), 0.0, np.deg2rad(turn))
    turned = tf.maximum(tf.cos(angle) * dyes[:2] + tf.sin(angle) * direction, 0.01)
    turned = tf.math.l2_normalize(turned, axis=-1)
    return tf.concat([turned, tf.broadcast_to(dyes[2:], tf.stack([n, 1, 3]))], axis=1)


def random_scale(seed: int, *, low: float = 0.5, high: float = 1.5, move: float = 0.1) -> Any:
    """Per image: zoom by exp(U(ln low, ln high)) about a centre moved by up to ``move`` of the frame.

    The batch is padded by half its size on each side by reflection, then each image's window is
    cut from the padded frame and resized back, so a zoom out shows surroundings, not black.
    """
    import tensorflow as tf

    if not 0.5 <= low <= high:
        raise ValueError(f"scale range must satisfy 0.5 <= low <= high, got {low}-{high}")
    generator = tf.random.Generator.from_seed(seed)

    def apply(batch: Any, training: bool = True) -> Any:
        shape = tf.shape(batch)
        n, size = shape[0], shape[1:3]
        pad = (size + 1) // 2  # at least half: the frame is at most half the padded one
        padded = tf.pad(batch, [[0, 0], [pad[0], pad[0]], [pad[1], pad[1]], [0, 0]], mode="REFLECT")
        ratio = tf.cast(size, tf.float32) / tf.cast(size + 2 * pad, tf.float32)  # the frame's share of the padded one
        zoom = tf.exp(generator.uniform(tf.stack([n, 1]), np.log(low), np.log(high)))
        half = ratio / zoom / 2  # half the window, in padded coordinates
        centre = 0.5 + generator.uniform(tf.stack([n, 2]), -move, move) * ratio
        centre = tf.clip_by_value(centre, half, 1.0 - half)
        boxes = tf.concat([centre - half, centre + half], axis=1)  # y1, x1, y2, x2
        return tf.image.crop_and_resize(padded, boxes, tf.range(n), size, method="bilinear")

    return apply
