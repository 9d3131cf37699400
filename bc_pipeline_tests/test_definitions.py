"""The code location loads, every asset is versioned, and importing it stays light.

The definitions are pinned here (assets, checks, jobs, schedules, sensors, resources): adding or
removing one is a decision this file records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from bc_pipeline.definitions import defs

EXPECTED_ASSETS = {
    "raw_images",
    "image_hashes",
    "duplicate_groups",
    "image_colour_stats",
    "corruption_report",
    "noise_templates",
    "outlier_report",
    "clean_images",
    "data_splits",
    "label_probabilities",
    "label_issues",
    "balanced_train_set",
    "augmented_train_set",
    "robustness_eval_sets",
    "corruption_benchmark_set",
    "domain_shift_set",
    "external_sets",
    "trained_model",
    "domain_shift_report",
    "lab_adaptation",
    "evaluation_report",
    "model_leaderboard",
    "submission_package",
}

EXPECTED_CHECKS = {
    "data_splits:no_image_in_two_splits",
    "data_splits:no_group_in_two_splits",
    "data_splits:class_proportions_match",
    "data_splits:no_flagged_image_in_splits",
    "augmented_train_set:shards_match_balanced_set",
}
EXPECTED_JOBS = {"observe_raw_source", "nightly_evaluation", "weekly_retrain", "recipe_quick", "recipe_robust_cpu", "recipe_transfer_cpu", "recipe_lab_cpu", "recipe_gpu"}
EXPECTED_SCHEDULES = {"nightly_evaluation": "0 2 * * *", "weekly_retrain": "0 3 * * 0"}
EXPECTED_SENSORS = {"bc_automation", "raw_data_sensor", "label_review_sensor"}
SOURCES = {"raw_image_source", "label_decisions"}  # observed, never materialized
EXPECTED_RESOURCES = {"io_manager", "storage", "image_source", "training_worker", "external_folders"}


def test_dg_checks_and_lists_exactly_the_pinned_definitions():
    """`dg check defs` passes and `dg list defs` (autoloaded from defs/) lists exactly the pinned definitions."""
    dg_cli = str(Path(sys.executable).with_name("dg"))
    root = Path(__file__).resolve().parents[1]
    checked = subprocess.run([dg_cli, "check", "defs"], cwd=root, capture_output=True, text=True)
    assert checked.returncode == 0 and "All definitions loaded successfully" in checked.stdout, checked.stdout + checked.stderr
    listed = subprocess.run([dg_cli, "list", "defs", "--json"], cwd=root, capture_output=True, text=True, check=True)
    found = json.loads(listed.stdout)
    assert {a["asset_key"] for a in found["assets"]} == EXPECTED_ASSETS | SOURCES
    assert {c["key"] for c in found["asset_checks"]} == EXPECTED_CHECKS
    assert {j["name"] for j in found["jobs"]} == EXPECTED_JOBS
    assert {s["name"]: s["cron_schedule"] for s in found["schedules"]} == EXPECTED_SCHEDULES
    assert {s["name"] for s in found["sensors"]} == EXPECTED_SENSORS
    assert {r["name"] for r in found["resources"]} == EXPECTED_RESOURCES


def test_the_loaded_definitions_are_the_pinned_ones():
    assert {job.name for job in defs.jobs} == EXPECTED_JOBS
    assert {schedule.name: schedule.cron_schedule for schedule in defs.schedules} == EXPECTED_SCHEDULES
    assert {sensor.name for sensor in defs.sensors} == EXPECTED_SENSORS
    assert set(defs.resources) == EXPECTED_RESOURCES
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string() for key in graph.asset_check_keys} == EXPECTED_CHECKS


def test_definitions_load_with_the_whole_graph():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == EXPECTED_ASSETS | SOURCES
    assert {key.to_user_string() for key in graph.materializable_asset_keys} == EXPECTED_ASSETS
    assert all(graph.get(dg.AssetKey(key)).is_observable for key in SOURCES)
    parents = {key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys} for key in graph.get_all_asset_keys()}
    assert parents["raw_images"] == {"raw_image_source"}
    assert parents["clean_images"] == {"raw_images", "duplicate_groups", "outlier_report", "corruption_report", "label_decisions"}
    assert parents["label_probabilities"] == {"clean_images", "data_splits"}
    assert parents["label_issues"] == {"label_probabilities", "clean_images"}
    assert parents["balanced_train_set"] == {"clean_images", "data_splits"}
    assert parents["augmented_train_set"] == {"balanced_train_set"}
    assert parents["robustness_eval_sets"] == {"clean_images", "data_splits"}
    assert parents["trained_model"] == {
        "balanced_train_set", "augmented_train_set", "clean_images", "data_splits", "noise_templates"
    }  # fmt: skip
    assert parents["corruption_benchmark_set"] == {"clean_images", "data_splits"}
    assert parents["evaluation_report"] == {
        "clean_images", "data_splits", "trained_model", "robustness_eval_sets", "corruption_benchmark_set"
    }  # fmt: skip
    assert parents["domain_shift_set"] == {"clean_images", "data_splits"}
    assert parents["external_sets"] == {"clean_images"}
    assert parents["domain_shift_report"] == {"trained_model", "domain_shift_set", "external_sets"}
    assert parents["lab_adaptation"] == {"trained_model", "external_sets"}
    assert parents["model_leaderboard"] == {"evaluation_report", "domain_shift_report"}
    assert parents["submission_package"] == {"model_leaderboard", "trained_model"}
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {
        "no_image_in_two_splits",
        "no_group_in_two_splits",
        "class_proportions_match",
        "no_flagged_image_in_splits",
        "shards_match_balanced_set",
    }


def test_every_asset_has_a_code_version():
    graph = defs.resolve_asset_graph()
    missing = [key.to_user_string() for key in graph.materializable_asset_keys if not graph.get(key).code_version]
    assert missing == []


def test_configurable_assets_fold_their_config_defaults_into_the_code_version():
    graph = defs.resolve_asset_graph()
    versions = {key.to_user_string(): graph.get(key).code_version for key in graph.materializable_asset_keys}
    configured = {name for name, version in versions.items() if ".cfg-" in version}
    assert {"duplicate_groups", "data_splits", "trained_model", "evaluation_report", "model_leaderboard"} <= configured
    assert "raw_images" not in configured and "image_hashes" not in configured


def test_every_asset_is_automated_and_the_project_sensor_runs_by_default():
    graph = defs.resolve_asset_graph()
    labels = {key.to_user_string(): graph.get(key).automation_condition.get_label() for key in graph.materializable_asset_keys}
    assert graph.get(dg.AssetKey("raw_image_source")).automation_condition is None  # observed by raw_data_sensor
    assert labels["trained_model"] == "on_change_of_trained_models"
    assert labels["model_leaderboard"] == labels["submission_package"] == "on_change_of_any_model"
    assert {labels[name] for name in EXPECTED_ASSETS - {"trained_model", "model_leaderboard", "submission_package"}} == {"on_change"}

    sensor = defs.resolve_sensor_def("bc_automation")
    assert isinstance(sensor, dg.AutomationConditionSensorDefinition)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    targeted = sensor.asset_selection.resolve(graph, allow_missing=False)
    assert {key.to_user_string() for key in targeted} == EXPECTED_ASSETS


def _job_assets(job_name: str) -> set[str]:
    job = defs.resolve_job_def(job_name)
    return {key.to_user_string() for key in job.asset_layer.selected_asset_keys}


def test_schedules_target_the_intended_jobs_and_the_raw_data_sensor_runs_by_default():
    nightly, weekly = defs.resolve_schedule_def("nightly_evaluation"), defs.resolve_schedule_def("weekly_retrain")
    assert (nightly.cron_schedule, nightly.job_name) == ("0 2 * * *", "nightly_evaluation")
    assert (weekly.cron_schedule, weekly.job_name) == ("0 3 * * 0", "weekly_retrain")
    assert nightly.default_status == dg.DefaultScheduleStatus.RUNNING
    assert weekly.default_status == dg.DefaultScheduleStatus.STOPPED  # expensive: opt in where a GPU is
    assert nightly.description and weekly.description
    assert _job_assets("nightly_evaluation") == {"evaluation_report", "domain_shift_report"}
    assert _job_assets("weekly_retrain") == {"trained_model", "evaluation_report", "domain_shift_report"}
    for name in ("nightly_evaluation", "weekly_retrain"):
        assert defs.resolve_job_def(name).partitions_def == defs.resolve_assets_def("trained_model").partitions_def

    sensor = defs.resolve_sensor_def("raw_data_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30
    assert _job_assets("observe_raw_source") == {"raw_image_source"}  # on demand, and by make run


def test_importing_definitions_does_not_import_tensorflow_or_keras():
    code = (
        "import sys, bc_pipeline.definitions as d; d.load(); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'keras_cv', 'sklearn') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


def test_training_and_evaluation_are_partitioned_by_the_model_registry_and_the_ensemble():
    from bc_pipeline.models.zoo import REGISTRY

    graph = defs.resolve_asset_graph()
    for name in ("trained_model", "evaluation_report"):
        partitions = graph.get(dg.AssetKey(name)).partitions_def
        assert partitions is not None and partitions.get_partition_keys() == [*REGISTRY, "ensemble"]
    for name in ("model_leaderboard", "submission_package", "clean_images"):
        assert graph.get(dg.AssetKey(name)).partitions_def is None
    # One training at a time on the accelerator: trained_model is in the "gpu" pool.
    assert graph.get(dg.AssetKey("trained_model")).pools == {"gpu"}


def test_make_run_passes_each_run_only_the_config_of_its_assets_and_refuses_unknown_models(capsys):
    import pytest

    from bc_pipeline.run import PER_MODEL, _config_for, main

    config = {"ops": {"robustness_eval_sets": {"config": {"policies": ["strong"]}}, "trained_model": {"config": {"epochs": 1}}}}
    assert _config_for(config, None) == config
    assert _config_for(config, PER_MODEL) == {"ops": {"trained_model": {"config": {"epochs": 1}}}}
    with pytest.raises(SystemExit):
        main(["--models", "alexnet"])
    assert "unknown model(s) alexnet" in capsys.readouterr().err


def test_the_shipped_instance_limits_the_gpu_pool_and_is_what_make_installs(tmp_path):
    from bc_pipeline.dagster_utils.instance import instance_config, write_instance
    from bc_pipeline.defs.resources import PROJECT_ROOT

    config = instance_config("sqlite")
    assert config["concurrency"]["pools"]["default_limit"] == 1
    assert config["telemetry"]["enabled"] is False and "storage" not in config  # SQLite files in DAGSTER_HOME
    assert config["run_monitoring"]["enabled"] and config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    team = instance_config("postgres")
    assert team["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}  # no secret in a file
    assert {k: v for k, v in team.items() if k != "storage"} == config  # pools, queue, monitoring declared once
    with pytest.raises(ValueError, match="unknown Dagster storage 'mysql'"):
        instance_config("mysql")
    for storage in ("sqlite", "postgres"):
        written = write_instance(tmp_path / storage, storage)
        assert yaml.safe_load(written.read_text()) == instance_config(storage)
        assert "# Pools limit how many ops" in written.read_text()  # the comments travel with it
    written.write_text("# edited by hand\n")
    assert write_instance(tmp_path / "postgres", "postgres").read_text() == "# edited by hand\n"  # kept
    with dg.DagsterInstance.from_config(str(tmp_path / "sqlite")) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator" and instance.run_monitoring_enabled
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert "$(VENV)/bin/bc-instance init" in makefile and "export DAGSTER_HOME ?= $(BC_DATA_DIR)/dagster_home" in makefile
    tracked = subprocess.run(["git", "ls-files", "data/dagster_home"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert tracked.returncode != 0 or tracked.stdout.strip() == "", "a tracked data/dagster_home/dagster.yaml would shadow the shipped one"


def test_the_environment_is_read_in_one_module():
    """Only defs/resources.py reads BC_* variables (the worker reads its own mount point in training/spec.py)."""
    import re

    package = Path(__file__).resolve().parents[1] / "bc_pipeline"
    reading = re.compile(r"os\.environ(\.get)?\s*[\[(]|os\.getenv\(|EnvVar\(")
    readers = {
        str(path.relative_to(package)) for path in package.rglob("*.py")
        if any(reading.search(line) and "BC_" in line for line in path.read_text().splitlines())
    }  # fmt: skip
    assert readers <= {"defs/resources.py", "training/spec.py"}, readers


def test_resources_take_their_settings_from_the_environment_over_one_set_of_defaults(tmp_path):
    from bc_pipeline.defs.resources import ENVIRONMENT, ImageSource, default_data_dir, from_env

    assert from_env(ImageSource, {}) == ImageSource()  # nothing set: the class's own defaults
    source = from_env(ImageSource, {"BC_SOURCE": "npz", "BC_SOURCE_PATH": "/x.npz", "BC_IMAGE_SIZE": "64", "BC_OTHER": "1"})
    assert (source.kind, source.path, source.image_size) == ("npz", "/x.npz", 64)
    assert from_env(ImageSource, {"BC_IMAGE_SIZE": ""}).image_size == ImageSource().image_size  # empty: unset
    assert default_data_dir({"BC_DATA_DIR": str(tmp_path)}) == tmp_path.resolve()
    assert {"BC_DATA_DIR", "BC_SOURCE", "BC_TRAINING_LAUNCHER", "BC_SHARED_DATASETS"} <= set(ENVIRONMENT)


def test_every_row_of_the_docs_bad_input_table_names_tests_that_exist():
    """The bad-input table of docs/operations.md stays backed by tests: 25 rows or more, every named test defined."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    table = page.split("### Bad input: what you see", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 25
    tests_dir = Path(__file__).resolve().parent
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[1].strip()
        if cell.startswith(("same test", "test_faults (")):
            continue
        module, names = cell.split("::", 1)
        source = (tests_dir / f"{module}.py").read_text()
        for name in (n.strip() for n in names.split(",")):
            assert re.search(rf"^def {re.escape(name)}\(", source, re.M), f"{module}::{name} (docs row {row[:40]}...)"


def test_the_readme_is_a_front_door_and_links_every_docs_page():
    """README.md stays short (300 lines at most) and links every page of docs/; no relative link of
    the README or the manual points at a file that does not exist."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    pages = sorted((root / "docs").glob("*.md"))
    assert pages and len(readme.read_text().splitlines()) <= 300
    link = re.compile(r"\]\(([^)\s]+)\)")
    linked = {(readme.parent / target.split("#", 1)[0]).resolve() for target in link.findall(readme.read_text())}
    assert {page.resolve() for page in pages} <= linked, "docs pages the README does not link"
    for document in (readme, *pages):
        for target in link.findall(document.read_text()):
            path = target.split("#", 1)[0]
            if not path or re.match(r"[a-z][a-z0-9+.-]*:", path):  # an anchor of the same page, or a URL
                continue
            assert (document.parent / path).exists(), f"{document.relative_to(root)} links to a missing {target}"
