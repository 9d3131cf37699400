"""Stage 5: score the trained model on the untouched test split and write the report."""

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.assets import _metadata as md
from bc_pipeline.assets.training import split_arrays
from bc_pipeline.lib.artifacts import ImageSet
from bc_pipeline.lib.evaluation import evaluate_predictions, per_class_recall, policy_scores, report_markdown
from bc_pipeline.lib.plots import confusion_matrix_figure, training_curves_figure
from bc_pipeline.lib.storage import fingerprint, save_bytes, save_json, save_parquet
from bc_pipeline.lib.training import TrainedModel, predict_proba
from bc_pipeline.resources import PipelineStorage


# The perturbation whose test-split accuracy is reported as "robust accuracy".
ROBUST_POLICY = "strong"


@dg.asset(
    code_version="2",
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    description="Clean and robust (perturbed) test accuracy, per-policy table, P/R/F1, confusion matrix, training curves.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    trained_model: TrainedModel,
    robustness_eval_sets: ImageSet,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    test_x, test_y = split_arrays(clean_images, data_splits, "test")
    val_x, val_y = split_arrays(clean_images, data_splits, "val")
    class_names = trained_model.info["class_names"]
    predicted = predict_proba(trained_model.model, test_x).argmax(axis=1)
    result = evaluate_predictions(test_y, predicted, class_names)
    context.log.info(f"test accuracy {result.accuracy:.4f} on {len(test_y)} images")
    clean_val = float(np.mean(predict_proba(trained_model.model, val_x).argmax(axis=1) == val_y)) if len(val_y) else float("nan")
    robust = robustness_eval_sets.manifest
    robust_y = robust["label"].to_numpy(np.int64)
    robust_pred = predict_proba(trained_model.model, robustness_eval_sets.images).argmax(axis=1)
    robustness = policy_scores(robust_y, robust_pred, robust, {"val": clean_val, "test": result.accuracy})
    for row in robustness.itertuples():
        context.log.info(f"{row.split} x {row.policy}: accuracy {row.accuracy:.4f} ({row.drop_from_clean:+.4f} below clean)")
    headline = robust.index[(robust["split"] == "test") & (robust["policy"] == ROBUST_POLICY)].to_numpy()
    robust_accuracy = float(np.mean(robust_pred[headline] == robust_y[headline])) if len(headline) else None
    if len(headline):
        recall = per_class_recall(robust_y[headline], robust_pred[headline], len(class_names))
        result.per_class["robust_recall"] = recall

    folder = storage.report_dir("evaluation_report")
    confusion_png = confusion_matrix_figure(result.confusion, class_names)
    curves_png = training_curves_figure(trained_model.history)
    save_parquet(folder / "per_class.parquet", result.per_class)
    save_parquet(folder / "robustness.parquet", robustness)
    summary = {
        "accuracy": result.accuracy,
        "robust_accuracy": robust_accuracy,
        "robust_policy": ROBUST_POLICY,
        "robustness": robustness.to_dict("records"),
        "weighted": result.weighted,
        "test_images": int(len(test_y)),
        "per_class": result.per_class.to_dict("records"),
        "confusion_matrix": result.confusion.tolist(),
        "class_names": class_names,
        "training": {k: v for k, v in trained_model.info.items() if k != "class_weight"},
    }
    save_json(folder / "metrics.json", summary)
    images = {"confusion matrix": "confusion_matrix.png", "training curves": "training_curves.png"}
    report = report_markdown(
        result, title="bc_pipeline evaluation (test split)", images=images,
        robust_accuracy=robust_accuracy, robustness=robustness,
    )  # fmt: skip
    save_bytes(folder / "report.md", report.encode())
    metadata = {
        "accuracy": round(result.accuracy, 4),
        "robust_accuracy": round(robust_accuracy, 4) if robust_accuracy is not None else None,
        "robustness": md.table(robustness.round(4)),
        **{f"weighted_{k}": round(v, 4) for k, v in result.weighted.items()},
        "test_images": len(test_y),
        "per_class": md.table(result.per_class),
        **md.image(confusion_png, folder / "confusion_matrix.png", "confusion_matrix"),
        **md.image(curves_png, folder / "training_curves.png", "training_curves"),
        "report_path": dg.MetadataValue.path(str(folder / "report.md")),
    }
    return dg.Output(summary, data_version=dg.DataVersion(fingerprint(summary)), metadata=metadata)
