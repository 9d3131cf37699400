"""Train a classifier on in-memory uint8 images with class weights and early stopping."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.lib.augmentation import batch_mixer
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
    seed: int = 0
    # Batch-level augmentation in the input pipeline: none | mixup | cutmix | mixup+cutmix.
    batch_augment: str = "none"
    batch_augment_probability: float = 0.5
    # Train on the balanced set itself as well as on its stored augmented copies.
    include_original: bool = True
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


def _dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    num_classes: int,
    augment: bool,
    seed: int,
    repeat: bool = False,
    templates: np.ndarray | None = None,
    template_probability: float = 0.0,
    template_max_weight: float = 0.0,
    batch_augment: str = "none",
    batch_augment_probability: float = 0.5,
) -> Any:
    """Batches of (float32 images, one-hot labels), prefetched so the model never waits for them.

    With ``augment`` the images are shuffled and randomly flipped / turned by 90 degrees: a blood
    cell has no preferred orientation, so all eight symmetries are valid examples, and they are
    exact and cheap. With ``templates`` a random corruption template is blended over a share of the
    images; with ``batch_augment`` (mixup, cutmix) a share of the batches mix images and labels.
    Labels are one-hot throughout so that mixed (soft) labels and plain ones share the same loss.
    """
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if augment:
        data = data.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        data = data.map(_flip_and_turn, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        data = data.repeat()
    if templates is not None and len(templates):
        blend = _template_blender(templates, template_probability, template_max_weight)
        data = data.map(blend, num_parallel_calls=tf.data.AUTOTUNE)
    data = data.batch(batch_size, drop_remainder=batch_augment != "none").map(
        lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE
    )
    if batch_augment != "none":
        data = data.map(_sometimes(batch_mixer(batch_augment, seed=seed), batch_augment_probability))
    return data.prefetch(tf.data.AUTOTUNE)


def _sometimes(mix: Callable[[Any, Any], tuple[Any, Any]], probability: float) -> Callable[[Any, Any], tuple[Any, Any]]:
    """Apply ``mix`` to a batch with ``probability``; otherwise pass it through."""
    import tensorflow as tf

    def maybe(images: Any, labels: Any) -> tuple[Any, Any]:
        return tf.cond(tf.random.uniform([]) < probability, lambda: mix(images, labels), lambda: (images, labels))

    return maybe


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
    class_weight: dict[int, float] | None = None,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    templates: np.ndarray | None = None,
    log: Log = print,
) -> TrainedModel:
    """Fit the CNN with Adam, LR reduction on plateau and early stopping on validation loss.

    ``train_images`` is the (balanced) training set and ``augmented`` its stored augmented copies,
    as (images, labels) shards. Training draws from all of them (the originals only if
    ``settings.include_original``), and an epoch is one training set's worth of steps, so adding
    copies adds variety, not time per epoch.
    """
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("training needs a non-empty train and validation split")
    if not settings.include_original and not augmented:
        raise ValueError("include_original is off and there are no augmented copies: nothing to train on")
    device = configure_devices()
    import keras

    keras.utils.set_random_seed(settings.seed)
    model = build_cnn(
        num_classes,
        image_size=settings.image_size,
        convs_per_block=settings.convs_per_block,
        dropout=settings.dropout,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    pool_x, pool_y = _training_pool(model, train_images, train_labels, augmented, settings.include_original)
    log(f"training on {device}: {len(pool_x)} images to draw from ({len(augmented)} augmented shards), "
        f"{len(train_images)} per epoch, {len(val_images)} val, at {settings.image_size}px")  # fmt: skip
    val_small = resize_like_model(model, val_images)
    templates_small = _templates_for(model, templates, settings, log)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.patience, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, settings.patience // 2)),
        _epoch_logger(log, settings.epochs),
    ]
    train_data = _dataset(
        pool_x, pool_y, settings.batch_size, num_classes=num_classes, augment=settings.augment, seed=settings.seed,
        repeat=True, templates=templates_small, template_probability=settings.template_probability,
        template_max_weight=settings.template_max_weight, batch_augment=settings.batch_augment,
        batch_augment_probability=settings.batch_augment_probability,
    )  # fmt: skip
    start = time.perf_counter()
    fit = model.fit(
        train_data,
        steps_per_epoch=max(1, -(-len(train_images) // settings.batch_size)),
        validation_data=_dataset(val_small, val_labels, settings.batch_size, num_classes=num_classes, augment=False, seed=0),
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
        "pool_images": int(len(pool_x)),
        "augmented_shards": len(augmented),
        "augmentation_templates": 0 if templates_small is None else int(len(templates_small)),
    }
    return TrainedModel(model=model, history=history.astype({"epoch": "int64"}), info=info)


def _training_pool(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]],
    include_original: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Everything training draws from, resized once to the model's input size.

    Resizing each shard as it is read keeps only the small images in memory (a 32px float copy is
    a ninth of the 96px uint8 one). At the model's own size nothing is resized and the uint8
    shards are kept as they are.
    """
    parts = ([(images, labels)] if include_original else []) + list(augmented)
    xs = [resize_like_model(model, x) for x, _ in parts]
    return np.concatenate(xs), np.concatenate([np.asarray(y, np.int64) for _, y in parts])


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


def predict_proba(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, k) for uint8 images, converted to float one batch at a time."""
    chunks = [
        np.asarray(model.predict_on_batch(images[start : start + batch_size].astype(np.float32)))
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.output_shape[-1]), np.float32)
