"""One trained model scored end to end, as a plain library call: :func:`evaluate_model`.

It predicts the clean test and validation splits (timing the test split), scores the ImageNet-C
corruption benchmark, calibrates, scores the perturbed training-family sets with and without
test-time augmentation, draws the figures (confusion, training curves, reliability, corruption
heatmap, Grad-CAM) and writes the Markdown report, all into a :class:`ModelEvaluation`.
:func:`write_evaluation` turns that result into the report folder's files. Neither touches
Dagster: the ``evaluation_report`` asset only splits its inputs, calls both, and records
metadata, so the whole evaluation can be run and tested without an orchestrator.

Keras and TensorFlow are imported inside the functions that need them (via
:mod:`bc_pipeline.evaluation.interpret` and :func:`bc_pipeline.models.inference.predict_proba`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import (
    confusion_matrix_figure,
    corruption_heatmap,
    gradcam_grid,
    reliability_figure,
    training_curves_figure,
)
from bc_pipeline.core.settings import declare
from bc_pipeline.core.storage import save_bytes, save_json, save_parquet
from bc_pipeline.evaluation.imagenet_c import seen_in_training
from bc_pipeline.evaluation.interpret import TTA_VIEWS, example_titles, grad_cam, gradcam_examples, predict_tta
from bc_pipeline.evaluation.metrics import CorruptionResult, Scored, score_corruptions, score_predictor
from bc_pipeline.evaluation.report import calibration_section, corruption_section, report_markdown
from bc_pipeline.models.calibration import reliability, scale_probabilities, stored_or_fitted
from bc_pipeline.models.inference import predict_proba
from bc_pipeline.training.model_folder import ModelRecord, TrainedModel

Split = tuple[np.ndarray, np.ndarray]  # (images uint8 (N, H, W, 3), labels (N,))

# Measured speeds differ on every run; they stay in the outputs but not in their data versions, so
# re-scoring an unchanged model does not make the leaderboard and submission rerun.
TIMINGS: tuple[str, ...] = ("inference_images_per_second",)

# The report's figures beside it, by caption; Grad-CAM is added when its grid was drawn.
_REPORT_IMAGES = {"confusion matrix": "confusion_matrix.png", "training curves": "training_curves.png"}
_GRADCAM_CAPTION = "Grad-CAM, correct and wrong predictions per class"


@dataclass(frozen=True)
class EvaluationSettings:
    """What an evaluation scores beyond the clean test split (the asset's config, minus Dagster)."""

    robust_policy: str = declare("strong", "Perturbation whose test accuracy is 'robust accuracy'.")
    tta: bool = declare(True, "Also score with test-time augmentation (flips, small rotations).")
    tta_views: tuple[str, ...] = declare(
        TTA_VIEWS, "Views averaged by TTA: identity, flip_lr, flip_ud, rot90, rot180, rot270, transpose, "
        "antitranspose (exact) or rotate+D / rotate-D.",
    )  # fmt: skip
    tta_all_policies: bool = declare(False, "TTA on every policy's perturbed copies, not just robust_policy.")
    gradcam_per_class: int = declare(1, "Correct and wrong Grad-CAM examples per class.", ge=0, le=4)

    def __post_init__(self) -> None:
        # A config hands the views over as a list; a tuple keeps the settings hashable and frozen.
        object.__setattr__(self, "tta_views", tuple(self.tta_views))


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no truth value to compare by
class ModelEvaluation:
    """Everything one evaluation found: the summary the asset returns, its tables, figures and report."""

    summary: dict[str, Any]  # JSON-able; stored as metrics.json and returned by the asset
    per_class: pd.DataFrame  # class, precision, recall, f1, support (+ robust_recall)
    robustness: pd.DataFrame  # evaluation.metrics.policy_scores per run, with a ``tta`` column
    corruptions: pd.DataFrame  # evaluation.imagenet_c.corruption_scores (empty without a benchmark set)
    pngs: dict[str, bytes]  # figure name -> PNG; written as <name>.png beside the report
    report: str  # report.md, which links the PNGs by those file names
    images_per_second: float  # clean test split, unrounded

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """The three tables by the stem of the Parquet file each is written to."""
        return {"per_class": self.per_class, "robustness": self.robustness, "corruptions": self.corruptions}

    def headline(self) -> dict[str, float | int | None]:
        """The scalar metrics rounded for display (the asset's metadata; timings included)."""
        s = self.summary
        return {
            "accuracy": _round(s["accuracy"]),
            "accuracy_tta": _round(s["accuracy_tta"]),
            "robust_accuracy": _round(s["robust_accuracy"]),
            "robust_accuracy_tta": _round(s["robust_accuracy_tta"]),
            "corruption_accuracy": _round(s["corruption_accuracy"]),
            "corruption_accuracy_unseen": _round(s["corruption_accuracy_unseen"]),
            "ece": _round(s["ece"]),
            "ece_scaled": _round(s["ece_scaled"]),
            "temperature": _round(s["temperature"]),
            "inference_images_per_second": s["inference_images_per_second"],
            **{f"weighted_{k}": _round(v) for k, v in s["weighted"].items()},
            "test_images": s["test_images"],
        }

    def without_timings(self) -> dict[str, Any]:
        """The summary minus :data:`TIMINGS`: what the data version is taken from."""
        return without_timings(self.summary)


def without_timings(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` minus the measured speeds, which change on every run of an unchanged model."""
    return {key: value for key, value in summary.items() if key not in TIMINGS}


def evaluate_model(
    trained: TrainedModel,
    *,
    name: str,
    test: Split,
    val: Split,
    perturbed: ImageSet,
    corruption_set: ImageSet,
    settings: EvaluationSettings = EvaluationSettings(),
    log: Callable[[str], None] = lambda message: None,
) -> ModelEvaluation:
    """Score ``trained`` on the clean splits, the corruption benchmark and the perturbed sets.

    ``perturbed`` has a manifest with policy, split and label per image; ``corruption_set`` one
    with corruption, severity, family and label (either may be empty). ``log`` receives the same
    progress lines the asset logged. Nothing is written: see :func:`write_evaluation`.
    """
    record, class_names = trained.record, list(trained.record.class_names)
    test_proba, val_proba, speed = _predict_clean(trained.model, test, val, name=name, log=log)
    trained_presets = list(record.augmentation_policies)
    corruption = _score_benchmark(trained.model, corruption_set, trained_presets, log)
    calibration = stored_or_fitted(record.temperature, record.temperature_source, val_proba, val[1], test_proba, test[1])
    runs = _score_runs(trained.model, test, val, (test_proba, val_proba), perturbed, class_names, settings, log)
    robustness = pd.concat([run.robustness.assign(tta=kind == "tta") for kind, run in runs.items()], ignore_index=True)
    pngs = _figures(trained, name, test, runs["plain"], test_proba, calibration, corruption, settings)
    facts = {"trained_presets": trained_presets, "calibration": calibration, "images_per_second": speed}
    summary = _summary(name, record, runs, robustness, corruption, facts, settings, test_images=len(test[1]))
    report = _report(name, runs, robustness, corruption, calibration, trained_presets, pngs, settings)
    plain = runs["plain"].evaluation
    return ModelEvaluation(summary, plain.per_class, robustness, corruption.table, pngs, report, speed)


def _predict_clean(
    model: Any, test: Split, val: Split, *, name: str, log: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Test and validation probabilities, predicted once and reused by every score that needs them.

    Only the test split is timed: it is the inference speed the leaderboard compares.
    """
    start = time.perf_counter()
    test_proba = predict_proba(model, test[0])
    images_per_second = len(test[0]) / max(time.perf_counter() - start, 1e-9)
    log(f"{name}: {len(test[1])} test images at {images_per_second:.0f} images/s")
    return test_proba, predict_proba(model, val[0]), images_per_second


def _score_benchmark(
    model: Any, corruption_set: ImageSet, trained_presets: list[str], log: Callable[[str], None]
) -> CorruptionResult:
    """The ImageNet-C suite, with the corruptions the training presets resemble named as seen."""
    corruption = score_corruptions(
        lambda x: predict_proba(model, x), corruption_set.images, corruption_set.manifest,
        seen=seen_in_training(trained_presets),
    )  # fmt: skip
    log(f"corruption benchmark: mCA {corruption.mean_accuracy}, unseen families {corruption.mean_accuracy_unseen}")
    return corruption


def _score_runs(
    model: Any,
    test: Split,
    val: Split,
    clean_proba: tuple[np.ndarray, np.ndarray],
    perturbed: ImageSet,
    class_names: Sequence[str],
    settings: EvaluationSettings,
    log: Callable[[str], None],
) -> dict[str, Scored]:
    """``plain`` (and ``tta``): each predictor scored on the test split and the perturbed copies.

    The plain predictor reuses the clean probabilities already computed (recognised by identity of
    the split arrays) rather than predicting the splits a second time.
    """
    (test_x, _), (val_x, _), (test_proba, val_proba) = test, val, clean_proba
    manifest, robust_policy = perturbed.manifest, settings.robust_policy
    common = {"test": test, "val": val, "class_names": class_names, "robust_policy": robust_policy}
    runs = {
        "plain": score_predictor(
            lambda x: test_proba if x is test_x else val_proba if x is val_x else predict_proba(model, x),
            perturbed_images=perturbed.images, perturbed=manifest, **common,
        )
    }  # fmt: skip
    if settings.tta:
        # TTA multiplies the prediction cost by the number of views: by default only the
        # headline policy's perturbed copies get it (tta_all_policies: every policy's).
        rows = np.flatnonzero(settings.tta_all_policies | (manifest["policy"] == robust_policy).to_numpy())
        log(f"test-time augmentation over {len(settings.tta_views)} views ({len(rows)} perturbed images)")
        runs["tta"] = score_predictor(
            lambda x: predict_tta(model, x, views=settings.tta_views),
            perturbed_images=perturbed.images[rows], perturbed=manifest.iloc[rows], **common,
        )  # fmt: skip
    for kind, run in runs.items():
        log(f"{kind}: accuracy {run.evaluation.accuracy:.4f}, robust ({robust_policy}) {run.robust_accuracy}")
    return runs


def _figures(
    trained: TrainedModel,
    name: str,
    test: Split,
    plain: Scored,
    test_proba: np.ndarray,
    calibration: dict,
    corruption: CorruptionResult,
    settings: EvaluationSettings,
) -> dict[str, bytes]:
    """The report's PNGs by name; the heatmap and Grad-CAM only when there is something to draw."""
    class_names, temperature, test_y = list(trained.record.class_names), float(calibration["temperature"]), test[1]
    pngs = {
        "confusion_matrix": confusion_matrix_figure(plain.evaluation.confusion, class_names),
        "training_curves": training_curves_figure(trained.history),
        "reliability": reliability_figure(
            reliability(test_proba, test_y), reliability(scale_probabilities(test_proba, temperature), test_y),
            temperature=temperature, title=f"{name}: reliability on the test split",
        ),
    }  # fmt: skip
    if len(corruption.table):
        title = f"{name}: accuracy under the ImageNet-C corruptions"
        pngs["corruption_heatmap"] = corruption_heatmap(corruption.table, title=title)
    if settings.gradcam_per_class:
        gradcam = _gradcam_png(trained.model, test, plain.test_predictions, class_names, name, settings.gradcam_per_class)
        if gradcam is not None:
            pngs["gradcam"] = gradcam
    return pngs


def _gradcam_png(
    model: Any, test: Split, predictions: np.ndarray, class_names: Sequence[str], name: str, per_class: int
) -> bytes | None:
    """Grad-CAM on ``per_class`` right and wrong test images per class, so a reader sees both what the
    model looks at when it is right and where it goes astray; None when no image qualifies."""
    (test_x, test_y) = test
    picks = gradcam_examples(test_y, predictions, len(class_names), per_class=per_class)
    if not len(picks):
        return None
    rows = picks["index"].to_numpy()
    heatmaps = grad_cam(model, test_x[rows], predictions[rows])
    titles = example_titles(test_y[rows], predictions[rows], class_names)
    return gradcam_grid(test_x[rows], heatmaps, titles, title=f"{name}: Grad-CAM on test images")


def _summary(
    name: str,
    record: ModelRecord,
    runs: dict[str, Scored],
    robustness: pd.DataFrame,
    corruption: CorruptionResult,
    facts: dict[str, Any],
    settings: EvaluationSettings,
    *,
    test_images: int,
) -> dict[str, Any]:
    """metrics.json: every score, plus the training facts the leaderboard ranks by (one JSON-able dict)."""
    evaluation, tta = runs["plain"].evaluation, (runs["tta"].evaluation if "tta" in runs else None)
    tta_robust, calibration = (runs["tta"].robust_accuracy if "tta" in runs else None), facts["calibration"]
    return {
        "model": name,
        "accuracy": evaluation.accuracy,
        "accuracy_tta": tta.accuracy if tta else None,
        "robust_accuracy": runs["plain"].robust_accuracy,
        "robust_accuracy_tta": tta_robust,
        "robust_policy": settings.robust_policy,
        "corruption_accuracy": corruption.mean_accuracy,
        "corruption_accuracy_unseen": corruption.mean_accuracy_unseen,
        "corruptions_seen_in_training": corruption.seen,
        "corruptions": corruption.table.to_dict("records"),
        "trained_presets": facts["trained_presets"],
        "calibration": calibration,
        "ece": calibration["ece"],
        "ece_scaled": calibration["ece_scaled"],
        "temperature": float(calibration["temperature"]),
        "weighted": evaluation.weighted,
        "weighted_tta": tta.weighted if tta else None,
        "test_images": int(test_images),
        "inference_images_per_second": round(facts["images_per_second"], 1),
        **_training_facts(record),
        "per_class": evaluation.per_class.to_dict("records"),
        "per_class_tta": tta.per_class.to_dict("records") if tta else None,
        "robustness": robustness.to_dict("records"),
        "confusion_matrix": evaluation.confusion.tolist(),
        "class_names": list(record.class_names),
        "training": record.to_json(),
    }


def _training_facts(record: ModelRecord) -> dict[str, Any]:
    """The cost side of the leaderboard (size, training time, input size, device) from the model's record."""
    return {
        "parameters": record.parameters,
        "train_seconds": record.train_seconds,
        "epochs_run": record.epochs_run,
        "image_size": record.image_size,
        "device": record.device,
    }


def _report(
    name: str,
    runs: dict[str, Scored],
    robustness: pd.DataFrame,
    corruption: CorruptionResult,
    calibration: dict,
    trained_presets: list[str],
    pngs: dict[str, bytes],
    settings: EvaluationSettings,
) -> str:
    """report.md: headline table, per-class scores, corruption benchmark, calibration, policy table,
    figures; it links the PNGs by the names :func:`write_evaluation` gives them."""
    evaluation = runs["plain"].evaluation
    images = {**_REPORT_IMAGES, **({_GRADCAM_CAPTION: "gradcam.png"} if "gradcam" in pngs else {})}
    heatmap = "corruption_heatmap.png" if "corruption_heatmap" in pngs else None
    return report_markdown(
        runs["plain"], runs.get("tta"), title=f"bc_pipeline evaluation of {name} (test split)", images=images,
        robust_policy=settings.robust_policy, robustness=robustness, trained_presets=trained_presets,
        extra_sections=[
            *corruption_section(corruption, clean_accuracy=evaluation.accuracy, heatmap=heatmap),
            *calibration_section(calibration, diagram="reliability.png"),
        ],
    )  # fmt: skip


def write_evaluation(result: ModelEvaluation, folder: Path) -> dict[str, Path]:
    """Write the report folder atomically, file by file; return each file's path by name.

    Names: ``per_class``, ``robustness``, ``corruptions`` (Parquet), ``metrics`` (JSON), ``report``
    (Markdown) and each PNG's name. A reader never sees a half-written file.
    """
    folder = Path(folder)
    paths = {key: save_parquet(folder / f"{key}.parquet", table) for key, table in result.tables.items()}
    paths["metrics"] = save_json(folder / "metrics.json", result.summary)
    paths["report"] = save_bytes(folder / "report.md", result.report.encode())
    for png_name, png in result.pngs.items():
        paths[png_name] = save_bytes(folder / f"{png_name}.png", png)
    return paths


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
