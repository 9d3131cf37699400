"""`make run`: materialize the whole graph for one or more models, then print the leaderboard.

    python -m bc_pipeline.run [--recipe quick] [--models custom_cnn resnet50] [--config-json '{"ops": {...}}']

A recipe (bc_pipeline/recipes/<name>.yaml, or a path) gives the models and the run config;
``--models`` replaces its models and ``--config-json`` is laid over its config.

The first model's run materializes everything; each further model's run only trains and
evaluates it and refreshes the leaderboard and the submission, reusing the stored upstream
assets. Runs go into the persistent Dagster instance (``DAGSTER_HOME``), so `make dev` shows them.
Run config for assets outside a run's selection is left out of that run. After the whole graph,
the raw source is observed, so `make dev`'s automation compares later changes with what was used.

The runs execute in a child process; this one supervises it. Why: Dagster's in-process execution
defers Ctrl-C and SIGTERM until a step ends, so a run waiting on the ``gpu`` pool could only be
stopped with kill -9. Here Ctrl-C or SIGTERM stops the child's process group within seconds, marks
its runs canceled and frees their pool slots. At start (and every few seconds while waiting), runs
of this host whose process is gone (a run killed with kill -9) are marked failed and their slots
freed, so a crash never blocks the next run, and training resumes from its checkpoint. The child's
full Dagster log goes to ``<BC_DATA_DIR>/logs/run-<time>.log``; the terminal shows a few lines per
stage (``dagster_utils/progress.py``) and ends with the log's path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg

from bc_pipeline.models.zoo import MODEL_NAMES
from bc_pipeline.recipes import DEFAULT_RECIPE, Recipe, load_recipe, merged_config, recipe_names

PER_MODEL = ["trained_model", "evaluation_report", "model_leaderboard", "submission_package"]
STOP_GRACE_SECONDS = 5.0  # after SIGTERM, the child's process group is killed
RELEASE_EVERY_SECONDS = 5.0  # how often a waiting run looks for dead runs holding pool slots
IN_CHILD = "--in-this-process"


def _config_for(run_config: dict, selection: list[str] | None) -> dict:
    if selection is None:
        return run_config
    ops = {name: value for name, value in run_config.get("ops", {}).items() if name in selection}
    return {**run_config, "ops": ops}


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, Recipe, dict]:
    parser = argparse.ArgumentParser(prog="bc-run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"a shipped recipe ({', '.join(recipe_names())}) or a .yaml path")
    parser.add_argument("--models", nargs="+", default=None, help=f"models to train (default: the recipe's): {', '.join(MODEL_NAMES)}")
    parser.add_argument("--config-json", default="{}", help="Dagster run config (ops: {asset: {config: ...}})")
    parser.add_argument(
        "--models-only", action="store_true", help="upstream assets are materialized: train and evaluate the models only"
    )
    parser.add_argument("--log-file", type=Path, default=None, help="the full Dagster log (default: <BC_DATA_DIR>/logs/run-<time>.log)")
    parser.add_argument(IN_CHILD, action="store_true", help=argparse.SUPPRESS)
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
    return args, recipe, run_config


def materialize_models(args: argparse.Namespace, run_config: dict) -> int:
    """The runs themselves (in the child process): the whole graph for the first model, then per model."""
    from bc_pipeline.core.processes import exit_with_parent
    from bc_pipeline.dagster_utils.runs import owner_tags
    from bc_pipeline.definitions import all_asset_checks, all_assets, defs

    exit_with_parent()  # the supervisor was killed: stop (the next bc_pipeline.run ends these runs)
    instance = dg.DagsterInstance.get()
    for position, model in enumerate(args.models):
        selection = None if position == 0 and not args.models_only else PER_MODEL
        print(f"== {model}: {'the whole graph' if selection is None else ', '.join(selection)}", flush=True)
        result = dg.materialize(
            [*all_assets, *all_asset_checks], instance=instance, resources=defs.resources, partition_key=model,
            selection=selection, run_config=_config_for(run_config, selection), raise_on_error=False, tags=owner_tags(),
        )  # fmt: skip
        if not result.success:
            print(f"bc-run: the run for {model} failed (run {result.run_id})", file=sys.stderr)
            return 1
        if selection is None:
            defs.resolve_job_def("observe_raw_source").execute_in_process(instance=instance, tags=owner_tags())
    return 0


def _log_path(args: argparse.Namespace) -> Path:
    from bc_pipeline.defs.resources import default_data_dir

    path = args.log_file or default_data_dir() / "logs" / f"run-{datetime.now():%Y%m%d-%H%M%S}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM the child's process group (the run and its training worker), then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _report(released: list) -> None:
    for item in released:
        print(f"   {item.describe()}", flush=True)


def supervise(argv: list[str], args: argparse.Namespace) -> int:
    """Start the runs in a child process and print their progress; stop them on Ctrl-C or SIGTERM."""
    from bc_pipeline.dagster_utils.instance import get_instance
    from bc_pipeline.dagster_utils.progress import RunProgress
    from bc_pipeline.dagster_utils.runs import release_dead_runs, release_runs_of

    instance = get_instance()
    _report(release_dead_runs(instance))
    log_path = _log_path(args)
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signo, _frame: received.append(signo))
    with open(log_path, "ab") as log:
        child = subprocess.Popen([sys.executable, "-m", "bc_pipeline.run", *argv, IN_CHILD, "--log-file", str(log_path)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    progress = RunProgress(instance, child.pid, emit=lambda line: print(line, flush=True))
    last_release = time.monotonic()
    while child.poll() is None and not received:
        time.sleep(0.25)
        progress.poll()
        if time.monotonic() - last_release > RELEASE_EVERY_SECONDS:
            last_release = time.monotonic()
            _report(release_dead_runs(instance))
    if received:
        name = signal.Signals(received[0]).name
        print(f"bc-run: {name} received: stopping the run", flush=True)
        _stop(child)
        progress.poll()
        _report(release_runs_of(instance, child.pid, canceled=True, reason=f"stopped by {name}"))
        print(f"Full log: {log_path}", flush=True)
        return 128 + received[0]
    progress.poll()
    code = child.returncode
    if code != 0:
        reason = f"its process exited with code {code}"
        _report(release_runs_of(instance, child.pid, canceled=False, reason=reason))
        print(f"bc-run: the run failed (exit code {code}); the log says why", file=sys.stderr, flush=True)
    print(f"Full log: {log_path}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, recipe, run_config = _parse(argv)
    if args.in_this_process:
        return materialize_models(args, run_config)
    print(f"== recipe {recipe.name}: {recipe.description}", flush=True)
    return supervise(argv, args)


if __name__ == "__main__":
    raise SystemExit(main())
