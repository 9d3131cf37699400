"""Stage 4: train each model of the zoo (one partition per model) in the Pipes training worker (bc_pipeline.training.worker)."""

import dataclasses

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline.core.artifacts import ImageSet, ModelFolder, ShardSet, read_model_folder, training_metadata
from bc_pipeline.dagster_utils import automation
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.launch import TRAINING_STEP_K8S_CONFIG, describe_failure
from bc_pipeline.dagster_utils.partitions import model_partitions
from bc_pipeline.dagster_utils.versions import config_from_dataclass, overrides_of, to_dataclass, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage, TrainingWorker
from bc_pipeline.models.zoo import ENSEMBLE, ModelSpec, WeightsUnavailableError, model_spec
from bc_pipeline.preparation.balancing import class_weight_of
from bc_pipeline.preparation.splits import split_arrays, split_rows
from bc_pipeline.training.job import Placement, TrainingInputs, prepare_job
from bc_pipeline.training.settings import Phase, TrainingSettings
from bc_pipeline.training.spec import FAILURE_FILE
from bc_pipeline.training.worker.report import EPOCH

# Fields of a zoo entry (models.zoo.ModelSpec) a run may override for every model it trains.
MODEL_OVERRIDES = ("image_size", "weights", "head", "dropout", "frozen_layers")

PhaseConfig = config_from_dataclass(Phase, name="PhaseConfig")


class _TrainingRun(overrides_of(ModelSpec, MODEL_OVERRIDES, name="ModelOverrides")):  # type: ignore[misc]
    """What a run adds to the training settings: model overrides, resuming, the ensemble's members."""

    resume: bool = Field(default=True, description="Checkpoint every epoch and resume an interrupted training.")
    ensemble_members: list[str] = Field(
        default=[], description="The 'ensemble' partition: models whose probabilities it averages (empty: every trained model).",
    )

    def settings(self) -> TrainingSettings:
        return to_dataclass(self, TrainingSettings, phases=Phase)

    def spec(self, name: str) -> ModelSpec:
        return model_spec(name, **{field: getattr(self, field) for field in MODEL_OVERRIDES})


TrainingConfig = config_from_dataclass(
    TrainingSettings, name="TrainingConfig", base=_TrainingRun, nested={"phases": PhaseConfig},
    doc="Training settings for every model partition of the run (training.settings.TrainingSettings, the one "
    "schema), plus overrides of the partition's zoo entry (models.zoo.REGISTRY) for this run.",
)  # fmt: skip


def _inputs(balanced: ImageSet, shards: ShardSet, images: ImageSet, splits: pd.DataFrame, templates: np.ndarray) -> TrainingInputs:
    return TrainingInputs(
        train=balanced, shards=shards, images=images, val_rows=split_rows(splits, "val"), templates=templates,
        num_classes=len(balanced.class_names), class_weight=class_weight_of(balanced.tables["class_counts"]),
    )  # fmt: skip


@dg.asset(
    code_version=with_config("6", TrainingConfig),
    automation_condition=automation.per_model(),
    group_name="training",
    kinds={"keras", "tensorflow", "jax"},
    partitions_def=model_partitions,
    pool="gpu",  # one training at a time on the machine's accelerator (see README: GPU pool)
    op_tags={"dagster-k8s/config": TRAINING_STEP_K8S_CONFIG},  # its step pod gets a GPU node (README: Kubernetes)
    description="One model of the zoo per partition, trained in phases by the Pipes training worker; "
    "saved as .keras with its history.",
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,  # type: ignore[valid-type]
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
        spec = config.spec(name)
    except (ValueError, KeyError, WeightsUnavailableError) as error:
        raise dg.Failure(description=str(error)) from None
    job = prepare_job(
        storage.cache_dir() / "training" / name, storage.staging_dir(f"trained_model/{name}"), data_root=storage.root,
        model=spec, settings=config.settings(), inputs=_inputs(balanced_train_set, augmented_train_set, clean_images, data_splits, noise_templates),
        placement=Placement(worker.keras_backend, worker.device, worker.input_workers),
        checkpoint_dir=storage.cache_dir() / "checkpoints" / "trained_model" / name if config.resume else None,
        info={"class_names": list(balanced_train_set.class_names), "settings": dataclasses.asdict(config.settings()),
              "augmentation_policies": sorted(set(augmented_train_set.manifest.get("policy", [])))},
    )  # fmt: skip
    context.log.info(f"launching the {worker.keras_backend} training worker ({worker.launcher}) on {job.spec_path}")
    try:
        messages = worker.run(context, job.spec_path, storage.root)
    except dg.Failure:
        raise
    except Exception as error:  # noqa: BLE001 - any launcher's error: explained, with what to do next
        raise dg.Failure(description=describe_failure(
            name, error, failure_file=job.output_dir / FAILURE_FILE, checkpoint_dir=job.checkpoint_dir, launcher=worker.launcher,
        )) from None  # fmt: skip
    info, history = read_model_folder(job.output_dir)
    streamed = sum(1 for m in messages if isinstance(m, dict) and m.get("kind") == EPOCH)
    metadata = {**training_metadata(spec, info, history), "epochs_streamed": streamed, "history": md.table(history.round(4))}
    return versioned(ModelFolder(job.output_dir), digest=info["weights_fingerprint"], metadata=metadata)


def _ensemble(
    context: dg.AssetExecutionContext, config: TrainingConfig, images: ImageSet, splits: pd.DataFrame, storage: PipelineStorage  # type: ignore[valid-type]
) -> dg.Output[ModelFolder]:
    """The 'ensemble' partition: the stored member models averaged (training.ensemble), no training.

    The members are read from their stored partitions: retrain a member, then rematerialize this
    partition to refresh it.
    """
    from bc_pipeline.training.ensemble import EnsembleError, assemble_ensemble
    from bc_pipeline.training.worker.run import write_model_folder

    val_x, val_y = split_arrays(images, splits, "val")
    try:
        result = assemble_ensemble(storage.root / "assets" / "trained_model", config.ensemble_members, val_x, val_y)
    except EnsembleError as error:
        raise dg.Failure(description=str(error)) from None
    folder = write_model_folder(storage.staging_dir(f"trained_model/{ENSEMBLE}"), result)
    info = result.info
    context.log.info(f"ensemble of {', '.join(info['members'])}: temperature {info['temperature']:.3f}")
    metadata = {"members": ", ".join(info["members"]), "parameters": info["parameters"], "temperature": info["temperature"]}
    return versioned(ModelFolder(folder), digest=info["weights_fingerprint"], metadata=metadata)
