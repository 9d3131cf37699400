"""Metrics of a classifier on a held-out split: accuracy, weighted and per-class P/R/F1, confusion."""

from __future__ import annotations

from collections.abc import Sequence
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


def report_markdown(evaluation: Evaluation, *, title: str, images: dict[str, str]) -> str:
    """A self-contained Markdown report; ``images`` maps captions to file names beside it."""
    lines = [
        f"# {title}",
        "",
        f"- accuracy: **{evaluation.accuracy:.4f}**",
        *(f"- weighted {name}: {value:.4f}" for name, value in evaluation.weighted.items()),
        "",
        "| class | precision | recall | f1 | support |",
        "|---|---|---|---|---|",
        *(
            f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
            for r in evaluation.per_class.to_dict("records")
        ),
        "",
        *(f"![{caption}]({file})" for caption, file in images.items()),
        "",
    ]
    return "\n".join(lines)
