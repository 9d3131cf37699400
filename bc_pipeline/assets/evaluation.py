"""Stage 5: score each trained model, compare them, and package the best one.

- ``evaluation_report`` (per model): clean and robust accuracy with and without test-time
  augmentation, P/R/F1, confusion matrix, training curves and Grad-CAM examples.
- ``model_leaderboard``: every evaluated model in one table, and accuracy against cost.
- ``submission_package``: the chosen model as the course platform took it (``model.py``).
"""

import time

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from bc_pipeline import automation
from bc_pipeline.assets import _metadata as md
from bc_pipeline.assets._versions import with_config
from bc_pipeline.assets.training import split_arrays
from bc_pipeline.io_managers import ALL_PARTITIONS
from bc_pipeline.lib.artifacts import ImageSet, PartitionedArtifacts
from bc_pipeline.lib.calibration import reliability, scale_probabilities, stored_or_fitted
from bc_pipeline.lib.corruptions import seen_in_training
from bc_pipeline.lib.evaluation import calibration_section, corruption_section, report_markdown, score_corruptions, score_predictor
from bc_pipeline.lib.leaderboard import RANK_COLUMNS, leaderboard_figure, leaderboard_markdown, leaderboard_table
from bc_pipeline.lib.plots import (
    confusion_matrix_figure,
    corruption_heatmap,
    gradcam_grid,
    reliability_figure,
    training_curves_figure,
)
from bc_pipeline.lib.storage import fingerprint, save_bytes, save_json, save_parquet
from bc_pipeline.partitions import model_partitions
from bc_pipeline.resources import PipelineStorage
from bc_pipeline.worker.training import TrainedModel, predict_proba


class EvaluationConfig(dg.Config):
    robust_policy: str = Field(default="strong", description="Perturbation whose test accuracy is 'robust accuracy'.")
    tta: bool = Field(default=True, description="Also score with test-time augmentation (flips, small rotations).")
    tta_views: list[str] = Field(
        default=["identity", "flip_lr", "flip_ud", "rotate+10", "rotate-10"],
        description="Views averaged by TTA: identity, flip_lr, flip_ud, rot90, rot180, rot270, transpose, antitranspose (exact) or rotate+D / rotate-D.",
    )
    tta_all_policies: bool = Field(default=False, description="TTA on every policy's perturbed copies, not just robust_policy.")
    gradcam_per_class: int = Field(default=1, ge=0, le=4, description="Correct and wrong Grad-CAM examples per class.")


@dg.asset(
    code_version=with_config("4", EvaluationConfig),
    automation_condition=automation.on_change(),  # waits for its model: a missing input blocks it
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    partitions_def=model_partitions,
    description="Per model: clean accuracy, the corruption benchmark (mCA), calibration, the training-family presets, "
    "TTA, P/R/F1, confusion, Grad-CAM.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    trained_model: TrainedModel,
    robustness_eval_sets: ImageSet,
    corruption_benchmark_set: ImageSet,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    from bc_pipeline.lib.interpret import grad_cam, gradcam_examples, predict_tta

    name, model = context.partition_key, trained_model.model
    class_names = trained_model.info["class_names"]
    test_x, test_y = split_arrays(clean_images, data_splits, "test")
    val_x, val_y = split_arrays(clean_images, data_splits, "val")
    start = time.perf_counter()
    test_proba = predict_proba(model, test_x)
    images_per_second = len(test_x) / max(time.perf_counter() - start, 1e-9)
    context.log.info(f"{name}: {len(test_y)} test images at {images_per_second:.0f} images/s")
    val_proba = predict_proba(model, val_x)
    info = trained_model.info
    trained_presets = list(info.get("augmentation_policies", []))
    corruption = score_corruptions(
        lambda x: predict_proba(model, x), corruption_benchmark_set.images, corruption_benchmark_set.manifest,
        seen=seen_in_training(trained_presets),
    )  # fmt: skip
    context.log.info(f"corruption benchmark: mCA {corruption.mean_accuracy}, unseen families {corruption.mean_accuracy_unseen}")
    calibration = stored_or_fitted(info, val_proba, val_y, test_proba, test_y)
    temperature = float(calibration["temperature"])

    perturbed = robustness_eval_sets.manifest
    common = {"test": (test_x, test_y), "val": (val_x, val_y), "class_names": class_names, "robust_policy": config.robust_policy}
    runs = {
        "plain": score_predictor(
            lambda x: test_proba if x is test_x else val_proba if x is val_x else predict_proba(model, x),
            perturbed_images=robustness_eval_sets.images, perturbed=perturbed, **common,
        )
    }
    if config.tta:
        # TTA multiplies the prediction cost by the number of views: by default only the
        # headline policy's perturbed copies get it (tta_all_policies: every policy's).
        rows = np.flatnonzero(config.tta_all_policies | (perturbed["policy"] == config.robust_policy).to_numpy())
        context.log.info(f"test-time augmentation over {len(config.tta_views)} views ({len(rows)} perturbed images)")
        runs["tta"] = score_predictor(
            lambda x: predict_tta(model, x, views=tuple(config.tta_views)),
            perturbed_images=robustness_eval_sets.images[rows], perturbed=perturbed.iloc[rows], **common,
        )
    for kind, run in runs.items():
        context.log.info(f"{kind}: accuracy {run.evaluation.accuracy:.4f}, robust ({config.robust_policy}) {run.robust_accuracy}")
    robustness = pd.concat([run.robustness.assign(tta=kind == "tta") for kind, run in runs.items()], ignore_index=True)
    test_pred = runs["plain"].test_predictions

    folder = storage.report_dir(f"evaluation_report/{name}")
    evaluation, robust_accuracy = runs["plain"].evaluation, runs["plain"].robust_accuracy
    tta_eval = runs["tta"].evaluation if "tta" in runs else None
    tta_robust = runs["tta"].robust_accuracy if "tta" in runs else None
    images = {"confusion matrix": "confusion_matrix.png", "training curves": "training_curves.png"}
    pngs = {
        "confusion_matrix": confusion_matrix_figure(evaluation.confusion, class_names),
        "training_curves": training_curves_figure(trained_model.history),
        "reliability": reliability_figure(
            reliability(test_proba, test_y), reliability(scale_probabilities(test_proba, temperature), test_y),
            temperature=temperature, title=f"{name}: reliability on the test split",
        ),
    }
    if len(corruption.table):
        pngs["corruption_heatmap"] = corruption_heatmap(corruption.table, title=f"{name}: accuracy under the ImageNet-C corruptions")
    if config.gradcam_per_class:
        picks = gradcam_examples(test_y, test_pred, len(class_names), per_class=config.gradcam_per_class)
        if len(picks):
            rows = picks["index"].to_numpy()
            heatmaps = grad_cam(model, test_x[rows], test_pred[rows])
            titles = [_gradcam_title(class_names, test_y[i], test_pred[i]) for i in rows]
            pngs["gradcam"] = gradcam_grid(test_x[rows], heatmaps, titles, title=f"{name}: Grad-CAM on test images")
            images["Grad-CAM, correct and wrong predictions per class"] = "gradcam.png"
    save_parquet(folder / "per_class.parquet", evaluation.per_class)
    save_parquet(folder / "robustness.parquet", robustness)
    save_parquet(folder / "corruptions.parquet", corruption.table)
    summary = {
        "model": name,
        "accuracy": evaluation.accuracy,
        "accuracy_tta": tta_eval.accuracy if tta_eval else None,
        "robust_accuracy": robust_accuracy,
        "robust_accuracy_tta": tta_robust,
        "robust_policy": config.robust_policy,
        "corruption_accuracy": corruption.mean_accuracy,
        "corruption_accuracy_unseen": corruption.mean_accuracy_unseen,
        "corruptions_seen_in_training": corruption.seen,
        "corruptions": corruption.table.to_dict("records"),
        "trained_presets": trained_presets,
        "calibration": calibration,
        "ece": calibration["ece"],
        "ece_scaled": calibration["ece_scaled"],
        "temperature": temperature,
        "weighted": evaluation.weighted,
        "weighted_tta": tta_eval.weighted if tta_eval else None,
        "test_images": int(len(test_y)),
        "inference_images_per_second": round(images_per_second, 1),
        "parameters": info.get("parameters"),
        "train_seconds": info.get("train_seconds"),
        "epochs_run": info.get("epochs_run"),
        "image_size": (info.get("spec") or {}).get("image_size"),
        "device": info.get("device"),
        "per_class": evaluation.per_class.to_dict("records"),
        "per_class_tta": tta_eval.per_class.to_dict("records") if tta_eval else None,
        "robustness": robustness.to_dict("records"),
        "confusion_matrix": evaluation.confusion.tolist(),
        "class_names": class_names,
        "training": {k: v for k, v in info.items() if k != "class_weight"},
    }
    save_json(folder / "metrics.json", summary)
    report = report_markdown(
        evaluation, title=f"bc_pipeline evaluation of {name} (test split)", images=images,
        robust_accuracy=robust_accuracy, robust_policy=config.robust_policy, robustness=robustness,
        tta=tta_eval, robust_accuracy_tta=tta_robust, trained_presets=trained_presets,
        extra_sections=[
            *corruption_section(corruption, clean_accuracy=evaluation.accuracy, heatmap="corruption_heatmap.png" if "corruption_heatmap" in pngs else None),
            *calibration_section(calibration, diagram="reliability.png"),
        ],
    )  # fmt: skip
    save_bytes(folder / "report.md", report.encode())
    metadata = {
        "accuracy": round(evaluation.accuracy, 4),
        "accuracy_tta": round(tta_eval.accuracy, 4) if tta_eval else None,
        "robust_accuracy": _round(robust_accuracy),
        "robust_accuracy_tta": _round(tta_robust),
        "corruption_accuracy": _round(corruption.mean_accuracy),
        "corruption_accuracy_unseen": _round(corruption.mean_accuracy_unseen),
        "corruptions": md.table(corruption.table.round(4), max_rows=100),
        "ece": round(calibration["ece"], 4),
        "ece_scaled": round(calibration["ece_scaled"], 4),
        "temperature": round(temperature, 4),
        "inference_images_per_second": round(images_per_second, 1),
        "robustness": md.table(robustness.round(4)),
        **{f"weighted_{k}": round(v, 4) for k, v in evaluation.weighted.items()},
        "test_images": len(test_y),
        "per_class": md.table(evaluation.per_class),
        **{key: value for png_name, png in pngs.items() for key, value in md.image(png, folder / f"{png_name}.png", png_name).items()},
        "report_path": dg.MetadataValue.path(str(folder / "report.md")),
    }
    return dg.Output(summary, data_version=dg.DataVersion(fingerprint(_without(summary, TIMINGS))), metadata=metadata)


# Measured speeds differ on every run; they stay in the outputs but not in their data versions, so
# re-scoring an unchanged model does not make the leaderboard and submission rerun.
TIMINGS = ("inference_images_per_second",)


def _without(value: dict, keys: tuple[str, ...]) -> dict:
    return {key: item for key, item in value.items() if key not in keys}


def _gradcam_title(class_names: list[str], truth: int, predicted: int) -> str:
    return f"{class_names[truth]} ok" if truth == predicted else f"{class_names[truth]} -> {class_names[predicted]}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class LeaderboardConfig(dg.Config):
    rank_by: str = Field(default="accuracy", description=f"Column to rank by: one of {', '.join(RANK_COLUMNS)}.")
    mce_baseline: str = Field(default="custom_cnn", description="Model the mean corruption error (mCE) is relative to.")


@dg.asset(
    code_version=with_config("2", LeaderboardConfig),
    automation_condition=automation.across_models(["evaluation_report"]),
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    ins={"evaluation_report": dg.AssetIn(metadata=ALL_PARTITIONS)},
    description="All evaluated models ranked: accuracy, robust accuracy, parameters, training time, images/s.",
)
def model_leaderboard(
    context: dg.AssetExecutionContext,
    config: LeaderboardConfig,
    evaluation_report: PartitionedArtifacts,
    storage: PipelineStorage,
) -> dg.Output[pd.DataFrame]:
    if not len(evaluation_report):
        raise dg.Failure(description="no model has been evaluated yet: materialize evaluation_report for a partition first")
    if config.rank_by not in RANK_COLUMNS:
        raise dg.Failure(description=f"rank_by must be one of {', '.join(RANK_COLUMNS)}, not {config.rank_by!r}")
    table = leaderboard_table(
        {name: evaluation_report[name] for name in evaluation_report}, rank_by=config.rank_by, mce_baseline=config.mce_baseline
    )
    folder = storage.report_dir("model_leaderboard")
    png = leaderboard_figure(table)
    save_parquet(folder / "leaderboard.parquet", table)
    save_bytes(folder / "leaderboard.md", leaderboard_markdown(
        table, rank_by=config.rank_by, missing=evaluation_report.missing, mce_baseline=config.mce_baseline
    ).encode())
    context.log.info(f"best by {config.rank_by}: {table.iloc[0]['model']} ({table.iloc[0][config.rank_by]:.4f})")
    metadata = {
        "models": len(table),
        "best_model": str(table.iloc[0]["model"]),
        "rank_by": config.rank_by,
        "not_evaluated": ", ".join(evaluation_report.missing) or "none",
        "leaderboard": md.table(table.round(4)),
        **md.image(png, folder / "leaderboard.png", "accuracy_vs_cost"),
        "report_path": dg.MetadataValue.path(str(folder / "leaderboard.md")),
    }
    return dg.Output(table, data_version=dg.DataVersion(fingerprint(table.drop(columns=list(TIMINGS)))), metadata=metadata)


class SubmissionConfig(dg.Config):
    model: str = Field(default="", description="Model partition to package; empty: the leaderboard's best.")


@dg.asset(
    code_version=with_config("2", SubmissionConfig),
    automation_condition=automation.across_models(["trained_model"], after_ranking=True),
    group_name="evaluation",
    kinds={"keras"},
    ins={"trained_model": dg.AssetIn(metadata=ALL_PARTITIONS)},
    description="The best model as a folder (and zip) with model.py: Model().predict(uint8 N x 96 x 96 x 3) -> classes.",
)
def submission_package(
    context: dg.AssetExecutionContext,
    config: SubmissionConfig,
    model_leaderboard: pd.DataFrame,
    trained_model: PartitionedArtifacts,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    from bc_pipeline.lib.submission import write_submission
    from bc_pipeline.worker.training import weights_fingerprint

    name = config.model or str(model_leaderboard.iloc[0]["model"])
    if name not in trained_model:
        raise dg.Failure(description=f"model {name!r} has no trained model stored; trained: {', '.join(trained_model) or 'none'}")
    chosen = trained_model[name]
    row = model_leaderboard.loc[model_leaderboard["model"] == name]
    scores = row.iloc[0].to_dict() if len(row) else {}
    folder = storage.root / "submission"
    info = {"model": name, "temperature": chosen.info.get("temperature", 1.0), **scores}
    write_submission(chosen.model, chosen.info["class_names"], folder, info=info)
    context.log.info(f"packaged {name} in {folder}")
    summary = {"model": name, "folder": str(folder), "accuracy": scores.get("accuracy"), "robust_accuracy": scores.get("robust_accuracy")}
    metadata = {
        "model": name,
        "folder": dg.MetadataValue.path(str(folder)),
        "zip": dg.MetadataValue.path(str(folder / "submission.zip")),
        "accuracy": _round(scores.get("accuracy")),
        "robust_accuracy": _round(scores.get("robust_accuracy")),
    }
    version = fingerprint(name, weights_fingerprint(chosen.model))
    return dg.Output(summary, data_version=dg.DataVersion(version), metadata=metadata)
