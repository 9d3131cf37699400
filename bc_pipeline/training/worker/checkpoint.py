"""Training checkpoints: resume an interrupted training after its last completed epoch."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from bc_pipeline.core.storage import save_json, save_via_temp
from bc_pipeline.training.events import Emit, WorkerEvent


@dataclass
class TrainingState:
    """Progress through a training schedule; saved with every checkpoint (``state.json``).

    What must survive a restart lives here, in one object that the checkpoint saves and
    :class:`bc_pipeline.training.worker.callbacks.PhaseMonitor` updates after every epoch: where the schedule
    is, the phase's best validation loss and epochs without improvement, and the history so far.
    """

    phase: int = 0  # index of the phase in progress (== number of phases when done)
    phase_epochs: int = 0  # epochs run in that phase
    phase_start: int = 0  # global epoch at which that phase began
    phase_stopped: bool = False  # early stopping ended that phase
    epochs_done: int = 0
    best_val_loss: float | None = None
    best_smoothed_loss: float | None = None  # the phase's lowest smoothed validation loss (early stopping)
    wait: int = 0  # epochs since a new low of the validation loss or of its smoothed value
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    seconds_before_resume: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The fields under their own names: the keys of ``state.json`` (older checkpoints keep resuming)."""
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainingState:
        """The state saved by :meth:`to_json`; other keys of ``state.json`` (key, model, elapsed) are ignored.

        Fields a checkpoint of an older version lacks take their defaults.
        """
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def start_phase(self) -> None:
        """A fresh phase begins at the current epoch, with no best validation loss yet."""
        self.phase_start, self.best_val_loss, self.best_smoothed_loss, self.wait = self.epochs_done, None, None, 0

    def record_epoch(self, epoch: int, row: dict[str, Any], val_loss: float, patience: int) -> bool:
        """Count finished epoch ``epoch`` (1-based) with its history ``row``; True if ``val_loss`` is the phase's best.

        ``patience`` epochs in a row with neither a new low of the validation loss nor a new low
        of its mean over the phase's last :data:`SMOOTHING_EPOCHS` epochs stop the phase
        (``phase_stopped``). Why the mean: validation loss under heavy augmentation jumps from
        epoch to epoch (measured on pbc96: 0.26 at epoch 5, 1.52 at 7, 0.24 at 8), and one lucky low
        epoch would otherwise end a run that is still learning (`quick` on pbc96 once stopped at
        epoch 11 of 24 on a best epoch 5, at 92.6 %). Why either: a run never stops earlier than
        the raw rule would stop it, and a real plateau or divergence raises both, so it still stops.
        The best weights stay those of the lowest raw validation loss.
        """
        self.history.append(row)
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        smoothed = self._smoothed_loss()
        smoothed_improved = self.best_smoothed_loss is None or smoothed < self.best_smoothed_loss
        if smoothed_improved:
            self.best_smoothed_loss = smoothed
        self.wait = 0 if improved or smoothed_improved else self.wait + 1
        self.epochs_done = epoch
        self.phase_epochs += 1
        if self.wait >= patience:
            self.phase_stopped = True
        return improved

    def _smoothed_loss(self) -> float:
        phase = self.history[-1].get("phase")
        recent = [row.get("val_loss", np.inf) for row in self.history if row.get("phase") == phase][-SMOOTHING_EPOCHS:]
        return float(np.mean(recent))

    def finish_phase(self) -> None:
        """Move on to the next phase; its first epoch will start it afresh (:meth:`start_phase`)."""
        self.phase, self.phase_epochs, self.phase_stopped = self.phase + 1, 0, False


SMOOTHING_EPOCHS = 3  # validation losses averaged for early stopping (TrainingState.record_epoch)
STATE_FILE = "state.json"  # the checkpoint's progress, written last


def saved_epochs(directory: Path | None) -> int | None:
    """The epochs a checkpoint folder has saved (None: no readable checkpoint there)."""
    if directory is None or not (Path(directory) / STATE_FILE).is_file():
        return None
    try:
        return int(json.loads((Path(directory) / STATE_FILE).read_text())["epochs_done"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Checkpoint:
    """The last epoch's model (with optimizer state), the phase's best weights and the progress.

    Files: ``epoch-NNNN-phase-P.keras``, ``best.weights.h5`` and ``state.json``. ``state.json`` is
    written last and names the model file it belongs to, so a run killed at any instant leaves a
    consistent checkpoint, the previous one or the new one. ``key`` fingerprints the data and
    settings; a checkpoint with another key is stale and is deleted rather than resumed.
    ``directory=None`` turns checkpointing off.
    """

    def __init__(self, directory: Path | None, key: str) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.key = key
        self._started = time.perf_counter()

    def save(self, model: Any, state: TrainingState) -> None:
        """The model, then ``state.json`` naming it (last, so that a crash leaves one consistent checkpoint)."""
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{state.epochs_done:04d}-phase-{state.phase}.keras"
        save_via_temp(self.directory / name, model.save)
        elapsed = state.seconds_before_resume + time.perf_counter() - self._started
        save_json(self.directory / STATE_FILE, {**state.to_json(), "key": self.key, "model": name, "elapsed": elapsed})
        for old in self.directory.glob("epoch-*.keras"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def save_best(self, model: Any) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_via_temp(self.directory / "best.weights.h5", model.save_weights)

    def restore_best(self, model: Any) -> None:
        if self.directory is not None and (self.directory / "best.weights.h5").is_file():
            model.load_weights(self.directory / "best.weights.h5")

    def load(self, emit: Emit) -> tuple[Any, TrainingState] | None:
        """(model, state) from a matching checkpoint, or None to start from scratch (``emit`` hears which)."""
        if self.directory is None or not (self.directory / STATE_FILE).is_file():
            return None
        import keras

        try:
            saved = json.loads((self.directory / STATE_FILE).read_text())
            if saved.get("key") != self.key:
                emit(WorkerEvent("discarded", {"directory": str(self.directory), "reason": "it was made with other data or settings"}))
                self.clear()
                return None
            model = keras.saving.load_model(self.directory / saved["model"])
        except Exception as error:  # noqa: BLE001 - a damaged checkpoint costs its epochs, never the run
            first = (str(error).strip().splitlines() or [""])[0][:200]
            reason = f"it is damaged ({type(error).__name__}: {first}); training starts from scratch"
            emit(WorkerEvent("discarded", {"directory": str(self.directory), "reason": reason}))
            self.clear()
            return None
        state = replace(TrainingState.from_json(saved), resumed_from_epoch=saved["epochs_done"],
                        seconds_before_resume=saved["elapsed"])  # fmt: skip
        emit(WorkerEvent("resumed", {"epoch": saved["epochs_done"], "phase": min(saved["phase"] + 1, 99)}))
        return model, state

    def clear(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
