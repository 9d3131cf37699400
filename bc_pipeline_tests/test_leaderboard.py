"""The leaderboard table and page, and lazily loaded partitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.core.artifacts import PartitionedArtifacts, write_artifact
from bc_pipeline.evaluation.leaderboard import leaderboard_figure, leaderboard_markdown, leaderboard_table


def _summary(accuracy, robust, params, tta=None):
    return {"accuracy": accuracy, "robust_accuracy": robust, "accuracy_tta": tta, "parameters": params,
            "train_seconds": 100.0, "inference_images_per_second": 500.0, "weighted": {"f1": accuracy - 0.01}}  # fmt: skip


def test_leaderboard_ranks_by_the_chosen_column_and_breaks_ties_by_size():
    summaries = {
        "big": _summary(0.90, 0.40, 25_000_000),
        "small": _summary(0.90, 0.30, 1_000_000, tta=0.91),
        "best": _summary(0.95, 0.20, 6_000_000),
    }
    table = leaderboard_table(summaries)
    assert table["model"].tolist() == ["best", "small", "big"] and table["rank"].tolist() == [1, 2, 3]
    assert table.loc[table["model"] == "small", "weighted_f1"].item() == pytest.approx(0.89)
    assert np.isnan(table.loc[table["model"] == "big", "accuracy_tta"].item())
    assert leaderboard_table(summaries, rank_by="robust_accuracy")["model"].tolist() == ["big", "small", "best"]
    # A model without TTA scores ranks after those with them instead of failing.
    assert leaderboard_table(summaries, rank_by="accuracy_tta")["model"].tolist()[0] == "small"
    with pytest.raises(ValueError, match="rank_by"):
        leaderboard_table(summaries, rank_by="loss")
    page = leaderboard_markdown(table, rank_by="accuracy", missing=["resnet50"])
    assert "| 1 | best | 0.9500 |" in page and "25.0M" in page and "Not evaluated yet: resnet50." in page
    assert leaderboard_figure(table).startswith(b"\x89PNG")


def test_partitioned_artifacts_load_lazily_and_name_the_missing_ones(tmp_path):
    write_artifact(tmp_path / "a", {"accuracy": 0.9})
    write_artifact(tmp_path / "c", pd.DataFrame({"x": [1]}))
    stored = PartitionedArtifacts(tmp_path, ["a", "b", "c"], what="evaluation_report")
    assert list(stored) == ["a", "c"] and stored.missing == ["b"] and len(stored) == 2
    assert stored["a"] == {"accuracy": 0.9}
    assert stored["c"]["x"].tolist() == [1]
    with pytest.raises(KeyError, match="not stored"):
        stored["b"]


def test_mce_is_relative_to_the_named_baseline_and_ranks_by_corruption_accuracy():
    def corruptions(errors: dict[str, list[float]]) -> list[dict]:
        return [
            {"corruption": c, "severity": s + 1, "family": "x", "images": 10, "accuracy": 1 - e, "error": e}
            for c, per_severity in errors.items() for s, e in enumerate(per_severity)
        ]  # fmt: skip

    base = {**_summary(0.90, 0.3, 1_000_000), "corruptions": corruptions({"fog": [0.2, 0.6], "snow": [0.3, 0.5]})}
    better = {**_summary(0.92, 0.3, 2_000_000), "corruptions": corruptions({"fog": [0.1, 0.3], "snow": [0.3, 0.5]})}
    for summary in (base, better):
        summary["corruption_accuracy"] = float(np.mean([1 - r["error"] for r in summary["corruptions"]]))
    table = leaderboard_table({"base": base, "better": better}, rank_by="corruption_accuracy", mce_baseline="base")
    assert table["model"].tolist() == ["better", "base"]
    rows = table.set_index("model")
    assert rows.loc["base", "mce"] == pytest.approx(1.0)
    assert rows.loc["better", "mce"] == pytest.approx((0.4 / 0.8 + 1.0) / 2)  # fog halved, snow the same
    # relative: errors above each model's clean error (0.08 vs the baseline's 0.10)
    assert rows.loc["better", "relative_mce"] == pytest.approx(((0.4 - 0.16) / (0.8 - 0.2) + (0.8 - 0.16) / (0.8 - 0.2)) / 2)
    without = leaderboard_table({"base": base, "better": better}, mce_baseline="resnet50")
    assert without["mce"].isna().all(), "no baseline evaluated: no mCE, rather than a wrong one"
    page = leaderboard_markdown(table, rank_by="corruption_accuracy", mce_baseline="base")
    assert "mCE" in page and "relative to `base`" in page and "| 100.0 % |" in page
