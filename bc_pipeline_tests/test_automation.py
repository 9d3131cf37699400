"""Declarative automation does exactly the work a change requires, proven on a real tiny subset.

One instance in a temp dir lives through the scenarios in order (module fixture), as a user's
``data/dagster_home`` would: a full materialization, a no-op tick, new images, an evaluation
config change, an evaluation code change, and an upstream rerun with identical output. Each
scenario evaluates the project's own automation conditions with ``evaluate_automation_conditions``
and then runs exactly what was requested, as the automation sensor would.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
from pydantic import Field

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.dagster_utils.versions import with_config
from bc_pipeline.definitions import all_asset_checks, all_assets, build_resources
from bc_pipeline.definitions import defs as project_defs
from bc_pipeline.defs.assets.evaluation import EvaluationConfig
from bc_pipeline.defs.jobs import all_jobs
from bc_pipeline.defs.resources import ImageSource
from bc_pipeline_tests.conftest import TINY_RUN_CONFIG, pbc96_files, tick_sensor, write_instance_home

MODEL = "custom_cnn"
_GRAPH = project_defs.resolve_asset_graph()  # test_definitions pins the exact set of assets
UNPARTITIONED = sorted(k.to_user_string() for k in _GRAPH.materializable_asset_keys if not _GRAPH.get(k).partitions_def)
PER_MODEL = sorted(k.to_user_string() for k in _GRAPH.materializable_asset_keys if _GRAPH.get(k).partitions_def)
assert len(UNPARTITIONED) == 19 and PER_MODEL == ["domain_shift_report", "evaluation_report", "lab_adaptation", "trained_model"]
MATERIALIZABLE = dg.AssetSelection.all()  # every asset, not the observable source


def _copy_images(files: list[tuple[Path, int]], root: Path) -> None:
    for file, label in files:
        target = root / CLASS_NAMES[label]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target / file.name)


class Pipeline:
    """The project's definitions over a temp source, data dir and instance, ticked by hand."""

    def __init__(self, source: Path, data_dir: Path, instance: dg.DagsterInstance):
        self.source, self.instance = source, instance
        self.resources = build_resources(str(data_dir), ImageSource(kind="folder", path=str(source), image_size=64))
        self.assets = list(all_assets)
        self.cursor = None
        self.runs = 0
        self.run_config = TINY_RUN_CONFIG
        self.sensor_cursor: str | None = None

    def defs(self) -> dg.Definitions:
        return dg.Definitions(assets=self.assets, asset_checks=all_asset_checks, jobs=all_jobs, resources=self.resources)

    def observe(self) -> None:
        result = self.defs().resolve_job_def("observe_raw_source").execute_in_process(instance=self.instance)
        assert result.success

    def observe_as_sensor(self) -> None:
        """One tick of raw_data_sensor, its observation recorded as the daemon records it."""
        from bc_pipeline.defs.sensors import raw_data_sensor

        _, self.sensor_cursor = tick_sensor(raw_data_sensor, self.instance, self.sensor_cursor, self.resources)

    def tick(self) -> dict[str, set]:
        """One evaluation of every asset's condition; returns {asset: requested partitions}."""
        result = dg.evaluate_automation_conditions(
            defs=self.defs(), instance=self.instance, asset_selection=MATERIALIZABLE, cursor=self.cursor
        )
        self.cursor = result.cursor
        return {
            key.to_user_string(): result.get_requested_partitions(key)
            for key in self.defs().resolve_asset_graph().get_all_asset_keys()
            if result.get_num_requested(key)
        }

    def run(self, requested: dict[str, set], succeed: bool = True) -> dg.ExecuteInProcessResult:
        """Execute a request in one run, with ``run_config`` (the sensor would use the defaults)."""
        keys = {partition for partitions in requested.values() for partition in partitions} - {None}
        assert keys <= {MODEL}, keys
        result = dg.materialize(
            [*self.assets, *all_asset_checks],
            selection=list(requested),
            partition_key=MODEL if keys else None,
            resources=self.resources,
            run_config={"ops": {k: v for k, v in self.run_config["ops"].items() if k in requested}},
            instance=self.instance,
            raise_on_error=False,
        )
        assert result.success == succeed
        self.runs += 1
        return result

    def settle(self, max_ticks: int = 6) -> list[dict[str, set]]:
        """Tick and run each request until a tick requests nothing, as the sensor would; the requests."""
        requests = []
        for _ in range(max_ticks):
            requested = self.tick()
            if not requested:
                return requests
            self.run(requested)
            requests.append(requested)
        raise AssertionError(f"still requesting after {max_ticks} ticks: {requests}")

    def replace(self, name: str, **attributes) -> None:
        """Swap one asset for a copy with other spec attributes (a new code version, say)."""
        key = dg.AssetKey(name)
        self.assets = [
            a.map_asset_specs(lambda spec: spec.replace_attributes(**attributes))
            if isinstance(a, dg.AssetsDefinition) and key in a.keys
            else a
            for a in self.assets
        ]


def _everything() -> dict[str, set]:
    return {**{name: {None} for name in UNPARTITIONED}, **{name: {MODEL} for name in PER_MODEL}}


def _once_each(requests: list[dict[str, set]]) -> dict[str, set]:
    """Merge a sequence of requests, asserting that no asset partition was requested twice."""
    merged: dict[str, set] = {}
    for requested in requests:
        for name, partitions in requested.items():
            assert not merged.get(name, set()) & partitions, f"{name} {partitions} requested twice: {requests}"
            merged.setdefault(name, set()).update(partitions)
    return merged


# The scenarios run on the instance ``make run`` writes (SQLite); those that read or write what a
# storage keeps in its own tables (materializations and their data versions, observations, partition
# status, failed runs, schedules' queries) run on a team's PostgreSQL instance too. The others
# evaluate the same conditions over the same records, which the SQLite runs cover.
BOTH = pytest.mark.parametrize("pipeline", ["sqlite", "postgres"], indirect=True)
SQLITE = pytest.mark.parametrize("pipeline", ["sqlite"], indirect=True)


@pytest.fixture(scope="module")
def pipeline(request, tmp_path_factory: pytest.TempPathFactory):
    """The scenarios on the instance ``make run`` writes (SQLite) or on a team's (a real PostgreSQL server)."""
    root = tmp_path_factory.mktemp(f"automation_{request.param}")
    source = root / "source"
    _copy_images(pbc96_files(per_class=10, seed=1), source)
    home = write_instance_home(root / "dagster_home", request.param)
    if request.param == "postgres":
        patch = pytest.MonkeyPatch()
        request.addfinalizer(patch.undo)
        for name, value in request.getfixturevalue("postgres_server").new_database("automation").items():
            patch.setenv(name, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the project's instance settings
        pipe = Pipeline(source, root / "data", instance)
        pipe.observe()
        pipe.observe_as_sensor()  # the sensor's first look
        assert pipe.tick() == {}, "the first tick only starts watching"
        pipe.run(_everything())
        assert pipe.tick() == {}, "a full materialization leaves nothing to do"
        yield pipe


@BOTH
def test_after_a_full_materialization_nothing_is_requested(pipeline: Pipeline):
    assert pipeline.tick() == {}
    start = time.perf_counter()
    assert pipeline.tick() == {}
    print(f"no-op evaluation of {len(UNPARTITIONED) + len(PER_MODEL)} assets: {time.perf_counter() - start:.2f}s")


@BOTH
def test_touching_files_without_changing_them_requests_nothing(pipeline: Pipeline):
    for file in sorted(pipeline.source.rglob("*.jpg"))[:5]:
        file.touch()
    pipeline.observe_as_sensor()
    pipeline.observe()  # and an observation on demand
    assert pipeline.tick() == {}


@SQLITE
def test_new_images_request_the_whole_chain_once(pipeline: Pipeline):
    _copy_images(pbc96_files(per_class=2, seed=99), pipeline.source)
    pipeline.observe_as_sensor()
    requests = pipeline.settle()
    assert _once_each(requests) == _everything(), "every stage once; of the models only the trained one"
    # A run holds assets of one partitioning: the data stages, then the model, then the comparison.
    assert [sorted(r) for r in requests] == [
        sorted(set(UNPARTITIONED) - {"model_leaderboard", "submission_package"}),
        ["domain_shift_report", "evaluation_report", "lab_adaptation", "trained_model"],
        ["model_leaderboard", "submission_package"],
    ]
    print(f"new images: {len(requests)} runs, {sum(map(len, requests))} assets")


@SQLITE
def test_an_evaluation_config_change_requests_only_evaluation_and_what_follows(pipeline: Pipeline):
    class TTAOnAllPolicies(EvaluationConfig):
        tta_all_policies: bool = Field(default=True)

    before = project_defs.resolve_asset_graph().get(dg.AssetKey("evaluation_report")).code_version
    changed = with_config(before.split(".")[0], TTAOnAllPolicies)
    assert changed != before and changed.split(".")[0] == before.split(".")[0]
    pipeline.replace("evaluation_report", code_version=changed)
    ops = TINY_RUN_CONFIG["ops"]
    pipeline.run_config = {"ops": {**ops, "evaluation_report": {"config": {**ops["evaluation_report"]["config"], "tta": True, "tta_all_policies": True}}}}
    requests = pipeline.settle()
    assert requests == [{"evaluation_report": {MODEL}}, {"model_leaderboard": {None}, "submission_package": {None}}]
    print(f"evaluation config change: {len(requests)} runs, {sum(map(len, requests))} assets")


@SQLITE
def test_an_evaluation_code_version_bump_reruns_evaluation_only_while_its_output_is_unchanged(pipeline: Pipeline):
    """A new code version reruns the evaluation; the same report (same data version) stops there."""
    current = pipeline.defs().resolve_asset_graph().get(dg.AssetKey("evaluation_report")).code_version
    pipeline.replace("evaluation_report", code_version="99." + current.split(".", 1)[1])
    requests = pipeline.settle()
    assert requests == [{"evaluation_report": {MODEL}}]
    print(f"evaluation code bump: {len(requests)} runs, {sum(map(len, requests))} assets")


def _input_versions(instance: dg.DagsterInstance, name: str) -> dict[str, str]:
    """The input data versions recorded on an asset's latest materialization (what 'synced' compares)."""
    tags = instance.get_latest_materialization_event(dg.AssetKey(name)).asset_materialization.tags
    prefix = "dagster/input_data_version/"
    return {key[len(prefix):]: value for key, value in tags.items() if key.startswith(prefix)}


@BOTH
def test_an_identical_upstream_rerun_leaves_downstream_synced(pipeline: Pipeline):
    result = pipeline.run({"raw_images": {None}, "image_hashes": {None}})
    rerun = {e.asset_key.to_user_string(): e.materialization.tags["dagster/data_version"] for e in result.get_asset_materialization_events()}
    assert pipeline.tick() == {}, "same data versions: nothing downstream is requested"
    for name in ["duplicate_groups", "image_colour_stats", "corruption_report", "noise_templates", "clean_images"]:
        recorded = _input_versions(pipeline.instance, name)
        for upstream in {"raw_images", "image_hashes"} & set(recorded):
            assert recorded[upstream] == rerun[upstream], f"{name} would show as unsynced against {upstream}"


@SQLITE
def test_a_code_bump_with_identical_output_upstream_of_the_random_stages_retrains_nothing(pipeline: Pipeline):
    """The augmentation stages draw random samples; rerun on unchanged inputs they return the stored one."""
    random_stages = ("augmented_train_set", "robustness_eval_sets")
    before = {name: _data_version(pipeline.instance, name) for name in random_stages}
    current = pipeline.defs().resolve_asset_graph().get(dg.AssetKey("data_splits")).code_version
    pipeline.replace("data_splits", code_version="99." + current.split(".", 1)[1])
    requests = pipeline.settle()
    assert [sorted(r) for r in requests] == [["augmented_train_set", "balanced_train_set", "corruption_benchmark_set", "data_splits", "domain_shift_set",
                                              "label_issues", "label_probabilities", "robustness_eval_sets"]]  # fmt: skip
    for name in random_stages:
        stored = pipeline.instance.get_latest_materialization_event(dg.AssetKey(name)).asset_materialization
        assert stored.metadata["reused_stored_sample"].value is True, name
        assert _data_version(pipeline.instance, name) == before[name], "same sample, same data version"


def _data_version(instance: dg.DagsterInstance, name: str) -> str:
    return instance.get_latest_data_version_record(dg.AssetKey(name)).asset_materialization.tags["dagster/data_version"]


@BOTH
def test_re_evaluating_an_unchanged_model_leaves_the_leaderboard_alone(pipeline: Pipeline):
    """What the nightly evaluation does to a model nothing changed for: no leaderboard or submission run."""
    before = pipeline.instance.get_latest_data_version_record(dg.AssetKey("evaluation_report"), partition_key=MODEL)
    pipeline.run({"evaluation_report": {MODEL}})
    after = pipeline.instance.get_latest_data_version_record(dg.AssetKey("evaluation_report"), partition_key=MODEL)
    assert after.storage_id != before.storage_id
    assert after.asset_materialization.tags["dagster/data_version"] == before.asset_materialization.tags["dagster/data_version"]
    assert pipeline.tick() == {}


@BOTH
def test_a_model_trained_by_hand_is_evaluated_and_ranked_by_automation(pipeline: Pipeline):
    """Training is the one step people start (automation never trains a new model); the rest follows."""
    pipeline.instance.wipe_assets([dg.AssetKey("evaluation_report")])  # never evaluated
    pipeline.run({"trained_model": {MODEL}})
    requests = pipeline.settle()
    assert requests == [{"evaluation_report": {MODEL}}, {"model_leaderboard": {None}, "submission_package": {None}}]


@BOTH
def test_nothing_runs_below_a_failed_stage_until_it_is_fixed(pipeline: Pipeline):
    ops = TINY_RUN_CONFIG["ops"]
    evaluation = ops["evaluation_report"]["config"]
    pipeline.run_config = {"ops": {**ops, "evaluation_report": {"config": {**evaluation, "tta": True, "tta_views": ["sideways"]}}}}
    pipeline.run({"evaluation_report": {MODEL}}, succeed=False)  # an unknown TTA view: the run fails
    current = pipeline.defs().resolve_asset_graph().get(dg.AssetKey("model_leaderboard")).code_version
    pipeline.replace("model_leaderboard", code_version="99." + current.split(".", 1)[1])
    assert pipeline.tick() == {}, "the leaderboard's code changed, but its input failed: it waits"

    pipeline.run_config = TINY_RUN_CONFIG
    pipeline.run({"evaluation_report": {MODEL}})  # fixed by hand
    requests = pipeline.settle()
    assert requests == [{"model_leaderboard": {None}, "submission_package": {None}}], "now the waiting change runs"


@BOTH
def test_schedules_request_one_run_per_trained_model(pipeline: Pipeline):
    from bc_pipeline.defs.schedules import nightly_evaluation, weekly_retrain

    night = datetime(2026, 11, 23, 2, 0, tzinfo=timezone.utc)
    context = dg.build_schedule_context(instance=pipeline.instance, scheduled_execution_time=night)
    (evaluate,) = nightly_evaluation(context)
    (retrain,) = weekly_retrain(context)
    assert (evaluate.partition_key, retrain.partition_key) == (MODEL, MODEL), "only the model that was trained"
    assert evaluate.run_key != retrain.run_key and "2026-11-23T02:00" in evaluate.run_key


def test_schedules_without_a_trained_model_skip_or_train_the_default():
    from bc_pipeline.defs.schedules import nightly_evaluation, weekly_retrain

    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance)
        skipped = nightly_evaluation(context)
        assert isinstance(skipped, dg.SkipReason) and "no trained model" in skipped.skip_message
        assert [r.partition_key for r in weekly_retrain(context)] == [MODEL]
