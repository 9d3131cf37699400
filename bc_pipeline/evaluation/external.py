"""External labelled sets: another laboratory's cells, scored per model.

A user points the pipeline at folders of their own (or another lab's) labelled cells with
``BC_EXTERNAL_SETS`` (``name=folder;other=folder``), one sub-folder per class named like the
model's classes (case-insensitive). Classes a set lacks are allowed (a lab may have no basophils);
sub-folders named after no class are recorded as skipped, with the reason. Each image is resized to
the pipeline's image size as the raw images are (``ingest.loaders.load_folder``).

Scores (:func:`score_external`): accuracy, balanced accuracy over the classes the set has (so a set
dominated by neutrophils cannot hide a model that calls every lymphocyte an immature granulocyte),
recall per class, and the confusion matrix. Pure numpy and pandas: no TensorFlow, no Dagster.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.evaluation.lab_shift import balanced_accuracy
from bc_pipeline.ingest.loaders import ImageSourceError, load_folder
from bc_pipeline.training.adaptation import AdaptationSettings, adapt, few_shot_split

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_external_sets(text: str) -> dict[str, Path]:
    """``name=folder;other=folder`` (``BC_EXTERNAL_SETS``) as {name: folder}; empty text: no sets.

    Names become column names of the leaderboard: letters, digits, ``_`` and ``-`` only.
    """
    sets: dict[str, Path] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        name, equals, folder = (piece.strip() for piece in item.partition("="))
        if not equals or not name or not folder:
            raise ValueError(f"BC_EXTERNAL_SETS: {item!r} is not name=folder (separate sets with ';')")
        if not _NAME.match(name):
            raise ValueError(f"BC_EXTERNAL_SETS: set name {name!r} may hold only letters, digits, '_' and '-'")
        if name in sets:
            raise ValueError(f"BC_EXTERNAL_SETS: the set name {name!r} is given twice")
        sets[name] = Path(folder).expanduser()
    return sets


@dataclass(frozen=True)
class ExternalImages:
    """All external sets' images, one manifest (``set``, ``source``, ``label``, ``class_name``) and the skips."""

    images: np.ndarray
    manifest: pd.DataFrame
    skipped: pd.DataFrame  # set, source, reason


def load_external_sets(sets: dict[str, Path], *, class_names: Sequence[str], image_size: int) -> ExternalImages:
    """Every set's class folders at ``image_size``; a missing or empty folder is an error naming it."""
    images, manifests, skipped = [], [], []
    for name, folder in sets.items():
        if not folder.is_dir():
            raise ImageSourceError(f"external set {name!r}: folder {folder} not found (BC_EXTERNAL_SETS)")
        loaded = load_folder(folder, image_size=image_size, class_names=class_names, unknown_classes="skip")
        images.append(loaded.images)
        manifests.append(loaded.manifest[["source", "label", "class_name"]].assign(set=name))
        skipped.append(loaded.skipped.assign(set=name))
    if not images:
        return ExternalImages(
            np.zeros((0, image_size, image_size, 3), np.uint8),
            pd.DataFrame(columns=["set", "source", "label", "class_name"]),
            pd.DataFrame(columns=["set", "source", "reason"]),
        )
    manifest = pd.concat(manifests, ignore_index=True)[["set", "source", "label", "class_name"]]
    return ExternalImages(np.concatenate(images), manifest, pd.concat(skipped, ignore_index=True)[["set", "source", "reason"]])


def score_external(truth: np.ndarray, predicted: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy over the classes present, recall per class and the confusion matrix.

    The matrix has a row per class present (given) and a column per class of the model (predicted).
    """
    truth, predicted = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    present = [int(c) for c in np.unique(truth)]
    matrix = np.zeros((len(present), len(class_names)), np.int64)
    for row, c in enumerate(present):
        matrix[row] = np.bincount(predicted[truth == c], minlength=len(class_names))[: len(class_names)]
    recall = {class_names[c]: float(matrix[row, c] / matrix[row].sum()) for row, c in enumerate(present)}
    return {
        "images": int(len(truth)),
        "accuracy": float(np.mean(truth == predicted)) if len(truth) else None,
        "balanced_accuracy": balanced_accuracy(truth, predicted) if len(truth) else None,
        "classes": [class_names[c] for c in present],
        "recall": recall,
        "confusion": pd.DataFrame(matrix, index=[class_names[c] for c in present], columns=list(class_names)),
    }


def confusions_in_words(score: dict[str, Any], top: int = 3) -> list[str]:
    """The largest off-diagonal cells of a set's confusion matrix, as sentences for the report."""
    confusion: pd.DataFrame = score["confusion"]
    cells = [
        (int(confusion.loc[given, predicted]), given, predicted)
        for given in confusion.index for predicted in confusion.columns if predicted != given
    ]  # fmt: skip
    lines = []
    for count, given, predicted in sorted(cells, reverse=True)[:top]:
        if count:
            total = int(confusion.loc[given].sum())
            lines.append(f"{count} of {total} {given} called {predicted} ({count / total:.0%})")
    return lines


def adaptation_curve(
    load_model: Callable[[], Any],
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    shots: Sequence[int] = (5, 10, 25, 50),
    settings: AdaptationSettings = AdaptationSettings(),
    log: Callable[[str], None] = lambda message: None,
) -> pd.DataFrame:
    """Accuracy on the rest of a lab's cells after adapting a fresh copy of the model on ``k`` per class.

    ``load_model`` returns the trained model afresh (each point starts from it). The first row
    (0 cells) is the model as trained. Every point is scored on the same cells, those the largest
    draw leaves out: a smaller draw is a prefix of a larger one (one permutation per class).
    """
    from bc_pipeline.models.inference import predict_proba

    _, rest = few_shot_split(labels, max(shots, default=0), seed=settings.seed)
    rows = []
    for k in [0, *shots]:
        labelled = few_shot_split(labels, k, seed=settings.seed)[0]
        model = load_model()
        if k:
            adapt(model, images[labelled], np.asarray(labels)[labelled], settings)
        score = score_external(np.asarray(labels)[rest], predict_proba(model, images[rest]).argmax(1), class_names)
        rows.append({"per_class": k, "labelled": len(labelled), "evaluated": len(rest),
                     "accuracy": score["accuracy"], "balanced_accuracy": score["balanced_accuracy"]})  # fmt: skip
        log(f"{k} labelled per class ({len(labelled)} cells): accuracy {score['accuracy']:.3f}, "
            f"balanced {score['balanced_accuracy']:.3f} on {len(rest)} others")  # fmt: skip
    return pd.DataFrame(rows)
