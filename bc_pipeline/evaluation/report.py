"""The Markdown of an evaluation report: the headline table, per-class scores, and its sections.

:func:`bc_pipeline.evaluation.evaluate.evaluate_model` scores; this module only writes the words
and tables a reader sees in ``report.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from bc_pipeline.evaluation.imagenet_c import corruption_markdown
from bc_pipeline.evaluation.metrics import CorruptionResult, Scored


def report_markdown(
    plain: Scored,
    tta: Scored | None,
    *,
    title: str,
    images: dict[str, str],
    robust_policy: str = "strong",
    robustness: pd.DataFrame | None = None,
    trained_presets: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
) -> str:
    """A self-contained Markdown report; ``images`` maps captions to file names beside it.

    ``plain`` is the model scored as it is, ``tta`` (or None) with test-time augmentation; both are
    shown side by side. With ``robustness`` (see :func:`~bc_pipeline.evaluation.metrics.policy_scores`)
    the report gains a table per perturbation policy; a ``robust_recall`` column in ``per_class`` is
    shown too. The policy table is labelled as what it is, the families augmentation trains on, with
    the ``trained_presets`` the model saw marked; ``extra_sections`` (Markdown) come before it.
    """
    evaluation, robust_accuracy = plain.evaluation, plain.robust_accuracy
    robust_accuracy_tta, tta = (tta.robust_accuracy, tta.evaluation) if tta else (None, None)
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


def corruption_section(result: CorruptionResult, *, clean_accuracy: float, heatmap: str | None) -> list[str]:
    """The report's robustness benchmark: the headline numbers, then the table and its heatmap."""
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
