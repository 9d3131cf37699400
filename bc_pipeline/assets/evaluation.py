"""Stage 5: score the trained model on the untouched test split and write the report."""

import dagster as dg
import pandas as pd

from bc_pipeline.assets import _metadata as md
from bc_pipeline.assets.training import split_arrays
from bc_pipeline.lib.artifacts import ImageSet
from bc_pipeline.lib.evaluation import evaluate_predictions, report_markdown
from bc_pipeline.lib.plots import confusion_matrix_figure, training_curves_figure
from bc_pipeline.lib.storage import fingerprint, save_bytes, save_json, save_parquet
from bc_pipeline.lib.training import TrainedModel, predict_proba
from bc_pipeline.resources import PipelineStorage


@dg.asset(
    code_version="1",
    group_name="evaluation",
    kinds={"parquet", "markdown"},
    description="Test-split accuracy, weighted and per-class P/R/F1, confusion matrix and training curves.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    clean_images: ImageSet,
    data_splits: pd.DataFrame,
    trained_model: TrainedModel,
    storage: PipelineStorage,
) -> dg.Output[dict]:
    test_x, test_y = split_arrays(clean_images, data_splits, "test")
    class_names = trained_model.info["class_names"]
    predicted = predict_proba(trained_model.model, test_x).argmax(axis=1)
    result = evaluate_predictions(test_y, predicted, class_names)
    context.log.info(f"test accuracy {result.accuracy:.4f} on {len(test_y)} images")

    folder = storage.report_dir("evaluation_report")
    confusion_png = confusion_matrix_figure(result.confusion, class_names)
    curves_png = training_curves_figure(trained_model.history)
    save_parquet(folder / "per_class.parquet", result.per_class)
    summary = {
        "accuracy": result.accuracy,
        "weighted": result.weighted,
        "test_images": int(len(test_y)),
        "per_class": result.per_class.to_dict("records"),
        "confusion_matrix": result.confusion.tolist(),
        "class_names": class_names,
        "training": {k: v for k, v in trained_model.info.items() if k != "class_weight"},
    }
    save_json(folder / "metrics.json", summary)
    images = {"confusion matrix": "confusion_matrix.png", "training curves": "training_curves.png"}
    report = report_markdown(result, title="bc_pipeline evaluation (test split)", images=images)
    save_bytes(folder / "report.md", report.encode())
    metadata = {
        "accuracy": round(result.accuracy, 4),
        **{f"weighted_{k}": round(v, 4) for k, v in result.weighted.items()},
        "test_images": len(test_y),
        "per_class": md.table(result.per_class),
        **md.image(confusion_png, folder / "confusion_matrix.png", "confusion_matrix"),
        **md.image(curves_png, folder / "training_curves.png", "training_curves"),
        "report_path": dg.MetadataValue.path(str(folder / "report.md")),
    }
    return dg.Output(summary, data_version=dg.DataVersion(fingerprint(summary)), metadata=metadata)
