"""Train a zoo model on uint8 images: phases, optimizers, losses, schedules, checkpoints.

Backend-neutral: Keras on TensorFlow, JAX or PyTorch, fed by the numpy pipeline of
:mod:`bc_pipeline.worker.data`. Keras is imported inside the functions, after
:func:`bc_pipeline.worker.backend.select_backend` has chosen the backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.lib.storage import fingerprint
from bc_pipeline.lib.zoo import ModelSpec, build_model, set_trainable
from bc_pipeline.worker.backend import Device, configure_device, precision_policy, use_jit
from bc_pipeline.worker.checkpoint import Checkpoint, new_state
from bc_pipeline.worker.data import ImagePool, evaluation_batches, feed, select_rows, training_batches, view_batches

Log = Callable[[str], None]


@dataclass(frozen=True)
class Phase:
    """One stage of a training schedule.

    ``trainable``: ``frozen`` (only the head trains), ``last:N`` or ``last:N%`` (the head and the
    backbone's last N layers, or that share of them) or ``all``. Each phase starts a fresh
    optimizer at ``learning_rate`` and restores its best weights (lowest validation loss) when it
    ends, after ``epochs`` or after ``patience`` epochs without improvement.
    """

    trainable: str = "all"
    learning_rate: float = 1e-3
    epochs: int = 13
    patience: int = 4
    # False: run exactly ``epochs`` and keep the last weights (a count chosen beforehand, for a
    # retraining whose validation images are training images too).
    restore_best: bool = True


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that decides a training run (mirrored by the asset's pydantic Config).

    Without ``phases`` the schedule is :func:`default_phases`: one phase of ``epochs`` at
    ``learning_rate`` from scratch, or frozen / last 30% / all with the rate divided by ten at each
    step for a pretrained backbone (the reports' fine-tuning recipe).
    """

    epochs: int = 13
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 4
    phases: tuple[Phase, ...] = ()
    # plateau (halve on a validation plateau) | constant | exponential (per epoch, within each
    # phase) | cyclical (triangular, per batch, between min_factor x rate and the phase's rate) |
    # cosine (per batch, from the phase's rate to zero at the phase's last epoch).
    lr_schedule: str = "plateau"
    lr_decay: float = 0.85
    cycle_epochs: int = 4
    cycle_min_factor: float = 0.1
    optimizer: str = "adam"  # adam | adamw | lion
    weight_decay: float = 1e-4  # adamw and lion only
    loss: str = "categorical_crossentropy"  # or focal
    focal_gamma: float = 2.0
    focal_alpha: float = 1.0
    label_smoothing: float = 0.0
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
    # mixed_precision auto: bfloat16 (float16 before Ampere) on a GPU, float32 on a CPU (worker.backend);
    # jit_compile auto: XLA on JAX, off on TensorFlow (no XLA kernel for the antialiased resize) and PyTorch.
    mixed_precision: str = "auto"  # auto | on | off
    jit_compile: str = "auto"  # auto | on | off
    # Epoch selection (worker.selection): k-fold cross-validation on the training set chooses each
    # phase's epoch count (0: off, early stopping on the validation split instead); then the final
    # model trains on train + validation for that count (retrain_on_validation).
    cv_folds: int = 0
    retrain_on_validation: bool = False
    # AugMix's Jensen-Shannon consistency (worker.consistency): none | jsd; needs >= 2 stored copies.
    consistency_loss: str = "none"
    consistency_weight: float = 12.0


@dataclass
class TrainedModel:
    """A fitted Keras model, its per-epoch history and facts about the run."""

    model: Any
    history: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)


def default_phases(spec: ModelSpec, settings: TrainingSettings) -> tuple[Phase, ...]:
    """The schedule used when ``settings.phases`` is empty (see :class:`TrainingSettings`)."""
    if settings.phases:
        return settings.phases
    lr, patience = settings.learning_rate, settings.patience
    if not spec.pretrained:
        return (Phase("all", lr, settings.epochs, patience),)
    third = max(1, settings.epochs // 3)
    return (
        Phase("frozen", lr, third, patience),
        Phase("last:30%", lr / 10, third, patience),
        Phase("all", lr / 100, max(1, settings.epochs - 2 * third), patience),
    )


def make_optimizer(name: str, learning_rate: float, weight_decay: float = 0.0) -> Any:
    """Adam, AdamW (decoupled weight decay) or Lion (sign updates: use a 3-10x smaller rate)."""
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    if name == "lion":
        return keras.optimizers.Lion(learning_rate, weight_decay=weight_decay or None)
    raise ValueError(f"unknown optimizer {name!r} (adam, adamw or lion)")


def make_loss(
    name: str, *, label_smoothing: float = 0.0, gamma: float = 2.0, alpha: float = 1.0,
    consistency: str = "none", consistency_weight: float = 12.0,
) -> Any:  # fmt: skip
    """Categorical cross-entropy or focal loss, both on one-hot (or mixed) labels.

    With ``consistency="jsd"`` the loss is AugMix's cross-entropy plus Jensen-Shannon consistency
    (:class:`bc_pipeline.worker.consistency.AugMixConsistency`), for batches of three views.

    Focal loss scales each example's cross-entropy by ``alpha * (1 - p_true) ** gamma``: examples
    the model already gets right weigh less, hard ones (rare classes, perturbed images) more. At
    gamma 0 and alpha 1 it is cross-entropy. Keras' built-in losses keep saved models loadable.
    """
    import keras

    if consistency == "jsd":
        from bc_pipeline.worker.consistency import AugMixConsistency

        return AugMixConsistency(weight=consistency_weight, label_smoothing=label_smoothing)
    if name == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if name == "focal":
        return keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {name!r} (categorical_crossentropy or focal)")


def train_classifier(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    *,
    num_classes: int,
    spec: ModelSpec,
    settings: TrainingSettings,
    class_weight: dict[int, float] | None = None,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    templates: np.ndarray | None = None,
    checkpoint_dir: Path | None = None,
    log: Log = print,
    progress: Callable[[dict[str, Any]], None] | None = None,
    device: Device | None = None,
    input_workers: int = 1,
) -> TrainedModel:
    """Build ``spec`` and fit it phase by phase, early-stopped on validation loss.

    ``train_images`` is the (balanced) training set and ``augmented`` its stored augmented copies,
    as (images, labels) shards. Training draws from all of them (the originals only if
    ``settings.include_original``), and an epoch is one training set's worth of steps, so adding
    copies adds variety, not time per epoch.

    With ``checkpoint_dir`` the model, its optimizer and the schedule's progress are saved after
    every epoch; called again with the same data and settings, training resumes after the last
    saved epoch instead of starting over. The folder is emptied when training completes.

    ``progress`` receives each epoch's history row as it ends (the worker streams them to Dagster);
    ``device`` is where to train (default: the backend's GPU if it has one); ``input_workers``
    threads build training batches ahead of the model.
    """
    if len(train_images) == 0 or len(val_images) == 0:
        raise ValueError("training needs a non-empty train and validation split")
    if not settings.include_original and not augmented:
        raise ValueError("include_original is off and there are no augmented copies: nothing to train on")
    _check_consistency(settings)
    import keras

    import bc_pipeline.worker.consistency  # noqa: F401 - registers the loss a checkpoint may be compiled with

    device = device or configure_device(keras.backend.backend())
    phases = default_phases(spec, settings)
    checkpoint = Checkpoint(checkpoint_dir, _run_key(spec, settings, class_weight, train_labels, val_labels, augmented))
    previous_policy = keras.config.dtype_policy().name
    keras.mixed_precision.set_global_policy(precision_policy(settings.mixed_precision, device))
    try:
        keras.utils.set_random_seed(settings.seed)
        resumed = checkpoint.load(log)
        model, state = resumed if resumed else (build_model(spec, num_classes), new_state())
        views = settings.consistency_loss == "jsd"
        templates_small = _templates_for(model, templates, settings, log)
        if views:  # [clean; view 1; view 2] of the same rows, for AugMix's consistency loss
            originals, copies = _aligned_copies(model, train_images, train_labels, augmented)
            pool_images = len(originals) * (1 + len(copies))
            batches = view_batches(originals, copies, train_labels, num_classes=num_classes, batch_size=settings.batch_size,
                                   seed=settings.seed, augment=settings.augment, workers=input_workers)  # fmt: skip
        else:
            pool = _training_pool(model, train_images, train_labels, augmented, settings.include_original)
            pool_images = len(pool)
            batches = training_batches(
                pool, num_classes=num_classes, batch_size=settings.batch_size, seed=settings.seed, augment=settings.augment,
                templates=templates_small, template_probability=settings.template_probability,
                template_max_weight=settings.template_max_weight, batch_augment=settings.batch_augment,
                batch_augment_probability=settings.batch_augment_probability, workers=input_workers,
            )  # fmt: skip
        log(f"training {spec.name} with Keras {keras.__version__} on {keras.backend.backend()}, {device.description}: "
            f"{pool_images} images to draw from ({len(augmented)} augmented shards), {len(train_images)} per epoch, "
            f"{len(val_images)} val, at {spec.image_size}px, {len(phases)} phase(s), {keras.config.dtype_policy().name}, "
            f"{input_workers} input thread(s)")  # fmt: skip
        steps = max(1, -(-len(train_images) // settings.batch_size))
        train_data = feed(batches, keras.backend.backend(), workers=input_workers)
        val_data = feed(evaluation_batches(
            resize_like_model(model, val_images), val_labels, num_classes=num_classes, batch_size=settings.batch_size,
            repeat=3 if views else 1,
        ), keras.backend.backend())  # fmt: skip
        start = time.perf_counter()
        for index in range(state["phase"], len(phases)):
            model = _run_phase(
                model, index, phases[index], state, spec=spec, settings=settings, steps=steps, device=device,
                train_data=train_data, val_data=val_data, class_weight=class_weight, checkpoint=checkpoint, log=log,
                progress=progress,
            )  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    checkpoint.clear()
    history = pd.DataFrame(state["history"]).astype({"epoch": "int64", "phase": "int64"})
    info = {
        "model_name": spec.name,
        "spec": asdict(spec),
        "phases": [asdict(p) for p in phases],
        "device": device.description,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "dtype_policy": precision_policy(settings.mixed_precision, device),
        "train_seconds": round(seconds + state["seconds_before_resume"], 1),
        "resumed_from_epoch": state["resumed_from_epoch"],
        "epochs_run": int(len(history)),
        "best_epoch": best_epoch(history),
        "parameters": int(model.count_params()),
        "class_weight": class_weight,
        "pool_images": int(pool_images),
        "augmented_shards": len(augmented),
        "augmentation_templates": 0 if templates_small is None else int(len(templates_small)),
    }
    return TrainedModel(model=model, history=history, info=info)


def best_epoch(history: pd.DataFrame) -> int:
    """The epoch whose weights the model ends with: the best (lowest val_loss) of the last phase.

    Each phase restores its own best weights, so an earlier phase's lower validation loss is not
    what the final model holds.
    """
    last = history[history["phase"] == history["phase"].max()] if "phase" in history else history
    return int(last.loc[last["val_loss"].idxmin(), "epoch"])


def _run_phase(
    model: Any,
    index: int,
    phase: Phase,
    state: dict[str, Any],
    *,
    spec: ModelSpec,
    settings: TrainingSettings,
    steps: int,
    device: Device,
    train_data: Any,
    val_data: Any,
    class_weight: dict[int, float] | None,
    checkpoint: Checkpoint,
    log: Log,
    progress: Callable[[dict[str, Any]], None] | None,
) -> Any:
    """Fit one phase (or what is left of it after a resume); return the model with its best weights."""
    if state["phase_epochs"] == 0:  # a fresh phase: set trainable layers, start a new optimizer
        trainable = set_trainable(model, phase.trainable, spec.frozen_layers)
        model.compile(
            optimizer=make_optimizer(settings.optimizer, phase.learning_rate, settings.weight_decay),
            loss=make_loss(settings.loss, label_smoothing=settings.label_smoothing, gamma=settings.focal_gamma,
                           alpha=settings.focal_alpha, consistency=settings.consistency_loss,
                           consistency_weight=settings.consistency_weight),
            metrics=["accuracy"],
            jit_compile=use_jit(settings.jit_compile, device),
        )  # fmt: skip
        state.update(phase_start=state["epochs_done"], best_val_loss=None, wait=0)
        log(f"phase {index + 1}: trainable={phase.trainable} ({trainable} weight tensors), "
            f"lr {phase.learning_rate:g}, up to {phase.epochs} epochs")  # fmt: skip
    from bc_pipeline.worker.callbacks import PhaseMonitor, rate_callbacks

    remaining = phase.epochs - state["phase_epochs"]
    monitor = PhaseMonitor(index, phase.patience, state, checkpoint, log, progress)
    rates = rate_callbacks(
        settings.lr_schedule, learning_rate=phase.learning_rate, patience=phase.patience,
        phase_start=state["phase_start"], phase_epochs=phase.epochs, steps_per_epoch=steps, decay=settings.lr_decay,
        cycle_epochs=settings.cycle_epochs, cycle_min_factor=settings.cycle_min_factor,
    )  # fmt: skip
    if remaining > 0 and not state.get("phase_stopped"):
        model.fit(
            train_data,
            steps_per_epoch=steps,
            validation_data=val_data,
            initial_epoch=state["epochs_done"],
            epochs=state["epochs_done"] + remaining,
            class_weight=class_weight,
            callbacks=[*rates, monitor],
            shuffle=False,  # the PyDataset shuffles (one permutation of the pool per pass)
            verbose=0,
        )
    if phase.restore_best:
        monitor.restore_best(model)
    state.update(phase=index + 1, phase_epochs=0, phase_stopped=False)
    checkpoint.save(model, state)
    return model


def _run_key(
    spec: ModelSpec,
    settings: TrainingSettings,
    class_weight: dict[int, float] | None,
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]],
) -> str:
    """What a checkpoint must match to be resumed: model, settings, weights and the data's labels.

    The labels and shard sizes identify the data well enough here: any upstream change that
    matters (new images, another split or balancing) changes them.
    """
    return fingerprint(
        json.dumps([asdict(spec), asdict(settings), class_weight], sort_keys=True, default=str),
        np.asarray(train_labels), np.asarray(val_labels), *[np.asarray(y) for _, y in augmented],
    )  # fmt: skip


def _training_pool(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    augmented: Sequence[tuple[np.ndarray, np.ndarray]],
    include_original: bool,
) -> ImagePool:
    """Everything training draws from, at the model's input size, as uint8.

    At the model's own size the (memory-mapped) arrays are used as they are: a batch reads only its
    rows. Otherwise each array is resized once by the model's own ``resize`` layer and rounded to
    uint8 (half a grey level at most), which keeps only the small images in memory (a ninth of
    the 96 px ones at 32 px) and spares the model a resize per step.
    """
    parts = ([(images, labels)] if include_original else []) + list(augmented)
    return ImagePool([(_as_uint8(resize_like_model(model, x)), np.asarray(y, np.int64)) for x, y in parts])


def _check_consistency(settings: TrainingSettings) -> None:
    if settings.consistency_loss not in ("none", "jsd"):
        raise ValueError(f"unknown consistency_loss {settings.consistency_loss!r} (none or jsd)")
    if settings.consistency_loss == "jsd" and (settings.batch_augment != "none" or settings.loss != "categorical_crossentropy"):
        raise ValueError("the jsd consistency loss is cross-entropy on unmixed views: set batch_augment none and "
                         "loss categorical_crossentropy")  # fmt: skip


def _aligned_copies(
    model: Any, images: np.ndarray, labels: np.ndarray, augmented: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The training set and each whole stored copy, row-aligned, at the model's input size (uint8)."""
    rows = np.arange(len(labels))
    originals, _, copies = select_rows(images, labels, augmented, rows)
    return _as_uint8(resize_like_model(model, originals)), [_as_uint8(resize_like_model(model, x)) for x, _ in copies]


def _as_uint8(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


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
