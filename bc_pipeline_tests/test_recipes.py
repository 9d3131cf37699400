"""Shipped recipes: each loads, names registered models, and validates as the whole graph's run config."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from bc_pipeline.definitions import defs
from bc_pipeline.models.zoo import REGISTRY
from bc_pipeline.recipes import load_recipe, merged_config, recipe_names


def test_the_three_named_recipes_are_shipped():
    assert {"quick", "robust-cpu", "gpu"} <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_each_recipe_is_a_valid_run_config_and_a_job_of_the_ui(name: str):
    recipe = load_recipe(name)
    assert recipe.description and recipe.models
    assert set(recipe.models) <= set(REGISTRY)
    job = defs.resolve_job_def(f"recipe_{name.replace('-', '_')}")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} >= {"trained_model", "corruption_benchmark_set"}
    dg.validate_run_config(job, recipe.run_config)  # raises on an unknown field or a bad value
    assert job.partitioned_config.get_run_config_for_partition_key(recipe.models[0]) == recipe.run_config, "the launchpad opens with it"


def test_bad_recipes_fail_with_a_clear_message(tmp_path: Path):
    with pytest.raises(ValueError, match="no recipe 'fastest'; shipped recipes: .*quick"):
        load_recipe("fastest")
    broken = tmp_path / "broken.yaml"
    broken.write_text("ops: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(str(broken))
    extra = tmp_path / "extra.yaml"
    extra.write_text("models: [custom_cnn]\nepochs: 3\n")
    with pytest.raises(ValueError, match="unexpected: \\['epochs'\\]"):
        load_recipe(str(extra))


def test_make_run_lays_its_config_over_the_recipe(capsys):
    from bc_pipeline.run import main

    assert merged_config(
        {"ops": {"trained_model": {"config": {"epochs": 30, "image_size": 64}}}},
        {"ops": {"trained_model": {"config": {"epochs": 1}}}},
    ) == {"ops": {"trained_model": {"config": {"epochs": 1, "image_size": 64}}}}
    with pytest.raises(SystemExit):
        main(["--recipe", "fastest"])
    assert "no recipe 'fastest'" in capsys.readouterr().err
