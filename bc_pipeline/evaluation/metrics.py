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
