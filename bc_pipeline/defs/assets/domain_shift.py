"""Stage 5b: lab shift. Does a model survive another laboratory's stain, camera and crop?

- ``domain_shift_set``: the test split under lab-like shifts that training never uses (evaluation.lab_shift).
- ``external_sets``: other labs' labelled cells from the folders ``BC_EXTERNAL_SETS`` names (evaluation.external).
- ``domain_shift_report`` (per model): both scored, with confusion matrices and Grad-CAM (evaluation.domain_shift).
- ``lab_adaptation`` (per model): the model fine-tuned on a few labelled cells of one external set, and the
  accuracy curve over cells per class (training.adaptation). A separate asset, not a setting of
  ``trained_model``: a new lab folder reruns the adaptation, not the training.
"""

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet, ModelFolder
from bc_pipeline.core.plots import adaptation_figure, image_rows
from bc_pipeline.core.storage import save_via_temp
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.partitions import model_partitions
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import ExternalFolders, PipelineStorage
from bc_pipeline.evaluation.domain_shift import evaluate_domain_shift, write_domain_shift
from bc_pipeline.evaluation.external import adaptation_curve, load_external_sets
from bc_pipeline.evaluation.framing import apply_framing
from bc_pipeline.evaluation.imagenet_c import subsample
from bc_pipeline.evaluation.lab_shift import ShiftSettings, build_shift_set
from bc_pipeline.models.inference import predict_proba
from bc_pipeline.preparation.splits import split_arrays, split_rows
from bc_pipeline.training.adaptation import AdaptationSettings, adapt, few_shot_split
from bc_pipeline.training.model_folder import load_trained_model


class ShiftConfig(SettingsConfig):
    """Which lab-like shifts and severities, on how many test images (evaluation.lab_shift.ShiftSettings)."""

    settings_class = ShiftSettings
    shifts: list[str] = setting(ShiftSettings, "shifts")
    severities: list[int] = setting(ShiftSettings, "severities")
    max_images: int = setting(ShiftSettings, "max_images")
    seed: int = setting(ShiftSettings, "seed")


@dg.asset(
    code_version=with_config("1", ShiftConfig),
    group_name="evaluation",
    kinds={"numpy"},
    description="The test split under lab-like shifts (stain, white balance, framing, optics, all four) that training never uses.",
)
def domain_shift_set(
    context: dg.AssetExecutionContext, config: ShiftConfig, clean_images: ImageSet, data_splits: pd.DataFrame, storage: PipelineStorage
) -> dg.Output[ImageSet]:
    settings: ShiftSettings = config.settings()
    images, labels = split_arrays(clean_images, data_splits, "test")
    chosen = subsample(labels, settings.max_images, seed=settings.seed)
    context.log.info(f"{len(chosen)} of {len(labels)} test images x {len(settings.shifts)} shifts x {len(settings.severities)} severities")
    shifted, manifest = build_shift_set(
        images[chosen], labels[chosen], split_rows(data_splits, "test")[chosen], settings,
        progress=lambda shift, severity, n: context.log.info(f"{shift} severity {severity}: {n} images"),
    )  # fmt: skip
    value = ImageSet(images=shifted, manifest=manifest)
    metadata = {"images": len(shifted), "test_images": len(chosen), "shifts": ", ".join(settings.shifts)}
    if len(chosen):
        first = manifest.index[manifest["clean_index"] == manifest["clean_index"].iloc[0]].to_numpy()
        rows = [("clean", np.repeat(images[chosen][:1], len(settings.severities), axis=0))]
        rows += [(shift, shifted[first[manifest.loc[first, "shift"].to_numpy() == shift]]) for shift in settings.shifts]
        png = image_rows(rows, columns=len(settings.severities), title="One test image under each lab shift, severities "
                         + ", ".join(map(str, settings.severities)))  # fmt: skip
        metadata.update(md.image(png, storage.report_dir("domain_shift_set") / "samples.png", "samples"))
    return versioned(value, shifted, manifest, metadata=metadata)


@dg.asset(
    code_version="1",
    group_name="evaluation",
    kinds={"numpy"},
    description="Other labs' labelled cells (BC_EXTERNAL_SETS: name=folder;...), resized like the raw images; empty when none.",
)
def external_sets(context: dg.AssetExecutionContext, clean_images: ImageSet, external_folders: ExternalFolders) -> dg.Output[ImageSet]:
    folders = external_folders.folders()
    size = int(clean_images.images.shape[1])
    loaded = load_external_sets(folders, class_names=clean_images.class_names, image_size=size)
    for (name, group), folder in zip(loaded.manifest.groupby("set", sort=False), folders.values()):
        counts = group["class_name"].value_counts().to_dict()
        context.log.info(f"{name} ({folder}): {len(group)} images at {size}px, {counts}")
    for row in loaded.skipped.itertuples():
        context.log.warning(f"{row.set}: skipped {row.source}: {row.reason}")
    if not folders:
        context.log.info("no external sets (set BC_EXTERNAL_SETS=name=folder;other=folder to score models on another lab's cells)")
    value = ImageSet(images=loaded.images, manifest=loaded.manifest, tables={"skipped": loaded.skipped}, class_names=clean_images.class_names)
    counts = loaded.manifest.groupby(["set", "class_name"]).size().unstack(fill_value=0).reset_index()
    metadata = {"images": len(loaded.images), "sets": ", ".join(folders) or "none", "skipped": len(loaded.skipped),
                "per_class": md.table(counts)}  # fmt: skip
    return versioned(value, loaded.images, loaded.manifest, metadata=metadata)


@dg.asset(
    code_version="3",  # 2: each external set scored at its framing too (evaluation.framing); 3: shifts a model was selected on marked seen
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    partitions_def=model_partitions,
    description="Per model: accuracy under the lab-like shifts and, per external set, accuracy, balanced accuracy, "
    "confusions and Grad-CAM on misclassified cells, as given and at the framing calibrated from the set's own images.",
)
def domain_shift_report(
    context: dg.AssetExecutionContext,
    trained_model: ModelFolder,
    domain_shift_set: ImageSet,
    external_sets: ImageSet,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    name = context.partition_key
    result = evaluate_domain_shift(load_trained_model(trained_model), name=name, shift_set=domain_shift_set,
                                   external=external_sets, log=context.log.info)  # fmt: skip
    paths = write_domain_shift(result, storage.report_dir(f"domain_shift_report/{name}"))
    metadata = {**result.headline(), "shifts": md.table(result.shifts.round(4), max_rows=100), "external": md.table(result.external.round(4))}
    for png_name in result.pngs:
        metadata[f"{png_name}_path"] = dg.MetadataValue.path(str(paths[png_name]))
    if "shift_heatmap" in result.pngs:
        metadata.update(md.image(result.pngs["shift_heatmap"], paths["shift_heatmap"], "shift_heatmap"))
    metadata["report_path"] = dg.MetadataValue.path(str(paths["report"]))
    return versioned(result.summary, metadata=metadata)


class LabAdaptationConfig(SettingsConfig):
    """Which external set is the user's lab, and how the model adapts to it (training.adaptation.AdaptationSettings)."""

    settings_class = AdaptationSettings
    lab: str = setting(AdaptationSettings, "lab")
    per_class: int = setting(AdaptationSettings, "per_class")
    curve: list[int] = setting(AdaptationSettings, "curve")
    epochs: int = setting(AdaptationSettings, "epochs")
    learning_rate: float = setting(AdaptationSettings, "learning_rate")
    batch_size: int = setting(AdaptationSettings, "batch_size")
    copies: list[str] = setting(AdaptationSettings, "copies")
    label_smoothing: float = setting(AdaptationSettings, "label_smoothing")
    seed: int = setting(AdaptationSettings, "seed")
    framing: str = setting(AdaptationSettings, "framing")


@dg.asset(
    code_version=with_config("2", LabAdaptationConfig),  # 2: the lab's framing calibrated first
    group_name="evaluation",
    kinds={"keras", "parquet"},
    partitions_def=model_partitions,
    description="Per model: fine-tuned on `per_class` labelled cells of one external set (`lab`), and its accuracy on "
    "that lab's other cells against cells labelled per class. Skipped while no lab is named.",
)
def lab_adaptation(
    context: dg.AssetExecutionContext, config: LabAdaptationConfig, trained_model: ModelFolder, external_sets: ImageSet, storage: PipelineStorage
) -> dg.Output[dict]:
    settings: AdaptationSettings = config.settings()
    if not settings.lab:
        context.log.info("no lab to adapt to: name an external set (BC_EXTERNAL_SETS) in this asset's `lab` setting")
        return versioned({"lab": None}, metadata={"lab": "none (set `lab` to an external set's name)"})
    sets = sorted(set(external_sets.manifest["set"]))
    rows = (external_sets.manifest["set"] == settings.lab).to_numpy()
    if not rows.any():
        raise dg.Failure(description=f"lab {settings.lab!r} is not an external set; external sets: {', '.join(sets) or 'none (set BC_EXTERNAL_SETS)'}")
    images, labels = external_sets.images[rows], external_sets.manifest["label"].to_numpy()[rows]
    class_names, trained = list(external_sets.class_names), load_trained_model(trained_model).model
    images, zoom, why = apply_framing(lambda batch: predict_proba(trained, batch), images, settings.framing)
    context.log.info(f"{settings.lab}: framing {zoom:g}x ({why}); classify its cells with `bc-predict <model> <folder> --framing {zoom:g}`")
    curve = adaptation_curve(lambda: load_trained_model(trained_model).model, images, labels, class_names,
                             shots=settings.curve, settings=settings, log=context.log.info)  # fmt: skip
    labelled, _ = few_shot_split(labels, settings.per_class, seed=settings.seed)
    model = adapt(trained, images[labelled], labels[labelled], settings)
    folder = storage.report_dir(f"lab_adaptation/{context.partition_key}")
    save_via_temp(folder / f"{settings.lab}.keras", model.save)
    png = adaptation_figure(curve, title=f"{context.partition_key} adapted to {settings.lab}")
    summary = {"lab": settings.lab, "per_class": settings.per_class, "labelled": len(labelled), "curve": curve.to_dict("records"),
               "zoom": zoom, "model_file": str(folder / f"{settings.lab}.keras")}  # fmt: skip
    metadata = {"lab": settings.lab, "labelled": len(labelled), "zoom": zoom, "curve": md.table(curve.round(4)),
                "model_file": dg.MetadataValue.path(summary["model_file"]), **md.image(png, folder / f"{settings.lab}_curve.png", "curve")}  # fmt: skip
    return versioned(summary, summary["curve"], labelled, metadata=metadata)
