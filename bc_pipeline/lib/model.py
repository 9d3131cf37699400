"""TensorFlow device set-up and model fingerprints (the models themselves: lib.zoo).

Keras and TensorFlow are imported inside the functions: importing this module is free.
"""

from __future__ import annotations

from typing import Any

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


def weights_fingerprint(model: Any) -> str:
    """Content hash of a model's weights: the trained model's data version."""
    from bc_pipeline.lib.storage import fingerprint

    return fingerprint(*[w.numpy() if hasattr(w, "numpy") else w for w in model.get_weights()])
