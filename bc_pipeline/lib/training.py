"""Train a classifier on in-memory uint8 images with class weights and early stopping."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.lib.model import build_cnn, configure_devices

Log = Callable[[str], None]


@dataclass
class TrainingSettings:
    """Everything that decides a training run (mirrored by the asset's pydantic Config)."""

    image_size: int = 32
    epochs: int = 13
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 4
    dropout: float = 0.4
    convs_per_block: int = 1
    augment: bool = True
    class_weights: bool = True
    seed: int = 0
    # Superimpose a recovered corruption template on training images (off by default).
    template_augmentation: bool = False
    template_probability: float = 0.5
    template_max_weight: float = 0.5


@dataclass
class TrainedModel:
    """A fitted Keras model, its per-epoch history and facts about the run."""

    model: Any
    history: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * n_c) for each present class, so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {c: float(weights[c]) for c in range(num_classes) if present[c]}


def _dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    augment: bool,
    seed: int,
    templates: np.ndarray | None = None,
    template_probability: float = 0.0,
    template_max_weight: float = 0.0,
) -> Any:
    """Batches of float32 images; with ``augment``, shuffled and randomly flipped / turned by 90 deg.

    A blood cell has no preferred orientation, so the eight flips and right-angle turns of an
    image are all valid training examples; they are exact (no interpolation) and cheap on CPU.
    With ``templates``, a random template is also blended over a share of the images.
    """
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if augment:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        data = data.map(_flip_and_turn, num_parallel_calls=tf.data.AUTOTUNE)
    if templates is not None and len(templates):
        blend = _template_blender(templates, template_probability, template_max_weight)
        data = data.map(blend, num_parallel_calls=tf.data.AUTOTUNE)
    data = data.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return data.prefetch(tf.data.AUTOTUNE)


def _template_blender(templates: np.ndarray, probability: float, max_weight: float) -> Any:
    """x -> (1 - w) x + w T_k for a random template k and w ~ U(0, max_weight), with ``probability``.

    This is the augmentation one course team tried with the noise they recovered: it shows the
    network cells seen through the same kind of overlay as the corrupted images, so it learns to
    look past it instead of being thrown by it.
    """
    import tensorflow as tf

    stack = tf.constant(np.asarray(templates, dtype=np.float32))

    def blend(image: Any, label: Any) -> tuple[Any, Any]:
        k = tf.random.uniform([], 0, tf.shape(stack)[0], dtype=tf.int32)
        on = tf.cast(tf.random.uniform([]) < probability, tf.float32)
        weight = on * tf.random.uniform([], 0.0, max_weight)
        return (1.0 - weight) * tf.cast(image, tf.float32) + weight * stack[k], label

    return blend


def _flip_and_turn(image: Any, label: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    image = tf.image.random_flip_left_right(image)
    turns = tf.random.uniform([], 0, 4, dtype=tf.int32)
    return tf.image.rot90(image, turns), label


def _epoch_logger(log: Log, epochs: int) -> Any:
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """Sends one line per epoch to the caller's log (the Dagster log in the pipeline)."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            seconds = time.perf_counter() - self._start
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            log(
                f"epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.4f} "
                f"acc {logs.get('accuracy', float('nan')):.4f} | val_loss {logs.get('val_loss', float('nan')):.4f} "
                f"val_acc {logs.get('val_accuracy', float('nan')):.4f} | lr {lr:.2e} | {seconds:.1f}s"
            )

    return EpochLogger()


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_classes: int,
    settings: TrainingSettings,
    templates: np.ndarray | None = None,
    log: Log = print,
) -> TrainedModel:
    """Fit the CNN with Adam, class weights, LR reduction on plateau and early stopping on val loss."""
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("training needs a non-empty train and validation split")
    device = configure_devices()
    import keras

    keras.utils.set_random_seed(settings.seed)
    log(f"training on {device}: {len(train_images)} train / {len(val_images)} val images at {settings.image_size}px")
    model = build_cnn(
        num_classes,
        image_size=settings.image_size,
        convs_per_block=settings.convs_per_block,
        dropout=settings.dropout,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # Resize once, with the model's own layer, instead of in every step of every epoch.
    train_small = resize_like_model(model, train_images)
    val_small = resize_like_model(model, val_images)
    templates_small = _templates_for(model, templates, settings, log)
    class_weight = balanced_class_weights(train_labels, num_classes) if settings.class_weights else None
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, settings.patience // 2)),
        _epoch_logger(log, settings.epochs),
    ]
    train_data = _dataset(
        train_small, train_labels, settings.batch_size, augment=settings.augment, seed=settings.seed,
        templates=templates_small, template_probability=settings.template_probability,
        template_max_weight=settings.template_max_weight,
    )  # fmt: skip
    start = time.perf_counter()
    fit = model.fit(
        train_data,
        validation_data=_dataset(val_small, val_labels, settings.batch_size, augment=False, seed=0),
        epochs=settings.epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=0,
    )
    history = pd.DataFrame(fit.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    info = {
        "device": device,
        "train_seconds": round(time.perf_counter() - start, 1),
        "epochs_run": int(len(history)),
        "best_epoch": int(history["val_loss"].idxmin() + 1),
        "parameters": int(model.count_params()),
        "class_weight": class_weight,
        "augmentation_templates": 0 if templates_small is None else int(len(templates_small)),
    }
    return TrainedModel(model=model, history=history.astype({"epoch": "int64"}), info=info)


def _templates_for(model: Any, templates: np.ndarray | None, settings: TrainingSettings, log: Log) -> np.ndarray | None:
    if not settings.template_augmentation:
        return None
    if templates is None or len(templates) == 0:
        log("template augmentation is on, but no corruption templates were recovered: skipping it")
        return None
    log(f"template augmentation: {len(templates)} templates, p={settings.template_probability}, "
        f"weight up to {settings.template_max_weight}")  # fmt: skip
    return resize_like_model(model, templates)


def resize_like_model(model: Any, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Images resized by the model's ``resize`` layer, as float32.

    At the model's own size the layer is the identity, so training on these gives exactly what
    the model computes when it is handed the original images at inference.
    """
    resize = model.get_layer("resize")
    chunks = [
        np.asarray(resize(images[start : start + batch_size].astype(np.float32)))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, *resize.output_shape[1:]), np.float32)


def predict_proba(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, k) for uint8 images, converted to float one batch at a time."""
    chunks = [
        np.asarray(model.predict_on_batch(images[start : start + batch_size].astype(np.float32)))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_shape[-1]), np.float32)
