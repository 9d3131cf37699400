"""Run one training job from its spec: load the arrays, train, write the model folder atomically.

The model folder (:mod:`bc_pipeline.training.model_folder`) holds ``model.keras``,
``history.parquet`` and ``info.json``, the typed record (with the weights' fingerprint, the asset's
data version). Files are written under temporary names and renamed, and the folder itself
is a staging folder that the asset renames into place only when the worker has succeeded.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bc_pipeline.training.events import WorkerEvent
from bc_pipeline.training.model_folder import ModelRecord, TrainedModel, write_model_folder
from bc_pipeline.training.spec import WorkerSpec, load_array, load_ref
from bc_pipeline.training.worker.report import Reporter


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
    from bc_pipeline.training.worker.fit import RunOptions
    from bc_pipeline.training.worker.selection import train_with_epoch_selection

    data = _training_data(spec)
    reporter.event(WorkerEvent("ready", {"seconds": round(time.perf_counter() - started, 1), "backend": spec.backend,
                                         "device": device.description}))  # fmt: skip
    groups = load_array(spec, spec.train_groups, mmap=False) if spec.train_groups else None
    options = RunOptions(checkpoint_dir=spec.path(spec.checkpoint_dir) if spec.checkpoint_dir else None, log=reporter.log,
                         events=reporter.event, device=device, input_workers=input_threads(spec.input_workers))  # fmt: skip
    fitted = train_with_epoch_selection(data, spec.model, spec.settings, options, groups=groups)
    trained = _trained_model(spec, fitted, data, reporter, worker_seconds=time.perf_counter() - started)
    folder = write_model_folder(spec.path(spec.output_dir), trained)
    facts = trained.record.training
    reporter.event(WorkerEvent("finished", {"device": facts.device, "backend": facts.backend, "train_seconds": facts.train_seconds,
                                            "epochs_run": facts.epochs_run, "best_epoch": facts.best_epoch}))  # fmt: skip
    return folder


def _training_data(spec: WorkerSpec) -> Any:
    """The spec's arrays (memory-mapped where stored) as the trainer's :class:`TrainingData`."""
    from bc_pipeline.training.worker.fit import TrainingData

    train_x, train_y = load_ref(spec, spec.train)
    val_x, val_y = load_ref(spec, spec.val)
    return TrainingData(
        train_x, train_y, val_x, val_y, num_classes=spec.num_classes, augmented=[load_ref(spec, ref) for ref in spec.augmented],
        templates=load_array(spec, spec.templates, mmap=False) if spec.templates else None, class_weight=spec.class_weight,
    )  # fmt: skip


def _trained_model(spec: WorkerSpec, fitted: Any, data: Any, reporter: Reporter, *, worker_seconds: float) -> TrainedModel:
    """The fitted model with its record: the spec's classes and settings, the run's facts, calibration, fingerprint."""
    from bc_pipeline.models.inference import weights_fingerprint

    temperature, source = fitted.temperature, fitted.temperature_source
    if temperature is None:  # a retrain on validation calibrated on held-out images already
        temperature, source = _temperature(fitted.model, data.val_images, data.val_labels, reporter), None
    record = ModelRecord(
        model_name=spec.model.name, class_names=spec.class_names, weights_fingerprint=weights_fingerprint(fitted.model),
        parameters=int(fitted.model.count_params()), image_size=spec.model.image_size, temperature=temperature,
        augmentation_policies=spec.augmentation_policies, settings=spec.settings,
        training=replace(fitted.facts, worker_seconds=round(worker_seconds, 1)),
        **({"temperature_source": source} if source else {}),
    )  # fmt: skip
    return TrainedModel(fitted.model, fitted.history, record)


def _temperature(model: Any, val_x: Any, val_y: Any, reporter: Reporter) -> float:
    """The softmax temperature that calibrates ``model`` on the validation split (saved in info.json)."""
    from bc_pipeline.models.calibration import fit_temperature, reliability, scale_probabilities
    from bc_pipeline.models.inference import predict_proba

    proba = predict_proba(model, val_x)
    temperature = fit_temperature(proba, val_y)
    before, after = reliability(proba, val_y).ece, reliability(scale_probabilities(proba, temperature), val_y).ece
    reporter.log(f"calibration: temperature {temperature:.3f} on the validation split (ECE {100 * before:.2f} % -> {100 * after:.2f} %)")
    return round(temperature, 6)
