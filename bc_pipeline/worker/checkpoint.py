"""Training checkpoints: resume an interrupted training after its last completed epoch."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bc_pipeline.lib.storage import save_json

Log = Callable[[str], None]


def new_state() -> dict[str, Any]:
    """Progress through a training schedule; saved with every checkpoint."""
    return {
        "phase": 0,  # index of the phase in progress (== number of phases when done)
        "phase_epochs": 0,  # epochs run in that phase
        "phase_start": 0,  # global epoch at which that phase began
        "phase_stopped": False,  # early stopping ended that phase
        "epochs_done": 0,
        "best_val_loss": None,
        "wait": 0,  # epochs since the phase's best validation loss
        "history": [],
        "resumed_from_epoch": None,
        "seconds_before_resume": 0.0,
    }


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

    def save(self, model: Any, state: dict[str, Any]) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{state['epochs_done']:04d}-phase-{state['phase']}.keras"
        save_via_temp(self.directory / name, model.save)
        elapsed = state["seconds_before_resume"] + time.perf_counter() - self._started
        save_json(self.directory / "state.json", {**state, "key": self.key, "model": name, "elapsed": elapsed})
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

    def load(self, log: Log) -> tuple[Any, dict[str, Any]] | None:
        """(model, state) from a matching checkpoint, or None to start from scratch."""
        if self.directory is None or not (self.directory / "state.json").is_file():
            return None
        import keras

        saved = json.loads((self.directory / "state.json").read_text())
        if saved.get("key") != self.key:
            log(f"discarding the checkpoint in {self.directory}: it was made with other data or settings")
            self.clear()
            return None
        model = keras.saving.load_model(self.directory / saved["model"])
        state = {k: saved[k] for k in new_state()}
        state.update(resumed_from_epoch=saved["epochs_done"], seconds_before_resume=saved["elapsed"])
        log(f"resuming from the checkpoint after epoch {saved['epochs_done']} (phase {min(saved['phase'] + 1, 99)})")
        return model, state

    def clear(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def save_via_temp(path: Path, save: Callable[[Path], Any]) -> None:
    """Save through a temporary sibling and rename it into place.

    Keras picks the format from the suffix, so the temporary name keeps it (``.name.1a2b.keras``).
    """
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
