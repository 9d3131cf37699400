"""Train a zoo model on uint8 images: phases, optimizers, losses, schedules, checkpoints.

Backend-neutral: Keras on TensorFlow, JAX or PyTorch, fed by the numpy pipeline of
:mod:`bc_pipeline.training.worker.data`. Keras is imported inside the functions, after
:func:`bc_pipeline.training.worker.backend.select_backend` has chosen the backend.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.storage import fingerprint
from bc_pipeline.models.inference import resize_like_model
from bc_pipeline.models.zoo import ModelSpec, build_model, set_trainable
from bc_pipeline.training.events import Emit, WorkerEvent
from bc_pipeline.training.model_folder import TrainingFacts
from bc_pipeline.training.settings import Phase, TrainingSettings
from bc_pipeline.training.worker.backend import Device, configure_device, precision_policy, use_jit
from bc_pipeline.training.worker.checkpoint import Checkpoint, TrainingState
from bc_pipeline.training.worker.data import (
    BatchRecipe,
    ImagePool,
    evaluation_batches,
    feed,
    select_rows,
    training_batches,
    view_batches,
)

Log = Callable[[str], None]


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
    (:class:`bc_pipeline.training.worker.consistency.AugMixConsistency`), for batches of three views.

    Focal loss scales each example's cross-entropy by ``alpha * (1 - p_true) ** gamma``: examples
    the model already gets right weigh less, hard ones (rare classes, perturbed images) more. At
    gamma 0 and alpha 1 it is cross-entropy. Keras' built-in losses keep saved models loadable.
    """
    import keras

    if consistency == "jsd":
        from bc_pipeline.training.worker.consistency import AugMixConsistency

        return AugMixConsistency(weight=consistency_weight, label_smoothing=label_smoothing)
    if name == "categorical_crossentropy":
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if name == "focal":
        return keras.losses.CategoricalFocalCrossentropy(alpha=alpha, gamma=gamma, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {name!r} (categorical_crossentropy or focal)")


@dataclass(frozen=True, eq=False)
class TrainingData:
    """What one training learns from and is validated on: uint8 images (N, H, W, 3), integer labels.

    ``train_images`` is the (balanced) training set and ``augmented`` its stored augmented copies,
    as (images, labels) shards. ``templates`` are recovered corruption templates (used only with
    ``template_augmentation``); ``class_weight`` weighs each class's loss. One value, so that a
    run's inputs travel together: cross-validation swaps the rows with one ``replace``, and the
    checkpoint's key is taken from it in one place. ``eq=False``: arrays have no plain equality.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    num_classes: int
    augmented: Sequence[tuple[np.ndarray, np.ndarray]] = ()
    templates: np.ndarray | None = None
    class_weight: dict[int, float] | None = None


@dataclass(frozen=True)
class RunOptions:
    """How a training runs and reports, as opposed to what it learns (data, spec, settings).

    ``checkpoint_dir``: save the model, its optimizer and the schedule's progress after every epoch
    and resume from there (None: no checkpoints). ``log`` gets each free-text line of the run;
    ``events`` each :class:`WorkerEvent` (resumed, every epoch's history row; the worker streams
    them to Dagster), or, when None, ``log`` gets their lines. ``device``: where to train (default:
    the backend's GPU if it has one); ``input_workers`` threads build training batches ahead of
    the model.
    """

    checkpoint_dir: Path | None = None
    log: Log = print
    events: Emit | None = None
    device: Device | None = None
    input_workers: int = 1

    def emit(self, event: WorkerEvent) -> None:
        """``event`` to ``events``, or its line to ``log``."""
        if self.events is not None:
            self.events(event)
        else:
            self.log(event.text())


@dataclass(frozen=True, eq=False)  # eq=False: a Keras model and a frame have no plain equality
class Fitted:
    """What one call of :func:`train_classifier` leaves: the model, its per-epoch history, the facts of the run.

    ``temperature`` is set when epoch selection calibrated on held-out predictions already (a
    retrain on validation leaves no held-out split); otherwise the worker calibrates afterwards.
    """

    model: Any
    history: pd.DataFrame
    facts: TrainingFacts
    temperature: float | None = None
    temperature_source: str | None = None


def train_classifier(
    data: TrainingData, spec: ModelSpec, settings: TrainingSettings, options: RunOptions = RunOptions()
) -> Fitted:
    """Build ``spec`` and fit it phase by phase, early-stopped on validation loss.

    Training draws from the training set and all its augmented copies (the originals only if
    ``settings.include_original``), and an epoch is one training set's worth of steps, so adding
    copies adds variety, not time per epoch.

    With ``options.checkpoint_dir``, called again with the same data and settings, training resumes
    after the last saved epoch instead of starting over. The folder is emptied when training
    completes.
    """
    _check_inputs(data, settings)
    import keras

    import bc_pipeline.training.worker.consistency  # noqa: F401 - registers the loss a checkpoint may be compiled with

    device = options.device or configure_device(keras.backend.backend())
    run = _Run(data=data, spec=spec, settings=settings, options=options, phases=default_phases(spec, settings),
               device=device, checkpoint=Checkpoint(options.checkpoint_dir, _run_key(spec, settings, data)))  # fmt: skip
    with _global_dtype_policy(precision_policy(settings.mixed_precision, device)):
        keras.utils.set_random_seed(settings.seed)
        resumed = run.checkpoint.load(options.emit)
        model, state = resumed if resumed else (build_model(spec, data.num_classes, data.train_images), TrainingState())
        feeds = run.feeds(model)
        start = time.perf_counter()
        while state.phase < len(run.phases):
            model = run.fit_phase(model, state, feeds)
        seconds = time.perf_counter() - start
    run.checkpoint.clear()
    return run.result(model, state, feeds, seconds)


def best_epoch(history: pd.DataFrame) -> int:
    """The epoch whose weights the model ends with: the best (lowest val_loss) of the last phase.

    Each phase restores its own best weights, so an earlier phase's lower validation loss is not
    what the final model holds.
    """
    last = history[history["phase"] == history["phase"].max()] if "phase" in history else history
    return int(last.loc[last["val_loss"].idxmin(), "epoch"])


@dataclass(frozen=True)
class _Feeds:
    """The batches a run trains and validates on, and what its info reports about them."""

    train: Any
    val: Any
    steps: int  # training steps per epoch: one training set's worth
    pool_images: int  # images training draws from
    templates: int  # corruption templates superimposed (0: template augmentation off)


@dataclass(frozen=True)
class _Run:
    """One call of :func:`train_classifier`: what its steps share, so that none needs a long parameter list."""

    data: TrainingData
    spec: ModelSpec
    settings: TrainingSettings
    options: RunOptions
    phases: tuple[Phase, ...]
    device: Device
    checkpoint: Checkpoint

    def feeds(self, model: Any) -> _Feeds:
        """Training and validation batches at ``model``'s input size; logs what training draws from."""
        import keras

        data, settings, workers = self.data, self.settings, self.options.input_workers
        templates = _templates_for(model, data.templates, settings, self.options.log)
        batches, pool_images = _training_batches(model, data, settings, templates, workers)
        self._announce(pool_images)
        backend = keras.backend.backend()
        train = feed(batches, backend, workers=workers)
        val = feed(evaluation_batches(
            resize_like_model(model, data.val_images), data.val_labels, num_classes=data.num_classes,
            batch_size=settings.batch_size, repeat=3 if settings.consistency_loss == "jsd" else 1,
        ), backend)  # fmt: skip
        steps = max(1, -(-len(data.train_images) // settings.batch_size))
        return _Feeds(train, val, steps, pool_images, 0 if templates is None else int(len(templates)))

    def _announce(self, pool_images: int) -> None:
        """The run's opening log line: what trains where, on how much data."""
        import keras

        data, spec = self.data, self.spec
        self.options.log(
            f"training {spec.name} with Keras {keras.__version__} on {keras.backend.backend()}, {self.device.description}: "
            f"{pool_images} images to draw from ({len(data.augmented)} augmented shards), {len(data.train_images)} per epoch, "
            f"{len(data.val_images)} val, at {spec.image_size}px, {len(self.phases)} phase(s), {keras.config.dtype_policy().name}, "
            f"{self.options.input_workers} input thread(s)"
        )  # fmt: skip

    def fit_phase(self, model: Any, state: TrainingState, feeds: _Feeds) -> Any:
        """Fit phase ``state.phase`` (or what is left of it after a resume); return the model with its best weights."""
        from bc_pipeline.training.worker.callbacks import PhaseMonitor, rate_callbacks

        index = state.phase
        phase = self.phases[index]
        if state.phase_epochs == 0:  # a fresh phase: set trainable layers, start a new optimizer
            self._start_phase(model, phase, state)
        remaining = phase.epochs - state.phase_epochs
        monitor = PhaseMonitor(index, phase.patience, state, self.checkpoint, self.options.emit)
        rates = rate_callbacks(self.settings, phase, state.phase_start, feeds.steps)
        if remaining > 0 and not state.phase_stopped:
            model.fit(
                feeds.train,
                steps_per_epoch=feeds.steps,
                validation_data=feeds.val,
                initial_epoch=state.epochs_done,
                epochs=state.epochs_done + remaining,
                class_weight=self.data.class_weight,
                callbacks=[*rates, monitor],
                shuffle=False,  # the PyDataset shuffles (one permutation of the pool per pass)
                verbose=0,
            )
        if phase.restore_best:
            monitor.restore_best(model)
        state.finish_phase()
        self.checkpoint.save(model, state)
        return model

    def _start_phase(self, model: Any, phase: Phase, state: TrainingState) -> None:
        """Set the phase's trainable layers and compile with a fresh optimizer (each phase starts its own)."""
        settings = self.settings
        trainable = set_trainable(model, phase.trainable, self.spec.frozen_layers)
        model.compile(
            optimizer=make_optimizer(settings.optimizer, phase.learning_rate, settings.weight_decay),
            loss=make_loss(settings.loss, label_smoothing=settings.label_smoothing, gamma=settings.focal_gamma,
                           alpha=settings.focal_alpha, consistency=settings.consistency_loss,
                           consistency_weight=settings.consistency_weight),
            metrics=["accuracy"],
            jit_compile=use_jit(settings.jit_compile, self.device),
        )  # fmt: skip
        state.start_phase()
        self.options.log(f"phase {state.phase + 1}: trainable={phase.trainable} ({trainable} weight tensors), "
                         f"lr {phase.learning_rate:g}, up to {phase.epochs} epochs")  # fmt: skip

    def result(self, model: Any, state: TrainingState, feeds: _Feeds, seconds: float) -> Fitted:
        """The fitted model, its history and the facts of the run (``seconds``: this call's training time)."""
        import keras

        history = pd.DataFrame(state.history).astype({"epoch": "int64", "phase": "int64"})
        facts = TrainingFacts(
            spec=self.spec, phases=self.phases, device=self.device.description, backend=keras.backend.backend(),
            keras_version=keras.__version__, dtype_policy=precision_policy(self.settings.mixed_precision, self.device),
            train_seconds=round(seconds + state.seconds_before_resume, 1), epochs_run=int(len(history)),
            best_epoch=best_epoch(history), pool_images=int(feeds.pool_images), augmented_shards=len(self.data.augmented),
            augmentation_templates=feeds.templates, class_weight=self.data.class_weight,
            resumed_from_epoch=state.resumed_from_epoch,
        )  # fmt: skip
        return Fitted(model=model, history=history, facts=facts)


@contextmanager
def _global_dtype_policy(name: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``name`` inside the block, and back to the previous one after it, even on errors."""
    import keras

    previous = keras.config.dtype_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _training_batches(
    model: Any, data: TrainingData, settings: TrainingSettings, templates: np.ndarray | None, workers: int
) -> tuple[Any, int]:
    """The training batch source and the number of images it draws from.

    With the jsd consistency loss, batches are [clean; view 1; view 2] of the same rows (AugMix);
    otherwise they are drawn from the whole pool, mixed and blended as the settings say.
    """
    recipe = BatchRecipe.from_settings(settings, data.num_classes, templates)
    if settings.consistency_loss == "jsd":
        originals, copies = _aligned_copies(model, data.train_images, data.train_labels, data.augmented)
        return view_batches(originals, copies, data.train_labels, recipe, workers=workers), len(originals) * (1 + len(copies))
    pool = _training_pool(model, data.train_images, data.train_labels, data.augmented, settings.include_original)
    return training_batches(pool, recipe, workers=workers), len(pool)


def _check_inputs(data: TrainingData, settings: TrainingSettings) -> None:
    """Refuse, before Keras loads, a run that has nothing to train or validate on or mismatched settings."""
    if len(data.train_images) == 0 or len(data.val_images) == 0:
        raise ValueError("training needs a non-empty train and validation split")
    if not settings.include_original and not data.augmented:
        raise ValueError("include_original is off and there are no augmented copies: nothing to train on")
    _check_consistency(settings)


def _run_key(spec: ModelSpec, settings: TrainingSettings, data: TrainingData) -> str:
    """What a checkpoint must match to be resumed: model, settings, weights and the data's labels.

    The labels and shard sizes identify the data well enough here: any upstream change that
    matters (new images, another split or balancing) changes them.
    """
    return fingerprint(
        json.dumps([asdict(spec), asdict(settings), data.class_weight], sort_keys=True, default=str),
        np.asarray(data.train_labels), np.asarray(data.val_labels), *[np.asarray(y) for _, y in data.augmented],
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
