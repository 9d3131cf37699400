"""Stage 4: train each model of the zoo (one partition per model) in the Pipes training worker (bc_pipeline.worker)."""

import dataclasses
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline import automation
from bc_pipeline.assets import _metadata as md
from bc_pipeline.assets._versions import with_config
from bc_pipeline.lib.artifacts import ImageSet, ModelFolder, ShardSet, read_model_folder, training_metadata
from bc_pipeline.lib.launch import describe_failure
from bc_pipeline.lib.training_job import prepare_job
from bc_pipeline.lib.zoo import ENSEMBLE, ModelSpec, WeightsUnavailableError, model_spec
from bc_pipeline.partitions import model_partitions
from bc_pipeline.resources import ImageSource, PipelineStorage, TrainingWorker
from bc_pipeline.worker.report import EPOCH
from bc_pipeline.worker.spec import FAILURE_FILE
from bc_pipeline.worker.training import Phase, TrainingSettings

_DEFAULTS = TrainingSettings()


class PhaseConfig(dg.Config):
    """One phase of the schedule (see worker.training.Phase)."""

    trainable: str = Field(default="all", description="frozen | last:N | last:N% | all (backbone layers that train).")
    learning_rate: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=5, ge=1)
    patience: int = Field(default=4, ge=1, description="Early-stopping patience within the phase.")
    restore_best: bool = Field(default=True, description="End on the phase's best validation loss (off: the last epoch).")


class TrainingConfig(dg.Config):
    """Training settings for every model partition of the run.

    The model itself (backbone, input size, head, weights) comes from the registry entry of the
    partition (lib.zoo.REGISTRY); the fields marked "override" replace the registry's value for
    this run. The defaults fit a 2-core CPU training from scratch.
    """

    image_size: int | None = Field(default=None, ge=32, description="Override: side the model resizes images to.")
    weights: str | None = Field(default=None, description="Override: none | imagenet | path to a no-top weights file.")
    head: str | None = Field(default=None, description="Override: classifier head, gap_dense or inception.")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="Override: head dropout.")
    frozen_layers: int | None = Field(default=None, ge=0, description="Override: backbone layers frozen in every phase.")
    epochs: int = Field(default=_DEFAULTS.epochs, ge=1, description="Epochs of the default schedule.")
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1)
    learning_rate: float = Field(default=_DEFAULTS.learning_rate, gt=0, description="Rate of the default schedule.")
    patience: int = Field(default=_DEFAULTS.patience, ge=1, description="Early-stopping patience (epochs).")
    phases: list[PhaseConfig] = Field(
        default=[], description="Explicit schedule; empty: one phase from scratch, frozen/last 30%/all when pretrained."
    )
    lr_schedule: Literal["plateau", "constant", "exponential", "cyclical", "cosine"] = _DEFAULTS.lr_schedule  # type: ignore[assignment]
    lr_decay: float = Field(default=_DEFAULTS.lr_decay, gt=0, le=1, description="Per-epoch factor (exponential).")
    cycle_epochs: int = Field(default=_DEFAULTS.cycle_epochs, ge=1, description="Epochs per cycle (cyclical).")
    cycle_min_factor: float = Field(default=_DEFAULTS.cycle_min_factor, gt=0, le=1)
    optimizer: Literal["adam", "adamw", "lion"] = _DEFAULTS.optimizer  # type: ignore[assignment]
    weight_decay: float = Field(default=_DEFAULTS.weight_decay, ge=0, description="AdamW and Lion only.")
    loss: Literal["categorical_crossentropy", "focal"] = _DEFAULTS.loss  # type: ignore[assignment]
    focal_gamma: float = Field(default=_DEFAULTS.focal_gamma, ge=0)
    focal_alpha: float = Field(default=_DEFAULTS.focal_alpha, gt=0)
    label_smoothing: float = Field(default=_DEFAULTS.label_smoothing, ge=0, lt=1)
    augment: bool = Field(default=_DEFAULTS.augment, description="Random flips and 90-degree turns.")
    seed: int = _DEFAULTS.seed
    batch_augment: Literal["none", "mixup", "cutmix", "mixup+cutmix"] = Field(
        default=_DEFAULTS.batch_augment, description="MixUp / CutMix in the input pipeline (labels mixed too)."
    )
    batch_augment_probability: float = Field(default=_DEFAULTS.batch_augment_probability, ge=0, le=1)
    include_original: bool = Field(
        default=_DEFAULTS.include_original,
        description="Draw from the balanced set itself as well as from its stored augmented copies.",
    )
    template_augmentation: bool = Field(
        default=_DEFAULTS.template_augmentation,
        description="Superimpose a recovered noise template on training images with a random weight.",
    )
    template_probability: float = Field(default=_DEFAULTS.template_probability, ge=0, le=1)
    template_max_weight: float = Field(default=_DEFAULTS.template_max_weight, ge=0, lt=1)
    mixed_precision: Literal["auto", "on", "off"] = Field(
        default=_DEFAULTS.mixed_precision, description="auto: bfloat16 (float16 before Ampere) on a GPU only."
    )
    jit_compile: Literal["auto", "on", "off"] = Field(
        default=_DEFAULTS.jit_compile, description="auto: XLA on JAX (GPU and CPU); off on TensorFlow and PyTorch."
    )
    consistency_loss: Literal["none", "jsd"] = Field(
        default=_DEFAULTS.consistency_loss,  # type: ignore[arg-type]
        description="jsd: AugMix's Jensen-Shannon consistency between each image and two of its stored copies "
        "(needs copies >= 2; 3x the compute per step).",
    )
    consistency_weight: float = Field(default=_DEFAULTS.consistency_weight, ge=0, description="The JS term's weight (AugMix: 12).")
    cv_folds: int = Field(
        default=_DEFAULTS.cv_folds, ge=0, le=20,
        description="k >= 2: k-fold cross-validation on the training set chooses each phase's epoch count (0: early stopping).",
    )  # fmt: skip
    retrain_on_validation: bool = Field(
        default=_DEFAULTS.retrain_on_validation,
        description="Train the final model on train + validation for the chosen epoch count (the test split stays untouched).",
    )
    resume: bool = Field(default=True, description="Checkpoint every epoch and resume an interrupted training.")
    ensemble_members: list[str] = Field(
        default=[], description="The 'ensemble' partition: models whose probabilities it averages (empty: every trained model).",
    )

    def settings(self) -> TrainingSettings:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainingSettings) if f.name != "phases"}
        return TrainingSettings(**values, phases=tuple(Phase(**p.model_dump()) for p in self.phases))

    def spec(self, name: str) -> ModelSpec:
        overrides = ("image_size", "weights", "head", "dropout", "frozen_layers")
        return model_spec(name, **{field: getattr(self, field) for field in overrides})


def split_arrays(images: ImageSet, splits: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, in split-table order."""
    rows = splits.loc[splits["split"] == split, "index"].to_numpy()
    return np.asarray(images.images[rows]), images.manifest["label"].to_numpy(np.int64)[rows]


def class_weight_of(balanced: ImageSet) -> dict[int, float] | None:
    """The loss weights the balancing stage chose (None: unweighted)."""
    counts = balanced.tables["class_counts"]
    weights = dict(zip(counts["label"].astype(int), counts["weight"].astype(float)))
    return None if all(w == 1.0 for w in weights.values()) else {c: w for c, w in weights.items() if w > 0}


def split_rows(splits: pd.DataFrame, split: str) -> np.ndarray:
    """Rows of the image set in one split, in split-table order."""
    return splits.loc[splits["split"] == split, "index"].to_numpy(np.int64)


@dg.asset(
    code_version=with_config("6", TrainingConfig),
    automation_condition=automation.per_model(),
    group_name="training",
    kinds={"keras", "tensorflow", "jax"},
    partitions_def=model_partitions,
    pool="gpu",  # one training at a time on the machine's accelerator (see README: GPU pool)
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
    image_source: ImageSource,
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
        model=spec, settings=config.settings(), num_classes=len(image_source.class_names), train=balanced_train_set,
        shards=augmented_train_set, images=clean_images, val_rows=split_rows(data_splits, "val"),
        templates=noise_templates, class_weight=class_weight_of(balanced_train_set),
        checkpoint_dir=storage.cache_dir() / "checkpoints" / "trained_model" / name if config.resume else None,
        backend=worker.keras_backend, device=worker.device, input_workers=worker.input_workers,
        info={"class_names": list(image_source.class_names), "settings": dataclasses.asdict(config.settings()),
              "augmentation_policies": sorted(set(augmented_train_set.manifest.get("policy", [])))},
    )  # fmt: skip
    context.log.info(f"launching the {worker.keras_backend} training worker ({worker.launcher}) on {job.spec_path}")
    try:
        messages = worker.run(context, job.spec_path, storage.root)
    except dg.Failure:
        raise
    except Exception as error:  # noqa: BLE001 - any launcher's error: explained, with what to do next
        raise dg.Failure(description=describe_failure(
            name, error, failure_file=job.output_dir / FAILURE_FILE, checkpoint_dir=job.checkpoint_dir,
            launcher=worker.launcher,
        )) from None  # fmt: skip
    info, history = read_model_folder(job.output_dir)
    streamed = sum(1 for m in messages if isinstance(m, dict) and m.get("kind") == EPOCH)
    metadata = {**training_metadata(spec, info, history), "epochs_streamed": streamed, "history": md.table(history.round(4))}
    return dg.Output(ModelFolder(job.output_dir), data_version=dg.DataVersion(info["weights_fingerprint"]), metadata=metadata)


def _ensemble(
    context: dg.AssetExecutionContext, config: TrainingConfig, images: ImageSet, splits: pd.DataFrame, storage: PipelineStorage
) -> dg.Output[ModelFolder]:
    """The 'ensemble' partition: the stored member models averaged (lib.ensemble), no training.

    The members are read from their stored partitions: retrain a member, then rematerialize this
    partition to refresh it.
    """
    from bc_pipeline.lib.ensemble import EnsembleError, assemble_ensemble
    from bc_pipeline.worker.run import write_model_folder

    val_x, val_y = split_arrays(images, splits, "val")
    try:
        result = assemble_ensemble(storage.root / "assets" / "trained_model", config.ensemble_members, val_x, val_y)
    except EnsembleError as error:
        raise dg.Failure(description=str(error)) from None
    folder = write_model_folder(storage.staging_dir(f"trained_model/{ENSEMBLE}"), result)
    info = result.info
    context.log.info(f"ensemble of {', '.join(info['members'])}: temperature {info['temperature']:.3f}")
    metadata = {"members": ", ".join(info["members"]), "parameters": info["parameters"], "temperature": info["temperature"]}
    return dg.Output(ModelFolder(folder), data_version=dg.DataVersion(info["weights_fingerprint"]), metadata=metadata)
