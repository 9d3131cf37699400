"""AugMix's consistency loss: cross-entropy on the clean image plus the Jensen-Shannon divergence
between the predictions on the clean image and on two augmented views of it.

Hendrycks et al., "AugMix" (ICLR 2020): making the model say the same thing about an image and its
augmentations, not only fitting each of them to the label, is what carried AugMix's gains on the
ImageNet-C corruptions it never saw. Batches hold three blocks, ``[clean; view 1; view 2]`` of the
same images (``training.worker.data.view_batches``); validation batches repeat the clean block three times,
which makes the divergence zero and the loss plain cross-entropy.

Backend-neutral (``keras.ops``), and registered with Keras so a checkpoint compiled with it loads.
"""

from __future__ import annotations

import keras
from keras import ops

VIEWS = 3  # the clean image and two augmented views
DEFAULT_WEIGHT = 12.0  # the AugMix paper's lambda


@keras.saving.register_keras_serializable(package="bc_pipeline")
class AugMixConsistency(keras.losses.Loss):
    """``CE(y, p_clean) + weight * JS(p_clean, p_view1, p_view2)`` per image, on batches of 3 blocks.

    Returned per row of the 3N batch: the image's loss (times 3) on its clean row, 0 on its view rows,
    so Keras' mean over the batch is the mean over images and class weights apply once per image.
    """

    def __init__(self, weight: float = DEFAULT_WEIGHT, label_smoothing: float = 0.0, name: str = "augmix_consistency", **kwargs):
        super().__init__(name=name, **kwargs)
        self.weight, self.label_smoothing = float(weight), float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        probabilities = ops.reshape(ops.cast(y_pred, "float32"), (VIEWS, -1, classes))
        labels = ops.reshape(ops.cast(y_true, "float32"), (VIEWS, -1, classes))[0]
        clean = probabilities[0]
        cross_entropy = keras.losses.categorical_crossentropy(labels, clean, label_smoothing=self.label_smoothing)
        epsilon = keras.config.epsilon()
        mixture = ops.log(ops.clip(ops.mean(probabilities, axis=0), epsilon, 1.0))
        kl = ops.sum(probabilities * (ops.log(ops.clip(probabilities, epsilon, 1.0)) - mixture[None]), axis=-1)
        per_image = cross_entropy + self.weight * ops.mean(kl, axis=0)
        return ops.concatenate([per_image * VIEWS, ops.zeros_like(per_image), ops.zeros_like(per_image)], axis=0)

    def get_config(self) -> dict:
        return {**super().get_config(), "weight": self.weight, "label_smoothing": self.label_smoothing}
