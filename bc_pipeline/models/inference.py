"""Predicting with, resizing for and fingerprinting any Keras classifier of the zoo.

Shared by the training worker (validation, calibration, the weights' fingerprint that becomes the
trained model's data version) and by evaluation, the ensemble and ``bc-predict``. Keras is
imported inside the functions (``weights_fingerprint``); the others only call the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bc_pipeline.core.storage import fingerprint


def resize_like_model(model: Any, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Images resized by the model's ``resize`` layer, as float32 (unchanged if already that size).

    Training on these gives exactly what the model computes when it is handed the original images
    at inference. Images already at the model's size are returned as they are (uint8 stays uint8,
    a quarter of the memory); the input pipeline casts each batch.
    """
    resize = model.get_layer("resize")
    size = (resize.height, resize.width)
    if tuple(images.shape[1:3]) == size:
        return np.asarray(images)
    chunks = [
        np.asarray(resize(images[start : start + batch_size].astype(np.float32)))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, *size, images.shape[-1]), np.float32)


def weights_fingerprint(model: Any) -> str:
    """Content hash of a model's weights: the trained model's data version (the same on any backend)."""
    import keras

    return fingerprint(*[np.asarray(keras.ops.convert_to_numpy(w)) for w in model.get_weights()])


def predict_proba(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, k) for uint8 images, converted to float one batch at a time."""
    chunks = [
        np.asarray(model.predict_on_batch(images[start : start + batch_size].astype(np.float32)))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_shape[-1]), np.float32)
