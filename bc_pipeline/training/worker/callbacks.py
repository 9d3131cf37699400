"""Keras callbacks of the training loop: per-phase early stopping with checkpoints, rate schedules.

This module imports Keras at the top; :mod:`bc_pipeline.training.worker.fit` imports it only inside
its training functions, so that importing the pipeline's definitions stays free of TensorFlow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np

from bc_pipeline.training.events import Emit, WorkerEvent
from bc_pipeline.training.worker.checkpoint import Checkpoint, TrainingState

if TYPE_CHECKING:
    from bc_pipeline.training.settings import Phase, TrainingSettings

def rate_callbacks(
    settings: TrainingSettings, phase: Phase, phase_start: int, steps_per_epoch: int
) -> list[keras.callbacks.Callback]:
    """The learning-rate schedule within ``phase``, which began at global epoch ``phase_start``.

    ``settings.lr_schedule``: ``plateau`` halves the rate when validation loss stalls; ``constant``
    keeps the phase's rate; ``exponential`` multiplies it by ``lr_decay`` every epoch of the phase;
    ``cyclical`` sweeps it per batch between ``cycle_min_factor`` x rate and the rate, one cycle per
    ``cycle_epochs``; ``cosine`` lowers it per batch along half a cosine, from the rate to zero at
    the end of the phase's ``epochs`` (Loshchilov & Hutter, 2017, without restarts).

    Why cosine for a fixed budget: with CutMix and label smoothing the validation loss keeps
    setting small new lows, so ``plateau`` may never lower the rate (measured: robust-cpu still at
    its first rate at epoch 31 of 36), and the weights never settle into a minimum. Cosine spends
    the last epochs at small rates whatever the validation loss does.
    """
    schedule, learning_rate = settings.lr_schedule, phase.learning_rate
    if schedule == "cosine":
        total = phase.epochs * steps_per_epoch
        return [StepRate(lambda step: cosine_rate(step, learning_rate, total), steps_per_epoch, phase_start)]
    if schedule == "constant":
        return []
    if schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, phase.patience // 2))]
    if schedule == "exponential":
        decay = settings.lr_decay
        return [keras.callbacks.LearningRateScheduler(lambda epoch, lr: learning_rate * decay ** (epoch - phase_start))]
    if schedule == "cyclical":
        low, period = learning_rate * settings.cycle_min_factor, max(1, settings.cycle_epochs * steps_per_epoch)
        return [StepRate(lambda step: cyclical_rate(step, low, learning_rate, period), steps_per_epoch)]
    raise ValueError(f"unknown lr_schedule {schedule!r} (plateau, constant, exponential, cyclical or cosine)")


def cyclical_rate(step: int, low: float, high: float, period: int) -> float:
    """Triangular cyclical learning rate: ``low`` at the start of each cycle, ``high`` half-way."""
    position = (step % period) / period
    return low + (high - low) * (1.0 - abs(2.0 * position - 1.0))


def cosine_rate(step: int, high: float, total: int) -> float:
    """Half a cosine from ``high`` at step 0 to 0 at step ``total`` (and 0 after it)."""
    return 0.5 * high * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


class StepRate(keras.callbacks.Callback):
    """Sets the optimizer's rate before every batch to ``rate(step)``, steps counted from ``first_epoch``.

    Keras passes absolute epoch numbers (a resumed run starts at its checkpoint's epoch), so the
    step, and the rate, are the same after a restart.
    """

    def __init__(self, rate: Callable[[int], float], steps_per_epoch: int, first_epoch: int = 0) -> None:
        super().__init__()
        self.rate, self.steps_per_epoch, self.first_epoch = rate, steps_per_epoch, first_epoch
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch - self.first_epoch

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate = self.rate(self._epoch * self.steps_per_epoch + batch)


class PhaseMonitor(keras.callbacks.Callback):
    """Early stopping, best weights, history, the epoch's log line and the checkpoint of one phase.

    One callback does all of it so that what must survive a restart (best validation loss, epochs
    without improvement, history) lives in one object, ``state``, which the checkpoint saves.
    """

    def __init__(self, phase: int, patience: int, state: TrainingState, checkpoint: Checkpoint, emit: Emit) -> None:
        super().__init__()
        self.phase, self.patience, self.state, self.checkpoint, self.emit = phase, patience, state, checkpoint, emit
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        seconds = time.perf_counter() - self._start
        row = {"epoch": epoch + 1, "phase": self.phase + 1, "lr": lr, "seconds": round(seconds, 2), **logs}
        val_loss = logs.get("val_loss", np.inf)
        if self.state.record_epoch(epoch + 1, row, val_loss, self.patience):
            self.best_weights = self.model.get_weights()
            self.checkpoint.save_best(self.model)
        if self.state.phase_stopped:
            self.model.stop_training = True
        self.checkpoint.save(self.model, self.state)
        self.emit(WorkerEvent("epoch", row))

    def restore_best(self, model: keras.Model) -> None:
        """The phase's best weights: from memory, or from the checkpoint after a resume."""
        if self.best_weights is not None:
            model.set_weights(self.best_weights)
        else:
            self.checkpoint.restore_best(model)
