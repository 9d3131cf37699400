"""Compare evaluated models: one ranked table, and accuracy against what each model costs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.plots import _pyplot, figure_png
from bc_pipeline.core.settings import declare

# Columns a leaderboard can be ranked by (higher is better for all of them).
RANK_COLUMNS = (
    "accuracy", "corruption_accuracy", "corruption_accuracy_unseen", "robust_accuracy", "accuracy_tta",
    "robust_accuracy_tta", "weighted_f1",
)  # fmt: skip
COLUMNS = [
    "rank", "model", "accuracy", "corruption_accuracy", "corruption_accuracy_unseen", "mce", "relative_mce",
    "ece_scaled", "robust_accuracy", "accuracy_tta", "robust_accuracy_tta", "weighted_f1",
    "parameters", "train_seconds", "inference_images_per_second", "image_size", "epochs_run", "device",
]  # fmt: skip
# Read from the models' domain_shift_report summaries (evaluation.domain_shift), when there are any.
SHIFT_COLUMNS = ("shift_accuracy", "shift_accuracy_unseen", "lab_shift_accuracy")
# Computed here from every model's corruption table, not read from one summary.
_DERIVED = ("weighted_f1", "mce", "relative_mce")


@dataclass(frozen=True)
class LeaderboardSettings:
    """How the leaderboard ranks (the ``model_leaderboard`` asset's config)."""

    rank_by: str = declare("accuracy", f"Column to rank by: one of {', '.join(RANK_COLUMNS)}.")
    mce_baseline: str = declare("custom_cnn", "Model the mean corruption error (mCE) is relative to.")

    def __post_init__(self) -> None:
        if self.rank_by not in RANK_COLUMNS:
            raise ValueError(f"rank_by must be one of {', '.join(RANK_COLUMNS)}, not {self.rank_by!r}")


def leaderboard_table(
    summaries: Mapping[str, Mapping[str, Any]],
    *,
    rank_by: str = LeaderboardSettings.rank_by,
    mce_baseline: str | None = None,
    domain_shift: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """One row per model from its evaluation summary, best first by ``rank_by`` (ties: fewer parameters).

    ``mce`` and ``relative_mce`` are ImageNet-C's mean corruption errors relative to the model
    ``mce_baseline`` (evaluation.imagenet_c.corruption_errors); empty when that model is not evaluated.
    ``domain_shift``: the models' ``domain_shift_report`` summaries, whose :func:`shift_columns` are
    appended (empty for a model without one).
    """
    if rank_by not in RANK_COLUMNS:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_COLUMNS)}, not {rank_by!r}")
    rows = []
    for name, summary in summaries.items():
        mce, relative_mce = _mce(summary, summaries.get(mce_baseline) if mce_baseline else None)
        rows.append(
            {
                "model": name,
                **{key: summary.get(key) for key in COLUMNS[2:] if key not in _DERIVED},
                "weighted_f1": (summary.get("weighted") or {}).get("f1"),
                "mce": mce,
                "relative_mce": relative_mce,
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS[1:])
    numeric = [c for c in COLUMNS[2:] if c != "device"]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    shift = pd.DataFrame([{"model": name, **shift_columns(summary)} for name, summary in (domain_shift or {}).items()])
    if len(shift):
        table = table.merge(shift, on="model", how="left")
    table = table.sort_values([rank_by, "parameters"], ascending=[False, True], na_position="last", kind="stable")
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table.reset_index(drop=True)


def shift_columns(summary: Mapping[str, Any]) -> dict[str, float | None]:
    """A ``domain_shift_report`` summary's leaderboard columns: the lab-shift means, then per external set
    ``<set>_accuracy`` and ``<set>_balanced_accuracy``, as given and at the set's calibrated framing
    (``<set>_framed_...``, evaluation.framing)."""
    columns = {key: summary.get(key) for key in SHIFT_COLUMNS}
    for name, score in (summary.get("external") or {}).items():
        framed = score.get("framed") or {}
        for metric in ("accuracy", "balanced_accuracy"):
            columns[f"{name}_{metric}"] = score.get(metric)
            columns[f"{name}_framed_{metric}"] = framed.get(metric)
    return columns


def _mce(summary: Mapping[str, Any], baseline: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    from bc_pipeline.evaluation.imagenet_c import corruption_errors, mean_corruption_error

    if not baseline or not summary.get("corruptions") or not baseline.get("corruptions"):
        return None, None
    errors = corruption_errors(
        pd.DataFrame(summary["corruptions"]), pd.DataFrame(baseline["corruptions"]),
        clean_error=1 - summary["accuracy"], baseline_clean_error=1 - baseline["accuracy"],
    )  # fmt: skip
    return mean_corruption_error(errors)


def leaderboard_markdown(
    table: pd.DataFrame, *, rank_by: str, missing: Sequence[str] = (), mce_baseline: str | None = None
) -> str:
    """The leaderboard as a Markdown page next to its plot."""
    header = (
        "| rank | model | accuracy | mCA (corruptions) | mCA (unseen families) | mCE | ECE (scaled) | training-family robust "
        "| accuracy (TTA) | robust (TTA) | parameters | train s | images/s |"
    )
    lines = [f"# Model leaderboard (ranked by {rank_by})", "", header, "|---" * 13 + "|"]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['rank']} | {r['model']} | {_fmt(r['accuracy'])} | {_fmt(r['corruption_accuracy'])} "
            f"| {_fmt(r['corruption_accuracy_unseen'])} | {_percent(r['mce'])} | {_percent(r['ece_scaled'], '.2f')} "
            f"| {_fmt(r['robust_accuracy'])} | {_fmt(r['accuracy_tta'])} | {_fmt(r['robust_accuracy_tta'])} "
            f"| {_count(r['parameters'])} | {_fmt(r['train_seconds'], '.0f')} | {_fmt(r['inference_images_per_second'], '.0f')} |"
        )
    lines += [
        "",
        "mCA: mean accuracy over the ImageNet-C corruption suite (15 corruptions x 5 severities, never used in "
        "training); 'unseen families' leaves out the corruptions a model's training presets resemble. "
        f"mCE: ImageNet-C's mean corruption error relative to `{mce_baseline or '-'}` (100 % = as bad as it; lower is better). "
        "ECE: expected calibration error after temperature scaling. 'training-family robust' is the test split "
        "under the keras-cv `strong` preset, a family augmentation trains on.",
    ]
    lines += _shift_markdown(table)
    if missing:
        lines += ["", f"Not evaluated yet: {', '.join(missing)}."]
    return "\n".join([*lines, "", "![accuracy against cost](leaderboard.png)", ""])


def _shift_markdown(table: pd.DataFrame) -> list[str]:
    """The lab-shift columns as a second table (none when no model has a ``domain_shift_report``)."""
    if "shift_accuracy" not in table:
        return []
    ends = [c[: -len("_balanced_accuracy")] for c in table.columns if c.endswith("_balanced_accuracy")]
    external = [name for name in ends if f"{name}_framed" in ends]
    header = ["model", "lab shifts (mean)", "unseen shifts", "all four at once"]
    header += [f"{name} (acc / balanced; framing calibrated)" for name in external]
    lines = ["", "## Lab shift", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in table.to_dict("records"):
        cells = [r["model"], _fmt(r["shift_accuracy"]), _fmt(r["shift_accuracy_unseen"]), _fmt(r["lab_shift_accuracy"])]
        cells += [f"{_fmt(r[f'{name}_accuracy'])} / {_fmt(r[f'{name}_balanced_accuracy'])}; "
                  f"{_fmt(r[f'{name}_framed_accuracy'])} / {_fmt(r[f'{name}_framed_balanced_accuracy'])}" for name in external]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return [*lines, "", "Lab shifts: the test split under another stain, white balance, crop and optics (never used in "
            "training); the external sets are other labs' cells (`BC_EXTERNAL_SETS`), balanced accuracy over the classes each has, "
            "as given and at the zoom the set's own unlabelled images point to (evaluation.framing)."]


def leaderboard_figure(table: pd.DataFrame) -> bytes:
    """Accuracy (clean and robust) against training time and against inference speed.

    Marker area grows with the parameter count, so the plot answers the question a leaderboard
    is for: how much accuracy each model buys, and at what price.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    params = table["parameters"].fillna(0).to_numpy(float)
    sizes = 30 + 270 * np.sqrt(params / max(params.max(), 1.0))
    for ax, cost, label in (
        (axes[0], "train_seconds", "training time (s, log scale)"),
        (axes[1], "inference_images_per_second", "inference images/s (log scale)"),
    ):
        x = table[cost].to_numpy(float)
        ax.scatter(x, table["accuracy"], s=sizes, alpha=0.75, label="clean accuracy")
        if table["corruption_accuracy"].notna().any():
            ax.scatter(x, table["corruption_accuracy"], s=sizes, alpha=0.75, marker="s", label="mean corruption accuracy")
        for xi, yi, name in zip(x, table["accuracy"], table["model"]):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if np.all(x[np.isfinite(x)] > 0) and np.isfinite(x).any():
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Accuracy against cost (marker area: parameters)")
    return figure_png(fig)


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def _percent(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:{spec}} %"


def _count(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{int(value):,}"
