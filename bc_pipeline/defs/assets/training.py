"""Stage 4: train each model of the zoo (one partition per model) in the Pipes training worker (bc_pipeline.training.worker).

The asset prepares a job (``training.job``), launches the worker through the ``training_worker``
resource, relays the worker's events into the run's log as they arrive, and returns the model
folder with its figures. The ``ensemble`` partition averages stored models instead (``training.ensemble``).
"""

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline.core.artifacts import ImageSet, ModelFolder, ShardSet
from bc_pipeline.dagster_utils import automation
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.launch import TRAINING_STEP_K8S_CONFIG
from bc_pipeline.dagster_utils.partitions import model_partitions
from bc_pipeline.dagster_utils.progress import record_worker_event
from bc_pipeline.dagster_utils.versions import SettingsConfig, override, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage, TrainingWorker
from bc_pipeline.evaluation.lab_shift import with_shifted_copies
from bc_pipeline.models.zoo import ENSEMBLE, ModelSpec, WeightsUnavailableError, model_spec
from bc_pipeline.preparation.balancing import class_weight_of
from bc_pipeline.preparation.splits import split_arrays, split_rows
from bc_pipeline.training.events import WorkerEvent
from bc_pipeline.training.job import JobFolders, Placement, TrainingInputs, TrainingJob, prepare_job
from bc_pipeline.training.model_folder import record_metadata, write_model_folder
from bc_pipeline.training.settings import (
    BatchAugment,
    ConsistencyLoss,
    Loss,
    LrSchedule,
    Optimizer,
    Phase,
    Selection,
    Switch,
    TrainingSettings,  # fmt: skip
)

# Fields of a zoo entry (models.zoo.ModelSpec) a run may override for every model it trains.
MODEL_OVERRIDES = ("image_size", "weights", "head", "dropout", "frozen_layers", "input_norm", "norm")


class PhaseConfig(SettingsConfig):
    """One phase of an explicit schedule (training.settings.Phase)."""

    settings_class = Phase
    trainable: str = setting(Phase, "trainable")
    learning_rate: float = setting(Phase, "learning_rate")
    epochs: int = setting(Phase, "epochs")
    patience: int = setting(Phase, "patience")
    restore_best: bool = setting(Phase, "restore_best")


class TrainingConfig(SettingsConfig):
    """Training settings for every model partition of the run (training.settings.TrainingSettings, the one
    schema), overrides of the partition's zoo entry (models.zoo.REGISTRY), resuming, and the ensemble's members."""

    settings_class = TrainingSettings
    epochs: int = setting(TrainingSettings, "epochs")
    batch_size: int = setting(TrainingSettings, "batch_size")
    learning_rate: float = setting(TrainingSettings, "learning_rate")
    patience: int = setting(TrainingSettings, "patience")
    phases: list[PhaseConfig] = setting(TrainingSettings, "phases")
    lr_schedule: LrSchedule = setting(TrainingSettings, "lr_schedule")
    lr_decay: float = setting(TrainingSettings, "lr_decay")
    cycle_epochs: int = setting(TrainingSettings, "cycle_epochs")
    cycle_min_factor: float = setting(TrainingSettings, "cycle_min_factor")
    optimizer: Optimizer = setting(TrainingSettings, "optimizer")
    weight_decay: float = setting(TrainingSettings, "weight_decay")
    loss: Loss = setting(TrainingSettings, "loss")
    focal_gamma: float = setting(TrainingSettings, "focal_gamma")
    focal_alpha: float = setting(TrainingSettings, "focal_alpha")
    label_smoothing: float = setting(TrainingSettings, "label_smoothing")
    augment: bool = setting(TrainingSettings, "augment")
    seed: int = setting(TrainingSettings, "seed")
    batch_augment: BatchAugment = setting(TrainingSettings, "batch_augment")
    batch_augment_probability: float = setting(TrainingSettings, "batch_augment_probability")
    include_original: bool = setting(TrainingSettings, "include_original")
    template_augmentation: bool = setting(TrainingSettings, "template_augmentation")
    template_probability: float = setting(TrainingSettings, "template_probability")
    template_max_weight: float = setting(TrainingSettings, "template_max_weight")
    mixed_precision: Switch = setting(TrainingSettings, "mixed_precision")
    jit_compile: Switch = setting(TrainingSettings, "jit_compile")
    cv_folds: int = setting(TrainingSettings, "cv_folds")
    retrain_on_validation: bool = setting(TrainingSettings, "retrain_on_validation")
    consistency_loss: ConsistencyLoss = setting(TrainingSettings, "consistency_loss")
    consistency_weight: float = setting(TrainingSettings, "consistency_weight")
    selection: Selection = setting(TrainingSettings, "selection")
    # Overrides of the partition's zoo entry (None: the registry's value). Dagster config has no
    # optional Literal: ``head``, ``input_norm`` and ``norm`` are strings here, checked by models.zoo.check_spec.
    image_size: int | None = override(ModelSpec, "image_size")
    weights: str | None = override(ModelSpec, "weights")
    head: str | None = override(ModelSpec, "head")
    dropout: float | None = override(ModelSpec, "dropout")
    frozen_layers: int | None = override(ModelSpec, "frozen_layers")
    input_norm: str | None = override(ModelSpec, "input_norm")
    norm: str | None = override(ModelSpec, "norm")
    resume: bool = Field(default=True, description="Checkpoint every epoch and resume an interrupted training.")
    ensemble_members: list[str] = Field(
        default=[], description="The 'ensemble' partition: models whose probabilities it averages (empty: every trained model).",
    )

    def settings(self) -> TrainingSettings:
        return TrainingSettings.from_json(self.model_dump(exclude={*MODEL_OVERRIDES, "resume", "ensemble_members"}))

    def spec(self, name: str) -> ModelSpec:
        """The partition's zoo entry with this run's overrides (an unknown head or size is refused there)."""
        return model_spec(name, **{field: getattr(self, field) for field in MODEL_OVERRIDES})


@dg.asset(
    code_version=with_config("7", TrainingConfig),
    automation_condition=automation.per_model(),
    group_name="training",
    kinds={"keras", "tensorflow", "jax"},
    partitions_def=model_partitions,
    pool="gpu",  # one training at a time on the machine's accelerator (docs/automation.md: the gpu pool)
    op_tags={"dagster-k8s/config": TRAINING_STEP_K8S_CONFIG},  # its step pod gets a GPU node (docs/operations.md: Kubernetes)
    description="One model of the zoo per partition, trained in phases by the Pipes training worker; "
    "saved as .keras with its history.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    balanced_train_set: ImageSet,
    augmented_train_set: ShardSet,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    noise_templates: np.ndarray,
    storage: PipelineStorage,
    training_worker: TrainingWorker,
) -> dg.Output[ModelFolder]:
    name, worker = context.partition_key, training_worker
    if name == ENSEMBLE:
        return _ensemble(context, config, clean_images, data_splits, storage)
    try:
        spec, settings = config.spec(name), config.settings()
    except (ValueError, KeyError, WeightsUnavailableError) as error:
        raise dg.Failure(description=str(error)) from None
    images, val_rows = _validation(context, clean_images, split_rows(data_splits, "val"), settings)
    inputs = TrainingInputs(train=balanced_train_set, shards=augmented_train_set, images=images, val_rows=val_rows,
                            templates=noise_templates, class_weight=class_weight_of(balanced_train_set))  # fmt: skip
    job = prepare_job(_folders(storage, name, config.resume), model=spec, settings=settings, inputs=inputs,
                      placement=Placement(worker.keras_backend, worker.device, worker.input_workers))  # fmt: skip
    context.log.info(f"launching the {worker.keras_backend} training worker ({worker.launcher}) on {job.spec_path}")
    epochs = _launch(context, worker, job, storage)
    record, history = job.result()
    metadata = {**record_metadata(record, history), "epochs_streamed": epochs, "history": md.table(history.round(4))}
    return versioned(ModelFolder(job.output_dir), digest=record.weights_fingerprint, metadata=metadata)


def _validation(
    context: dg.AssetExecutionContext, images: ImageSet, rows: np.ndarray, settings: TrainingSettings
) -> tuple[ImageSet, np.ndarray]:
    """What the worker validates on: the validation split of ``images``, or with ``selection: lab_shifts`` a set
    of its own holding those cells and their lab-shifted copies (evaluation.lab_shift.with_shifted_copies)."""
    if settings.selection == "clean":
        return images, rows
    labels = images.manifest["label"].to_numpy()[rows]
    shifted, shifted_labels = with_shifted_copies(images.images[rows], labels, seed=settings.seed)
    context.log.info(f"selection lab_shifts: validating on {len(rows)} cells and {len(shifted) - len(rows)} lab-shifted "
                     "copies of them (stain, white balance, framing, optics, all four; severities 1-5)")  # fmt: skip
    validation = ImageSet(shifted, pd.DataFrame({"label": shifted_labels}), class_names=images.class_names)
    return validation, np.arange(len(shifted))


def _folders(storage: PipelineStorage, name: str, resume: bool) -> JobFolders:
    cache = storage.cache_dir()
    return JobFolders(job_dir=cache / "training" / name, output_dir=storage.staging_dir(f"trained_model/{name}"),
                      data_root=storage.root, checkpoint_dir=cache / "checkpoints" / "trained_model" / name if resume else None)  # fmt: skip


def _launch(context: dg.AssetExecutionContext, worker: TrainingWorker, job: TrainingJob, storage: PipelineStorage) -> int:
    """Run the worker, its events recorded in the run's log as they arrive; how many epochs it reported."""
    epochs = 0

    def relay(message: object) -> None:
        nonlocal epochs
        event = WorkerEvent.from_message(message)
        if event is not None:
            record_worker_event(context, event)
            epochs += event.kind == "epoch"

    try:
        worker.run(context, job.spec_path, storage.root, on_message=relay)
    except dg.Failure:
        raise
    except Exception as error:  # noqa: BLE001 - any launcher's error: explained, with what to do next
        raise dg.Failure(description=job.explain_failure(error, worker.launcher)) from None
    return epochs


def _ensemble(
    context: dg.AssetExecutionContext, config: TrainingConfig, images: ImageSet, splits: pd.DataFrame, storage: PipelineStorage
) -> dg.Output[ModelFolder]:
    """The 'ensemble' partition: the stored member models averaged (training.ensemble), no training.

    The members are read from their stored partitions: retrain a member, then rematerialize this
    partition to refresh it.
    """
    from bc_pipeline.training.ensemble import EnsembleError, assemble_ensemble

    val_x, val_y = split_arrays(images, splits, "val")
    try:
        trained = assemble_ensemble(storage.root / "assets" / "trained_model", config.ensemble_members, val_x, val_y)
    except EnsembleError as error:
        raise dg.Failure(description=str(error)) from None
    folder = write_model_folder(storage.staging_dir(f"trained_model/{ENSEMBLE}"), trained)
    record = trained.record
    context.log.info(f"ensemble of {', '.join(record.ensemble.members)}: temperature {record.temperature:.3f}")
    metadata = {"members": ", ".join(record.ensemble.members), "parameters": record.parameters, "temperature": record.temperature}
    return versioned(ModelFolder(folder), digest=record.weights_fingerprint, metadata=metadata)
