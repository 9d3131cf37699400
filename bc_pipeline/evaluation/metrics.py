"""Metrics of a classifier on a held-out split: accuracy, weighted and per-class P/R/F1, confusion."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    weighted: dict[str, float]
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    confusion: np.ndarray  # rows: true class, columns: predicted class


def evaluate_predictions(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> Evaluation:
    """Score predictions against labels; classes absent from the split get zero support, not an error."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class = pd.DataFrame(
        {
            "class": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support.astype(np.int64),
        }
    )
    w_precision, w_recall, w_f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="weighted", zero_division=0
    )
    return Evaluation(
        accuracy=float(accuracy_score(y_true, y_pred)),
        weighted={"precision": float(w_precision), "recall": float(w_recall), "f1": float(w_f1)},
        per_class=per_class,
        confusion=confusion_matrix(y_true, y_pred, labels=labels),
    )


def policy_scores(
    y_true: np.ndarray, y_pred: np.ndarray, sets: pd.DataFrame, clean_accuracy: dict[str, float]
) -> pd.DataFrame:
    """Accuracy and weighted F1 per (policy, split) of the perturbed eval sets, and the drop from clean.

    ``sets`` has a ``policy`` and a ``split`` column, row-aligned with ``y_true`` / ``y_pred``;
    ``clean_accuracy`` maps each split to the accuracy on its untouched images.
    """
    from sklearn.metrics import f1_score

    rows = []
    for (policy, split), members in sets.groupby(["policy", "split"], sort=False).groups.items():
        truth, guess = y_true[members], y_pred[members]
        accuracy = float(np.mean(truth == guess)) if len(members) else float("nan")
        rows.append(
            {
                "policy": policy,
                "split": split,
                "images": len(members),
                "accuracy": accuracy,
                "weighted_f1": float(f1_score(truth, guess, average="weighted", zero_division=0)),
                "drop_from_clean": clean_accuracy.get(split, float("nan")) - accuracy,
            }
        )
    return pd.DataFrame(rows, columns=["policy", "split", "images", "accuracy", "weighted_f1", "drop_from_clean"])


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall (per-class accuracy) of each class; NaN for a class with no images."""
    support = np.bincount(y_true, minlength=num_classes)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    return np.divide(hits, support, out=np.full(num_classes, np.nan), where=support > 0)


@dataclass(frozen=True)
class Scored:
    """One predictor (plain or with TTA) scored on the clean test split and the perturbed sets."""

    evaluation: Evaluation
    robust_accuracy: float | None  # test split under the headline policy
    robustness: pd.DataFrame  # see policy_scores
    test_predictions: np.ndarray


def score_predictor(
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    test: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    perturbed_images: np.ndarray,
    perturbed: pd.DataFrame,
    class_names: Sequence[str],
    robust_policy: str,
) -> Scored:
    """Score ``predict`` (images -> probabilities) on the test split and the perturbed copies.

    ``perturbed`` is the manifest of ``perturbed_images`` (policy, split, label), row-aligned.
    Robust accuracy is the accuracy on the test split's ``robust_policy`` copy; per-class recall
    on that copy is added to the per-class table as ``robust_recall``.
    """
    (test_x, test_y), (val_x, val_y) = test, val
    test_pred = predict(test_x).argmax(axis=1)
    evaluation = evaluate_predictions(test_y, test_pred, class_names)
    val_accuracy = float(np.mean(predict(val_x).argmax(axis=1) == val_y)) if len(val_y) else float("nan")
    truth = perturbed["label"].to_numpy(np.int64)
    guess = predict(perturbed_images).argmax(axis=1) if len(perturbed) else np.zeros(0, np.int64)
    table = policy_scores(truth, guess, perturbed.reset_index(drop=True), {"val": val_accuracy, "test": evaluation.accuracy})
    headline = ((perturbed["split"] == "test") & (perturbed["policy"] == robust_policy)).to_numpy()
    robust_accuracy = None
    if headline.any():
        robust_accuracy = float(np.mean(guess[headline] == truth[headline]))
        evaluation.per_class["robust_recall"] = per_class_recall(truth[headline], guess[headline], len(class_names))
    return Scored(evaluation, robust_accuracy, table, test_pred)


def report_markdown(
    evaluation: Evaluation,
    *,
    title: str,
    images: dict[str, str],
    robust_accuracy: float | None = None,
    robust_policy: str = "strong",
    robustness: pd.DataFrame | None = None,
    tta: Evaluation | None = None,
    robust_accuracy_tta: float | None = None,
    trained_presets: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
) -> str:
    """A self-contained Markdown report; ``images`` maps captions to file names beside it.

    With ``robustness`` (see :func:`policy_scores`) the report gains the robust accuracy and a
    table per perturbation policy; a ``robust_recall`` column in ``per_class`` is shown too. With
    ``tta`` (the same split scored with test-time augmentation) both are shown side by side.
    The policy table is labelled as what it is, the families augmentation trains on, with the
    ``trained_presets`` the model saw marked; ``extra_sections`` (Markdown) come before it.
    """
    lines = [f"# {title}", "", "| | without TTA |" + (" with TTA |" if tta else ""), "|---|---|" + ("---|" if tta else "")]
    rows = [("accuracy", evaluation.accuracy, tta.accuracy if tta else None)]
    if robust_accuracy is not None:
        rows.append((f"robust accuracy ('{robust_policy}' perturbations)", robust_accuracy, robust_accuracy_tta))
    rows += [(f"weighted {k}", v, tta.weighted[k] if tta else None) for k, v in evaluation.weighted.items()]
    for name, value, with_tta in rows:
        lines.append(f"| {name} | **{value:.4f}** |" + (f" {with_tta:.4f} |" if tta and with_tta is not None else (" |" if tta else "")))
    lines += ["", *_per_class_lines(evaluation.per_class)]
    if tta is not None:
        lines += ["### With test-time augmentation", "", *_per_class_lines(tta.per_class)]
    lines += list(extra_sections)
    if robustness is not None and len(robustness):
        has_tta = "tta" in robustness
        lines += [
            "## Accuracy under the training families (keras-cv presets)",
            "",
            "These are the augmentation presets training can use: a model trained on one is scored on its own "
            "training distribution here. The robustness benchmark is the corruption suite above.",
            "",
            "| policy | split | tta | images | accuracy | weighted f1 | drop from clean |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['policy']}{' (used in training)' if r['policy'] in trained_presets else ''} | {r['split']} | {'yes' if has_tta and r['tta'] else 'no'} | {r['images']} "
                f"| {r['accuracy']:.4f} | {r['weighted_f1']:.4f} | {r['drop_from_clean']:+.4f} |"
                for r in robustness.to_dict("records")
            ),
            "",
        ]
    lines += [*(f"![{caption}]({file})" for caption, file in images.items()), ""]
    return "\n".join(lines)


def _per_class_lines(per_class: pd.DataFrame) -> list[str]:
    robust_column = "robust_recall" in per_class
    return [
        "| class | precision | recall | f1 | support |" + (" robust recall |" if robust_column else ""),
        "|---" * (6 if robust_column else 5) + "|",
        *(
            f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
            + (f" {r['robust_recall']:.3f} |" if robust_column else "")
            for r in per_class.to_dict("records")
        ),
        "",
    ]


@dataclass(frozen=True)
class CorruptionResult:
    """A predictor scored on the corruption suite (evaluation.imagenet_c)."""

    table: pd.DataFrame  # corruption, severity, family, images, accuracy, error
    mean_accuracy: float | None  # over every corruption and severity
    mean_accuracy_unseen: float | None  # leaving out the corruptions training overlapped
    seen: list[str]  # corruptions whose family a training preset used


def score_corruptions(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, manifest: pd.DataFrame, *, seen: Sequence[str] = ()
) -> CorruptionResult:
    """Accuracy per corruption and severity, and the mean corruption accuracy (all, and unseen only)."""
    from bc_pipeline.evaluation.imagenet_c import corruption_scores, mean_accuracy

    if not len(manifest):
        empty = pd.DataFrame(columns=["corruption", "severity", "family", "images", "accuracy", "error"])
        return CorruptionResult(empty, None, None, list(seen))
    guess = predict(images).argmax(axis=1)
    table = corruption_scores(manifest["label"].to_numpy(np.int64), guess, manifest.reset_index(drop=True))
    scored = [name for name in seen if name in set(table["corruption"])]
    return CorruptionResult(table, mean_accuracy(table), mean_accuracy(table, exclude=scored), scored)


def corruption_section(result: CorruptionResult, *, clean_accuracy: float, heatmap: str | None) -> list[str]:
    """The report's robustness benchmark: the headline numbers, then the table and its heatmap."""
    from bc_pipeline.evaluation.imagenet_c import corruption_markdown

    if result.mean_accuracy is None:
        return []
    unseen = "" if result.mean_accuracy_unseen is None else f"{result.mean_accuracy_unseen:.4f}"
    return [
        "## Robustness benchmark: the ImageNet-C corruptions (never used in training)",
        "",
        f"- mean corruption accuracy (mCA): **{result.mean_accuracy:.4f}** (clean {clean_accuracy:.4f})",
        f"- mCA over the corruptions no training preset resembles: **{unseen or '-'}**"
        + (f" (left out: {', '.join(result.seen)})" if result.seen else " (training used none of the families)"),
        "- mCE against the baseline model: see the leaderboard",
        "",
        *corruption_markdown(result.table, seen=result.seen, heatmap=heatmap),
    ]


def calibration_section(summary: dict[str, float], *, diagram: str | None) -> list[str]:
    """Expected calibration error, NLL and Brier score before and after temperature scaling."""
    lines = [
        "## Calibration (test split)",
        "",
        f"Temperature {summary['temperature']:.3f}, fitted by {summary.get('fitted_by', 'the training worker')}; "
        "bc-predict's probability columns use it.",
        "",
        "| | as trained | temperature-scaled |",
        "|---|---|---|",
        f"| expected calibration error (15 bins) | {100 * summary['ece']:.2f} % | **{100 * summary['ece_scaled']:.2f} %** |",
        f"| negative log-likelihood | {summary['nll']:.4f} | {summary['nll_scaled']:.4f} |",
        f"| Brier score | {summary['brier']:.4f} | {summary['brier_scaled']:.4f} |",
        "",
    ]
    return lines + ([f"![reliability diagram]({diagram})", ""] if diagram else [])
