"""The from-scratch CNN of the seed report, and TensorFlow device set-up.

Keras and TensorFlow are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_FILTERS: tuple[int, ...] = (32, 64, 128, 256, 512)


def configure_devices() -> str:
    """Use the GPU when there is one (with memory growth, so TF does not grab all of it).

    Must run before TensorFlow creates any tensor. Returns a description for the logs.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier call in this process
            pass
    if gpus:
        return f"GPU x{len(gpus)}: {', '.join(g.name for g in gpus)}"
    return f"CPU ({tf.config.threading.get_intra_op_parallelism_threads() or 'all'} threads)"


def build_cnn(
    num_classes: int,
    *,
    image_size: int,
    filters: Sequence[int] = DEFAULT_FILTERS,
    convs_per_block: int = 1,
    dense_units: int = 512,
    dropout: float = 0.4,
) -> Any:
    """Conv blocks (conv-BN-ReLU x ``convs_per_block``, then max pooling), GAP, dropout, dense, softmax.

    The model takes uint8-range RGB images of any size and resizes them to ``image_size`` itself,
    so the saved ``.keras`` file is all a user needs to classify raw 96x96 images. It holds only
    built-in layers (augmentation lives in the input pipeline), so it loads anywhere Keras does.
    Batch-norm momentum is 0.9 rather than Keras' 0.99: with datasets of a few thousand images the
    moving statistics must settle within a few epochs, or inference-mode predictions (validation,
    early stopping, the test report) lag far behind what the network has learnt.
    """
    import keras
    from keras import layers

    if image_size < 2 ** len(filters):
        raise ValueError(f"image_size {image_size} is too small for {len(filters)} pooling steps")
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = layers.Resizing(image_size, image_size, antialias=True, name="resize")(inputs)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for block, width in enumerate(filters):
        for conv in range(convs_per_block):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
            x = layers.Activation("relu", name=f"block{block}_relu{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout_gap")(x)
    x = layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = layers.Dropout(dropout, name="dropout_dense")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="bc_cnn")


def weights_fingerprint(model: Any) -> str:
    """Content hash of a model's weights: the trained model's data version."""
    from bc_pipeline.lib.storage import fingerprint

    return fingerprint(*[w.numpy() if hasattr(w, "numpy") else w for w in model.get_weights()])
