"""One trained model scored under lab shift, as a plain library call: :func:`evaluate_domain_shift`.

Two kinds of evidence, side by side: the ``domain_shift_set`` (the test split under the lab-like
shifts of :mod:`bc_pipeline.evaluation.lab_shift`, which training never uses) and any external
labelled sets a user pointed the pipeline at (:mod:`bc_pipeline.evaluation.external`): accuracy,
balanced accuracy over the classes each set has, its confusion matrix in numbers and in words, and
Grad-CAM on a few of its misclassified cells. :func:`write_domain_shift` writes the report folder.
No Dagster; Keras only through the prediction and Grad-CAM functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import confusion_matrix_figure, corruption_heatmap, gradcam_grid
from bc_pipeline.core.storage import save_bytes, save_json, save_parquet
from bc_pipeline.evaluation.external import confusions_in_words, score_external
from bc_pipeline.evaluation.framing import FramingCalibration, calibrate_framing
from bc_pipeline.evaluation.lab_shift import seen_shifts, shift_scores, shift_summary
from bc_pipeline.models.inference import predict_proba
from bc_pipeline.training.model_folder import TrainedModel

GRADCAM_WRONG_PER_SET = 8


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no truth value to compare by
class DomainShiftEvaluation:
    """What :func:`evaluate_domain_shift` found: the summary the asset returns, its tables, figures and report."""

    summary: dict[str, Any]  # JSON-able
    shifts: pd.DataFrame  # lab_shift.shift_scores
    external: pd.DataFrame  # one row per external set: set, images, accuracy, balanced_accuracy, classes
    confusions: dict[str, pd.DataFrame]  # per external set: given (rows) x predicted (columns)
    pngs: dict[str, bytes]
    report: str

    def headline(self) -> dict[str, float | int | None]:
        """The scalar metrics for the asset's metadata and the leaderboard."""
        s = self.summary
        numbers = {key: s[key] for key in ("shift_accuracy", "shift_accuracy_unseen", "lab_shift_accuracy")}
        for name, score in s["external"].items():
            numbers[f"{name}_accuracy"] = score["accuracy"]
            numbers[f"{name}_balanced_accuracy"] = score["balanced_accuracy"]
            numbers[f"{name}_framed_accuracy"] = score["framed"]["accuracy"]
            numbers[f"{name}_framed_balanced_accuracy"] = score["framed"]["balanced_accuracy"]
        return {key: None if value is None else round(float(value), 4) for key, value in numbers.items()}


def evaluate_domain_shift(
    trained: TrainedModel,
    *,
    name: str,
    shift_set: ImageSet,
    external: ImageSet,
    log: Callable[[str], None] = lambda message: None,
) -> DomainShiftEvaluation:
    """Score ``trained`` on the shift set (shift, severity, label) and on each external set (set, label)."""
    class_names, model = list(trained.record.class_names), trained.model
    selection = getattr(trained.record.settings, "selection", "clean")  # the ensemble has no settings
    seen = seen_shifts(trained.record.augmentation_policies, selected_on_shifts=selection == "lab_shifts")
    shifts = pd.DataFrame(columns=["shift", "severity", "images", "accuracy", "balanced_accuracy"])
    if len(shift_set.images):
        predicted = predict_proba(model, shift_set.images).argmax(1)
        shifts = shift_scores(shift_set.manifest["label"].to_numpy(), predicted, shift_set.manifest)
    summary: dict[str, Any] = {"model": name, **shift_summary(shifts, seen), "seen_shifts": seen,
                               "selection": selection, "shifts": shifts.to_dict("records"), "external": {}}  # fmt: skip
    log(f"{name}: lab shifts {_percent(summary['shift_accuracy'])} (unseen {_percent(summary['shift_accuracy_unseen'])}, "
        f"all four at once {_percent(summary['lab_shift_accuracy'])})")  # fmt: skip
    pngs: dict[str, bytes] = {}
    if len(shifts):
        pngs["shift_heatmap"] = corruption_heatmap(shifts.rename(columns={"shift": "corruption"}), title=f"{name}: accuracy under lab-like shifts")
    confusions, rows = {}, []
    for set_name, rows_of_set in external.manifest.groupby("set", sort=False).indices.items():
        images, truth = external.images[rows_of_set], external.manifest["label"].to_numpy()[rows_of_set]
        as_given = predict_proba(model, images)
        predicted = as_given.argmax(1)
        score = score_external(truth, predicted, class_names)
        confusions[set_name] = score.pop("confusion")
        framing, framed = _framed_score(model, images, truth, class_names, as_given)
        summary["external"][set_name] = {**score, "confusion": confusions[set_name].to_dict("split"),
                                         "in_words": confusions_in_words({"confusion": confusions[set_name]}),
                                         "framing": framing.to_json(), "framed": framed}  # fmt: skip
        rows.append({"set": set_name, **{k: score[k] for k in ("images", "accuracy", "balanced_accuracy")},
                     "zoom": framing.zoom, **{f"framed_{k}": framed[k] for k in ("accuracy", "balanced_accuracy")},
                     "classes": ", ".join(score["classes"])})  # fmt: skip
        log(f"{name} on {set_name}: accuracy {_percent(score['accuracy'])}, balanced {_percent(score['balanced_accuracy'])} "
            f"({score['images']} images); " + "; ".join(summary["external"][set_name]["in_words"]))  # fmt: skip
        log(f"{name} on {set_name}, framing calibrated to {framing.zoom:g}x ({framing.reason}): accuracy "
            f"{_percent(framed['accuracy'])}, balanced {_percent(framed['balanced_accuracy'])}")  # fmt: skip
        pngs[f"confusion_{set_name}"] = _confusion_png(confusions[set_name], class_names)
        wrong = _gradcam_wrong(model, images, truth, predicted, class_names, f"{name} on {set_name}: misclassified cells")
        if wrong is not None:
            pngs[f"gradcam_{set_name}"] = wrong
    columns = ["set", "images", "accuracy", "balanced_accuracy", "zoom", "framed_accuracy", "framed_balanced_accuracy", "classes"]
    table = pd.DataFrame(rows, columns=columns)
    return DomainShiftEvaluation(summary, shifts, table, confusions, pngs, _report(name, summary, shifts, pngs))


def write_domain_shift(result: DomainShiftEvaluation, folder: Path) -> dict[str, Path]:
    """The report folder: report.md, metrics.json, the tables as Parquet, the figures as PNG."""
    paths = {"report": folder / "report.md", "metrics": folder / "metrics.json"}
    save_bytes(paths["report"], result.report.encode())
    save_json(paths["metrics"], result.summary)
    for stem, table in {"shifts": result.shifts, "external": result.external}.items():
        paths[stem] = folder / f"{stem}.parquet"
        save_parquet(paths[stem], table)
    for png_name, png in result.pngs.items():
        paths[png_name] = folder / f"{png_name}.png"
        save_bytes(paths[png_name], png)
    return paths


def _framed_score(
    model: Any, images: np.ndarray, truth: np.ndarray, class_names: Sequence[str], as_given: np.ndarray
) -> tuple[FramingCalibration, dict[str, Any]]:
    """The set at the zoom its own unlabelled images point to (evaluation.framing), and its score there."""
    framing, probabilities = calibrate_framing(lambda batch: predict_proba(model, batch), images, as_given=as_given)
    score = score_external(truth, probabilities.argmax(1), class_names)
    return framing, {key: score[key] for key in ("accuracy", "balanced_accuracy", "recall")}


def _confusion_png(confusion: pd.DataFrame, class_names: Sequence[str]) -> bytes:
    """The set's matrix, square over the model's classes (rows of classes the set lacks stay empty)."""
    full = confusion.reindex(index=list(class_names), fill_value=0).to_numpy()
    return confusion_matrix_figure(full, class_names)


def _gradcam_wrong(
    model: Any, images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], title: str
) -> bytes | None:
    """Grad-CAM on up to :data:`GRADCAM_WRONG_PER_SET` misclassified cells, spread over the given classes."""
    from bc_pipeline.evaluation.interpret import example_titles, grad_cam

    wrong = np.flatnonzero(truth != predicted)
    if not len(wrong):
        return None
    by_class = [wrong[truth[wrong] == c] for c in np.unique(truth[wrong])]  # round robin over the classes
    picks = [rows[k] for k in range(max(map(len, by_class))) for rows in by_class if k < len(rows)]
    picks = np.sort(np.array(picks[:GRADCAM_WRONG_PER_SET]))
    heatmaps = grad_cam(model, images[picks], predicted[picks])
    return gradcam_grid(images[picks], heatmaps, example_titles(truth[picks], predicted[picks], class_names), title=title)


def _report(name: str, summary: dict[str, Any], shifts: pd.DataFrame, pngs: dict[str, bytes]) -> str:
    lines = [f"# {name}: lab shift", ""]
    if len(shifts):
        seen = summary["seen_shifts"]
        why = "used to select its epochs" if summary.get("selection") == "lab_shifts" else "resembled in training"
        lines += [
            f"Mean accuracy under the lab-like shifts: **{_percent(summary['shift_accuracy'])}** (shifts no training "
            f"preset resembles: {_percent(summary['shift_accuracy_unseen'])}; all four at once: "
            f"{_percent(summary['lab_shift_accuracy'])}).", "",
            "| shift | severity | accuracy | balanced accuracy |", "|---|---|---|---|",
        ]  # fmt: skip
        for row in shifts.itertuples():
            mark = f" ({why})" if row.shift in seen else ""
            lines.append(f"| {row.shift}{mark} | {row.severity} | {row.accuracy:.3f} | {row.balanced_accuracy:.3f} |")
        lines += ["", "![accuracy under lab-like shifts](shift_heatmap.png)", ""]
    if not summary["external"]:
        lines += ["No external sets: point `BC_EXTERNAL_SETS` at folders of another lab's labelled cells "
                  "(`name=folder;other=folder`, one sub-folder per class) and rematerialize `external_sets`.", ""]  # fmt: skip
    for set_name, score in summary["external"].items():
        lines += [
            f"## {set_name}", "",
            f"{score['images']} images of {len(score['classes'])} classes ({', '.join(score['classes'])}): accuracy "
            f"**{_percent(score['accuracy'])}**, balanced accuracy **{_percent(score['balanced_accuracy'])}**.", "",
            "Recall per class: " + ", ".join(f"{c} {r:.0%}" for c, r in score["recall"].items()) + ".", "",
        ]  # fmt: skip
        if score["in_words"]:
            lines += ["Largest confusions: " + "; ".join(score["in_words"]) + ".", ""]
        framed, zoom = score["framed"], score["framing"]["zoom"]
        lines += [f"Framing calibrated from the set's own images (evaluation.framing: {score['framing']['reason']}): "
                  f"zoom **{zoom:g}x**, accuracy {_percent(framed['accuracy'])}, balanced accuracy "
                  f"{_percent(framed['balanced_accuracy'])}.", ""]  # fmt: skip
        lines += [f"![confusion matrix on {set_name}](confusion_{set_name}.png)", ""]
        if f"gradcam_{set_name}" in pngs:
            lines += [f"![Grad-CAM on misclassified cells of {set_name}](gradcam_{set_name}.png)", ""]
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1%}"
