"""Run one training job from its spec: load the arrays, train, write the model folder atomically.

The model folder is what :func:`bc_pipeline.core.artifacts.read_artifact` reads as a trained
model: ``model.keras``, ``history.parquet`` and ``info.json`` (with the weights' fingerprint, the
asset's data version). Files are written under temporary names and renamed, and the folder itself
is a staging folder that the asset renames into place only when the worker has succeeded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bc_pipeline.training.spec import WorkerSpec, load_array, load_ref
from bc_pipeline.training.worker.report import EPOCH, SUMMARY, Reporter


def input_threads(requested: int) -> int:
    """Threads that build batches: as asked, or one per core beyond the first two, at most 8.

    On a small CPU machine the cores train the model; a thread would take them from it.
    """
    if requested > 0:
        return requested
    return max(1, min(8, (os.cpu_count() or 1) - 2))


def run_job(spec: WorkerSpec, reporter: Reporter) -> Path:
    """Train the spec's model and write its folder; returns the folder. Keras must not be imported yet."""
    from bc_pipeline.training.worker.backend import configure_device, select_backend

    started = time.perf_counter()
    select_backend(spec.backend)
    device = configure_device(spec.backend, spec.device)
    from bc_pipeline.models.inference import weights_fingerprint
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData
    from bc_pipeline.training.worker.selection import train_with_epoch_selection

    train_x, train_y = load_ref(spec, spec.train)
    val_x, val_y = load_ref(spec, spec.val)
    data = TrainingData(
        train_x, train_y, val_x, val_y, num_classes=spec.num_classes, augmented=[load_ref(spec, ref) for ref in spec.augmented],
        templates=load_array(spec, spec.templates, mmap=False) if spec.templates else None, class_weight=spec.class_weight,
    )  # fmt: skip
    reporter.log(f"worker ready in {time.perf_counter() - started:.1f}s: {spec.backend} on {device.description}")
    groups = load_array(spec, spec.train_groups, mmap=False) if spec.train_groups else None
    options = RunOptions(
        checkpoint_dir=spec.path(spec.checkpoint_dir) if spec.checkpoint_dir else None, log=reporter.log,
        progress=lambda row: reporter.message(EPOCH, _plain(row)), device=device, input_workers=input_threads(spec.input_workers),
    )  # fmt: skip
    result = train_with_epoch_selection(data, spec.model, spec.settings, options, groups=groups)
    result.info.update(spec.info, weights_fingerprint=weights_fingerprint(result.model))
    if "temperature" not in result.info:  # a retrain on validation calibrated on held-out images already
        result.info["temperature"] = _temperature(result.model, val_x, val_y, reporter)
    result.info["worker_seconds"] = round(time.perf_counter() - started, 1)
    folder = write_model_folder(spec.path(spec.output_dir), result)
    reporter.message(SUMMARY, {k: result.info[k] for k in ("device", "backend", "train_seconds", "epochs_run", "best_epoch")})
    return folder


def _temperature(model: Any, val_x: Any, val_y: Any, reporter: Reporter) -> float:
    """The softmax temperature that calibrates ``model`` on the validation split (saved in info.json)."""
    from bc_pipeline.models.calibration import fit_temperature, reliability, scale_probabilities
    from bc_pipeline.models.inference import predict_proba

    proba = predict_proba(model, val_x)
    temperature = fit_temperature(proba, val_y)
    before, after = reliability(proba, val_y).ece, reliability(scale_probabilities(proba, temperature), val_y).ece
    reporter.log(f"calibration: temperature {temperature:.3f} on the validation split (ECE {100 * before:.2f} % -> {100 * after:.2f} %)")
    return round(temperature, 6)


def write_model_folder(folder: Path, result: Any) -> Path:
    """``model.keras``, ``history.parquet``, ``info.json`` in ``folder``, each written then renamed."""
    from bc_pipeline.core.storage import save_json, save_parquet
    from bc_pipeline.training.worker.checkpoint import save_via_temp

    folder.mkdir(parents=True, exist_ok=True)
    save_via_temp(folder / "model.keras", result.model.save)
    save_parquet(folder / "history.parquet", result.history)
    save_json(folder / "info.json", json.loads(json.dumps(result.info, default=str)))
    return folder


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, str)) else float(v)) for k, v in row.items()}
