"""`make run`: materialize the whole graph for one or more models, then print the leaderboard.

    python -m bc_pipeline.run [--recipe quick] [--models custom_cnn resnet50] [--config-json '{"ops": {...}}']

A recipe (bc_pipeline/recipes/<name>.yaml, or a path) gives the models and the run config;
``--models`` replaces its models and ``--config-json`` is laid over its config.

The first model's run materializes everything; each further model's run only trains and
evaluates it and refreshes the leaderboard and the submission, reusing the stored upstream
assets. Runs go into the persistent Dagster instance (``DAGSTER_HOME``), so `make dev` shows them.
Run config for assets outside a run's selection is left out of that run. After the whole graph,
the raw source is observed, so `make dev`'s automation compares later changes with what was used.
"""

from __future__ import annotations

import argparse
import json
import sys

import dagster as dg

from bc_pipeline.lib.recipes import DEFAULT_RECIPE, load_recipe, merged_config, recipe_names
from bc_pipeline.lib.zoo import MODEL_NAMES

PER_MODEL = ["trained_model", "evaluation_report", "model_leaderboard", "submission_package"]


def _config_for(run_config: dict, selection: list[str] | None) -> dict:
    if selection is None:
        return run_config
    ops = {name: value for name, value in run_config.get("ops", {}).items() if name in selection}
    return {**run_config, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bc-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"a shipped recipe ({', '.join(recipe_names())}) or a .yaml path")
    parser.add_argument("--models", nargs="+", default=None, help=f"models to train (default: the recipe's): {', '.join(MODEL_NAMES)}")
    parser.add_argument("--config-json", default="{}", help="Dagster run config (ops: {asset: {config: ...}})")
    parser.add_argument(
        "--models-only", action="store_true", help="upstream assets are materialized: train and evaluate the models only"
    )
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except ValueError as error:
        parser.error(str(error))
    args.models = args.models or list(recipe.models) or ["custom_cnn"]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(MODEL_NAMES)}")
    try:
        run_config = merged_config(recipe.run_config, json.loads(args.config_json))
    except json.JSONDecodeError as error:
        parser.error(f"--config-json is not valid JSON: {error}")
    print(f"== recipe {recipe.name}: {recipe.description}", flush=True)

    from bc_pipeline.definitions import all_asset_checks, all_assets, defs

    instance = dg.DagsterInstance.get()
    for position, model in enumerate(args.models):
        selection = None if position == 0 and not args.models_only else PER_MODEL
        print(f"== {model}: {'the whole graph' if selection is None else ', '.join(selection)}", flush=True)
        result = dg.materialize(
            [*all_assets, *all_asset_checks], instance=instance, resources=defs.resources, partition_key=model,
            selection=selection, run_config=_config_for(run_config, selection), raise_on_error=False,
        )  # fmt: skip
        if not result.success:
            print(f"bc-run: the run for {model} failed; see the log above or `make dev` (run {result.run_id})", file=sys.stderr)
            return 1
        if selection is None:
            defs.resolve_job_def("observe_raw_source").execute_in_process(instance=instance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
