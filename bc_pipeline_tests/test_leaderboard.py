"""The leaderboard table and page, and lazily loaded partitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.lib.artifacts import PartitionedArtifacts, write_artifact
from bc_pipeline.lib.leaderboard import leaderboard_figure, leaderboard_markdown, leaderboard_table


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
