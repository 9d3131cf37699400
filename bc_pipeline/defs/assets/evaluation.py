"""Stage 5: score each trained model, compare them, and package the best one.

- ``evaluation_report`` (per model): clean and robust accuracy with and without test-time
  augmentation, P/R/F1, confusion matrix, training curves and Grad-CAM examples
  (``evaluation.evaluate`` computes them and writes the files; the asset wires and records).
- ``model_leaderboard``: every evaluated model in one table, and accuracy against cost.
- ``submission_package``: the chosen model as the course platform took it (``model.py``).
"""

import dagster as dg
import pandas as pd
from pydantic import Field

from bc_pipeline.core.artifacts import ImageSet, ModelFolder, PartitionedArtifacts
from bc_pipeline.core.plots import markdown_image
from bc_pipeline.core.storage import save_bytes, save_parquet
from bc_pipeline.dagster_utils import automation
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.partitions import model_partitions
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import ALL_PARTITIONS, PipelineStorage
from bc_pipeline.evaluation.evaluate import TIMINGS, EvaluationSettings, evaluate_model, write_evaluation
from bc_pipeline.evaluation.leaderboard import LeaderboardSettings, leaderboard_figure, leaderboard_markdown, leaderboard_table
from bc_pipeline.preparation.splits import split_arrays
from bc_pipeline.training.model_folder import load_trained_model


class EvaluationConfig(SettingsConfig):
    """What an evaluation scores beyond the clean test split (evaluation.evaluate.EvaluationSettings)."""

    settings_class = EvaluationSettings
    robust_policy: str = setting(EvaluationSettings, "robust_policy")
    tta: bool = setting(EvaluationSettings, "tta")
    tta_views: list[str] = setting(EvaluationSettings, "tta_views")
    tta_all_policies: bool = setting(EvaluationSettings, "tta_all_policies")
    gradcam_per_class: int = setting(EvaluationSettings, "gradcam_per_class")


@dg.asset(
    code_version=with_config("4", EvaluationConfig),
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    partitions_def=model_partitions,
    description="Per model: clean accuracy, the corruption benchmark (mCA), calibration, the training-family presets, "
    "TTA, P/R/F1, confusion, Grad-CAM.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,  # type: ignore[valid-type]
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    trained_model: ModelFolder,
    robustness_eval_sets: ImageSet,
    corruption_benchmark_set: ImageSet,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    name = context.partition_key
    result = evaluate_model(
        load_trained_model(trained_model), name=name,
        test=split_arrays(clean_images, data_splits, "test"), val=split_arrays(clean_images, data_splits, "val"),
        perturbed=robustness_eval_sets, corruption_set=corruption_benchmark_set,
        settings=config.settings(), log=context.log.info,
    )  # fmt: skip
    paths = write_evaluation(result, storage.report_dir(f"evaluation_report/{name}"))
    metadata = {
        **result.headline(),
        "corruptions": md.table(result.corruptions.round(4), max_rows=100),
        "robustness": md.table(result.robustness.round(4)),
        "per_class": md.table(result.per_class),
    }
    for png_name, png in result.pngs.items():
        metadata[png_name] = dg.MetadataValue.md(markdown_image(png, png_name))
        metadata[f"{png_name}_path"] = dg.MetadataValue.path(str(paths[png_name]))
    metadata["report_path"] = dg.MetadataValue.path(str(paths["report"]))
    return versioned(result.summary, result.without_timings(), metadata=metadata)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class LeaderboardConfig(SettingsConfig):
    """How the leaderboard ranks (evaluation.leaderboard.LeaderboardSettings)."""

    settings_class = LeaderboardSettings
    rank_by: str = setting(LeaderboardSettings, "rank_by")
    mce_baseline: str = setting(LeaderboardSettings, "mce_baseline")


@dg.asset(
    code_version=with_config("4", LeaderboardConfig),  # 4: framing-calibrated external columns
    automation_condition=automation.across_models(["evaluation_report", "domain_shift_report"]),
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    ins={"evaluation_report": dg.AssetIn(metadata=ALL_PARTITIONS), "domain_shift_report": dg.AssetIn(metadata=ALL_PARTITIONS)},
    description="All evaluated models ranked: accuracy, robust accuracy, parameters, training time, images/s.",
)
def model_leaderboard(
    context: dg.AssetExecutionContext,
    config: LeaderboardConfig,
    evaluation_report: PartitionedArtifacts,
    domain_shift_report: PartitionedArtifacts,
    storage: PipelineStorage,
) -> dg.Output[pd.DataFrame]:
    if not len(evaluation_report):
        raise dg.Failure(description="no model has been evaluated yet: materialize evaluation_report for a partition first")
    table = leaderboard_table(
        {name: evaluation_report[name] for name in evaluation_report}, rank_by=config.rank_by, mce_baseline=config.mce_baseline,
        domain_shift={name: domain_shift_report[name] for name in domain_shift_report},
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
    return versioned(table, table.drop(columns=list(TIMINGS)), metadata=metadata)


class SubmissionConfig(dg.Config):
    """Which model to package (the asset's own choice: no library setting behind it)."""

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
    from bc_pipeline.evaluation.submission import write_submission

    name = config.model or str(model_leaderboard.iloc[0]["model"])
    if name not in trained_model:
        raise dg.Failure(description=f"model {name!r} has no trained model stored; trained: {', '.join(trained_model) or 'none'}")
    chosen = load_trained_model(trained_model[name])
    row = model_leaderboard.loc[model_leaderboard["model"] == name]
    scores = row.iloc[0].to_dict() if len(row) else {}
    folder = storage.root / "submission"
    info = {"model": name, "temperature": chosen.record.temperature or 1.0, **scores}
    write_submission(chosen.model, chosen.record.class_names, folder, info=info)
    context.log.info(f"packaged {name} in {folder}")
    summary = {"model": name, "folder": str(folder), "accuracy": scores.get("accuracy"), "robust_accuracy": scores.get("robust_accuracy")}
    metadata = {
        "model": name,
        "folder": dg.MetadataValue.path(str(folder)),
        "zip": dg.MetadataValue.path(str(folder / "submission.zip")),
        "accuracy": _round(scores.get("accuracy")),
        "robust_accuracy": _round(scores.get("robust_accuracy")),
    }
    return versioned(summary, name, chosen.record.weights_fingerprint, metadata=metadata)
