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
    """One row per group showing its members side by side, the group's caption on the left."""
    plt = _pyplot()
    rows = max(1, len(groups))
    columns = max(2, min(max_members, max((len(g) for g in groups), default=2)))
    figure, axes = plt.subplots(rows, columns, figsize=(1.5 + columns * 1.6, rows * 1.7), squeeze=False)
    for row in range(rows):
        members = list(groups[row])[:columns] if row < len(groups) else []
        for column in range(columns):
            axis = axes[row, column]
            if column >= len(members):
                axis.axis("off")
                continue
            axis.imshow(images[members[column]])
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"#{members[column]}", fontsize=8)
        if row < len(captions):
            axes[row, 0].set_ylabel(captions[row], rotation=0, ha="right", va="center", fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str]) -> bytes:
    """Counts, with each cell shaded by its share of the true class (row-normalised)."""
    plt = _pyplot()
    totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
    figure, axis = plt.subplots(figsize=(7, 6))
    axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = _class_axes(axis, class_names, "predicted", "true")
    for i in ticks:
        for j in ticks:
            colour = "white" if shares[i, j] > 0.5 else "black"
            axis.text(j, i, str(confusion[i, j]), ha="center", va="center", color=colour, fontsize=8)
    axis.set_title("Confusion matrix (test split)")
    figure.tight_layout()
    return figure_png(figure)


def training_curves_figure(history: pd.DataFrame) -> bytes:
    """Loss and accuracy per epoch, training and validation; the best epoch and phase starts marked."""
    plt = _pyplot()
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    if not len(history):  # an ensemble trains nothing itself
        for axis in (loss_axis, acc_axis):
            axis.text(0.5, 0.5, "no training history (an ensemble of trained models)", ha="center", va="center")
            axis.set_axis_off()
        return figure_png(figure)
    last = history[history["phase"] == history["phase"].max()] if "phase" in history else history
    best_epoch = int(last.loc[last["val_loss"].idxmin(), "epoch"]) if "val_loss" in last else None  # what the model keeps
    for axis, metric in ((loss_axis, "loss"), (acc_axis, "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            column = prefix + metric
            if column in history:
                axis.plot(history["epoch"], history[column], style, marker="o", label=column)
        if best_epoch is not None:
            axis.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        for start in _phase_starts(history):
            axis.axvline(start - 0.5, color="tab:purple", alpha=0.4, linestyle="-.")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    return figure_png(figure)


def _phase_starts(history: pd.DataFrame) -> list[int]:
    """First epoch of every phase after the first (a fine-tuning schedule changes course there)."""
    if "phase" not in history or history["phase"].nunique() < 2:
        return []
    changes = history["phase"].ne(history["phase"].shift()) & history.index.to_series().gt(history.index[0])
    return history.loc[changes, "epoch"].astype(int).tolist()


def score_histogram(scores: np.ndarray, label: str, threshold: float | None = None) -> bytes:
    """Distribution of a per-image score on a log scale, so the tail of rare images is visible."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.hist(scores, bins=80, log=True, color="tab:blue")
    if threshold is not None:
        axis.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        axis.legend()
    axis.set_xlabel(label)
    axis.set_ylabel("images (log)")
    figure.tight_layout()
    return figure_png(figure)


def template_grid(templates: np.ndarray, summary: pd.DataFrame | None = None) -> bytes:
    """The recovered templates side by side, each titled with its members and cell-share spread."""
    plt = _pyplot()
    count = len(templates)
    figure, axes = plt.subplots(1, count, figsize=(2.3 * count, 2.7), squeeze=False)
    rows = {int(r.template): r for r in summary.itertuples()} if summary is not None else {}
    for k, axis in enumerate(axes[0]):
        axis.imshow(np.clip(np.rint(templates[k]), 0, 255).astype(np.uint8))
        title = f"template {k}"
        if k in rows:
            r = rows[k]
            title += f"\n{r.blends} blends, {r.copies} copies\na {r.weight_min:.2f}-{r.weight_max:.2f}"
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    return figure_png(figure)


def decomposition_examples(images: np.ndarray, templates: np.ndarray, rows: pd.DataFrame) -> bytes:
    """Rows of A = a*B + (1-a)*C: the corrupted image, its base, the template, the reconstruction."""
    plt = _pyplot()
    count = max(1, len(rows))
    figure, axes = plt.subplots(count, 4, figsize=(8, 2.2 * count), squeeze=False)
    for axis_row, row in zip(axes, rows.itertuples()):
        a, b = images[row.index].astype(np.float64), images[row.base_index].astype(np.float64)
        c = templates[row.template]
        rebuilt = row.weight * b + (1 - row.weight) * c
        panels = [
            (a, f"A: image {row.index}"),
            (b, f"B: base {row.base_index}"),
            (c, f"C: template {row.template}"),
            (rebuilt, f"{row.weight:.2f}*B + {1 - row.weight:.2f}*C"),
        ]
        for axis, (picture, title) in zip(axis_row, panels):
            axis.imshow(np.clip(np.rint(picture), 0, 255).astype(np.uint8))
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    figure.tight_layout()
    return figure_png(figure)


def image_rows(rows: Sequence[tuple[str, np.ndarray]], *, columns: int = 8, title: str | None = None) -> bytes:
    """One row of images per (caption, images) pair; the caption sits left of its row.

    The shape of the sample grids of the balancing and augmentation stages: a class's synthetic
    samples, or the same images under each augmentation policy, one row each.
    """
    plt = _pyplot()
    count = max(1, len(rows))
    figure, axes = plt.subplots(count, columns, figsize=(1.6 + columns * 1.1, count * 1.15), squeeze=False)
    for axis_row, (caption, images) in zip(axes, [*rows, *[("", np.zeros((0,)))] * (count - len(rows))]):
        for column, axis in enumerate(axis_row):
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if column < len(images):
                axis.imshow(np.asarray(images[column]))
        axis_row[0].set_ylabel(caption, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_png(figure)


def gradcam_grid(
    images: np.ndarray, heatmaps: np.ndarray, titles: Sequence[str], *, columns: int = 4, title: str | None = None
) -> bytes:
    """Each image with its Grad-CAM heatmap laid over it (jet, semi-transparent), a caption above.

    The image stays visible under the heatmap so one can tell whether the model looks at the
    cell's nucleus and cytoplasm or at the background around it.
    """
    plt = _pyplot()
    count = len(images)
    columns = max(1, min(columns, count or 1))
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.05), squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position >= count:
            continue
        image = np.asarray(images[position])
        height, width = image.shape[:2]
        axis.imshow(image)
        axis.imshow(
            np.asarray(heatmaps[position]), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear",
        )  # fmt: skip
        if position < len(titles):
            axis.set_title(titles[position], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_png(figure)


def reliability_figure(before, after, *, temperature: float, title: str = "Reliability (test split)") -> bytes:
    """Accuracy against confidence per bin, before and after temperature scaling.

    ``before`` and ``after`` are :class:`bc_pipeline.models.calibration.Reliability`. A calibrated
    model's bars touch the diagonal; bars below it are over-confidence.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for axis, data, label in ((axes[0], before, "as trained"), (axes[1], after, f"temperature {temperature:.2f}")):
        centres = (data.edges[:-1] + data.edges[1:]) / 2
        width = data.edges[1] - data.edges[0]
        filled = data.counts > 0
        axis.bar(centres[filled], data.accuracy[filled], width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
        low, gap = np.minimum(data.accuracy, data.confidence), np.abs(data.confidence - data.accuracy)
        axis.bar(centres[filled], gap[filled], bottom=low[filled], width=width * 0.95, fill=False, hatch="//",
                 edgecolor="tab:red", label="gap to confidence")  # fmt: skip
        axis.plot([0, 1], [0, 1], "k--", linewidth=1)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence (top probability)")
        axis.set_title(f"{label}: ECE {100 * data.ece:.2f} %")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure_png(figure)


def corruption_heatmap(table: pd.DataFrame, *, title: str) -> bytes:
    """Accuracy per corruption (rows) and severity (columns), with each row's mean on the right.

    ``table`` has ``corruption``, ``severity`` and ``accuracy`` columns (evaluation.imagenet_c).
    """
    plt = _pyplot()
    grid = table.pivot_table(index="corruption", columns="severity", values="accuracy", sort=False)
    grid["mean"] = grid.mean(axis=1)
    values = grid.to_numpy(float)
    figure, axis = plt.subplots(figsize=(1.0 * values.shape[1] + 3, 0.36 * values.shape[0] + 1.4))
    axis.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(np.arange(values.shape[1]), [str(c) for c in grid.columns])
    axis.set_yticks(np.arange(values.shape[0]), list(grid.index))
    axis.set_xlabel("severity")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            axis.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=7)
    axis.axvline(values.shape[1] - 1.5, color="black", linewidth=1)
    axis.set_title(title)
    figure.tight_layout()
    return figure_png(figure)


def adaptation_figure(curve: pd.DataFrame, *, title: str) -> bytes:
    """Accuracy and balanced accuracy against labelled cells per class (``training.adaptation.adaptation_curve``)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for column, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
        axis.plot(curve["per_class"], curve[column], marker="o", label=label)
    axis.set_xlabel("labelled cells per class (0: as trained)")
    axis.set_ylabel("on the lab's other cells")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    axis.set_title(title)
    return figure_png(figure)


def _class_axes(axis, class_names: Sequence[str], xlabel: str, ylabel: str) -> np.ndarray:  # noqa: ANN001 - a matplotlib Axes
    """Class names on both axes of a class-by-class matrix; returns the tick positions."""
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    return ticks


def noise_matrix_figure(matrix: np.ndarray, class_names: Sequence[str], *, title: str) -> bytes:
    """P(likely true class | given class) as a heatmap, each cell's share written in it (rows sum to 1)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 6))
    top = max(0.05, float(np.max(matrix - np.diag(np.diag(matrix)), initial=0)))
    axis.imshow(matrix, cmap="Reds", vmin=0, vmax=top)
    ticks = _class_axes(axis, class_names, "likely true class", "given label")
    for i in ticks:
        for j in ticks:
            axis.text(j, i, f"{matrix[i, j]:.3f}" if i != j else f"({matrix[i, j]:.2f})", ha="center", va="center", fontsize=7,
                      color="white" if matrix[i, j] > 0.6 * top else "black")  # fmt: skip
    axis.set_title(title)
    figure.tight_layout()
    return figure_png(figure)


def captioned_grid(images: Sequence[np.ndarray], captions: Sequence[str], *, columns: int = 6, title: str | None = None) -> bytes:
    """Images in a grid, each with its caption (a few short lines) above it."""
    plt = _pyplot()
    rows = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.5, rows * 1.8), squeeze=False)
    for k, axis in enumerate(axes.ravel()):
        axis.axis("off")
        if k < len(images):
            axis.imshow(np.asarray(images[k]))
            axis.set_title(captions[k], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure_png(figure)
