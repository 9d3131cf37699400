"""Training checkpoints: resume an interrupted training after its last completed epoch."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

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
    wait: int = 0  # epochs since the phase's best validation loss
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_epoch: int | None = None
    seconds_before_resume: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The fields under their own names: the keys of ``state.json`` (older checkpoints keep resuming)."""
        return asdict(self)

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainingState:
        """The state saved by :meth:`to_json`; other keys of ``state.json`` (key, model, elapsed) are ignored."""
        return cls(**{f.name: saved[f.name] for f in fields(cls)})

    def start_phase(self) -> None:
        """A fresh phase begins at the current epoch, with no best validation loss yet."""
        self.phase_start, self.best_val_loss, self.wait = self.epochs_done, None, 0

    def record_epoch(self, epoch: int, row: dict[str, Any], val_loss: float, patience: int) -> bool:
        """Count finished epoch ``epoch`` (1-based) with its history ``row``; True if ``val_loss`` is the phase's best.

        ``patience`` epochs in a row without a new best stop the phase (``phase_stopped``).
        """
        self.history.append(row)
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.wait = val_loss, 0
        else:
            self.wait += 1
        self.epochs_done = epoch
        self.phase_epochs += 1
        if self.wait >= patience:
            self.phase_stopped = True
        return improved

    def finish_phase(self) -> None:
        """Move on to the next phase; its first epoch will start it afresh (:meth:`start_phase`)."""
        self.phase, self.phase_epochs, self.phase_stopped = self.phase + 1, 0, False


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
