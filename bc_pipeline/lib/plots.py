"""Figures for the UI and the reports, rendered off-screen to PNG bytes."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Inline PNG for Dagster's Markdown metadata (renders on the asset page)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def class_sample_grid(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, per_class: int = 8, seed: int = 0
) -> bytes:
    """A row of random examples for each class."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    rows = len(class_names)
    figure, axes = plt.subplots(rows, per_class, figsize=(per_class * 1.1, rows * 1.15), squeeze=False)
    for label, name in enumerate(class_names):
        members = np.nonzero(labels == label)[0]
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for column in range(per_class):
            axis = axes[label, column]
            axis.axis("off")
            if column < len(chosen):
                axis.imshow(images[chosen[column]])
        axes[label, 0].set_title(f"{name} ({len(members)})", fontsize=8, loc="left")
    figure.tight_layout()
    return figure_png(figure)


def group_examples(
    images: np.ndarray, groups: Sequence[Sequence[int]], captions: Sequence[str], *, max_members: int = 6
) -> bytes:
    """One row per group showing its members side by side."""
    plt = _pyplot()
    rows = max(1, len(groups))
    figure, axes = plt.subplots(rows, max_members, figsize=(max_members * 1.2, rows * 1.35), squeeze=False)
    for row in range(rows):
        members = list(groups[row])[:max_members] if row < len(groups) else []
        for column in range(max_members):
            axis = axes[row, column]
            axis.axis("off")
            if column < len(members):
                axis.imshow(images[members[column]])
                axis.set_title(f"#{members[column]}", fontsize=7)
        if row < len(captions):
            axes[row, 0].text(0, -0.35, captions[row], transform=axes[row, 0].transAxes, fontsize=7)
    figure.tight_layout()
    return figure_png(figure)


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Counts, with each cell shaded by its share of the true class (row-normalised)."""
    plt = _pyplot()
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
    figure, axis = plt.subplots(figsize=(7, 6))
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    for i in ticks:
        for j in ticks:
            colour = "white" if shares[i, j] > 0.5 else "black"
            axis.text(j, i, str(confusion[i, j]), ha="center", va="center", color=colour, fontsize=8)
    axis.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    return figure_png(figure)


def training_curves_figure(history: pd.DataFrame) -> bytes:
    """Loss and accuracy per epoch, training and validation."""
    plt = _pyplot()
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, metric in ((loss_axis, "loss"), (acc_axis, "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            column = prefix + metric
            if column in history:
                axis.plot(history["epoch"], history[column], style, marker="o", label=column)
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return figure_png(figure)
