"""Faults a user meets with ``python -m bc_pipeline.run`` (what ``make run`` calls), with real processes.

A run killed with kill -9 during training must not block the next one, which resumes from the
checkpoint; Ctrl-C and SIGTERM stop a training run and a run waiting on the ``gpu`` pool within
seconds, mark them canceled and free their slots; two runs started at once on one instance and
data folder both finish, their trainings one after the other.

The setups: two whole-graph runs of ``bc_pipeline.run`` for the same model started at once (``make
run`` typed in two terminals) on a 320-image pbc96 subset and the SQLite instance ``make run`` uses,
with a new DAGSTER_HOME (its first creation raced once); then the same two runs at once on the PostgreSQL
instance of a team (a real server, conftest), ``--models-only`` over a copy of that project's
stored assets, since what differs on PostgreSQL is the runs, the pool and the event log, not the
stages (test_automation materializes the whole graph on PostgreSQL too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from bc_pipeline.core.artifacts import read_artifact
from bc_pipeline.core.storage import fingerprint
from bc_pipeline.defs.resources import PROJECT_ROOT
from bc_pipeline_tests.conftest import TINY_RUN_CONFIG, write_instance_home

TRAIN = {"epochs": 1, "image_size": 32, "batch_size": 32}
LONG_TRAIN = {**TRAIN, "epochs": 30, "patience": 30, "lr_schedule": "constant"}


@dataclass
class Project:
    """A data directory and Dagster home as a user's, and the environment that points there."""

    data_dir: Path
    home: Path
    env: dict[str, str]
    storage: str

    def start(self, *args: str, train: dict = TRAIN, name: str = "run", augment: dict | None = None) -> tuple[subprocess.Popen, Path]:
        ops = {**TINY_RUN_CONFIG["ops"], "trained_model": {"config": train}}
        if augment is not None:
            ops["augmented_train_set"] = {"config": augment}
        config = {"ops": ops}
        out = self.data_dir.parent / f"{name}-{time.monotonic_ns()}.txt"
        with open(out, "w") as stream:
            process = subprocess.Popen([sys.executable, "-m", "bc_pipeline.run", "--config-json", json.dumps(config), *args],
                                       env=self.env, cwd=PROJECT_ROOT, stdout=stream, stderr=subprocess.STDOUT)  # fmt: skip
        return process, out

    def run(self, *args: str, train: dict = TRAIN, timeout: float = 900, augment: dict | None = None) -> str:
        process, out = self.start(*args, train=train, augment=augment)
        assert process.wait(timeout=timeout) == 0, out.read_text()[-4000:]
        return out.read_text()

    def instance(self) -> dg.DagsterInstance:
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("DAGSTER_PG_")})
        return dg.DagsterInstance.from_config(str(self.home))

    def checkpoint_epochs(self, model: str) -> int:
        state = self.data_dir / "cache" / "checkpoints" / "trained_model" / model / "state.json"
        try:
            return json.loads(state.read_text())["epochs_done"]
        except (OSError, ValueError, KeyError):
            return 0

    def processes(self) -> list[str]:
        """Processes of this project still alive (the run's child and training worker name its data dir)."""
        found = subprocess.run(["pgrep", "-af", str(self.data_dir)], capture_output=True, text=True).stdout
        return [line for line in found.splitlines() if "pgrep" not in line]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _step_events(instance: dg.DagsterInstance, run_id: str, step: str) -> list:
    return [r.event_log_entry for r in instance.get_records_for_run(run_id).records if r.event_log_entry.step_key == step]


def _runs_of_partition(instance: dg.DagsterInstance, model: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(tags={"dagster/partition": model})))


@dataclass
class Started:
    """The setup's two runs, started at once."""

    project: Project
    outputs: dict[str, str]  # model -> what its bc_pipeline.run printed
    whole_graph: bool = True


BOTH = pytest.mark.parametrize("started", ["sqlite", "postgres"], indirect=True)
SQLITE = pytest.mark.parametrize("started", ["sqlite"], indirect=True)  # the same code path on PostgreSQL
MODEL = "custom_cnn"
BOTH_TRAIN = {**TRAIN, "epochs": 4}  # long enough that the other run reaches its training step meanwhile


def _start_both(project: Project, *args: str) -> Started:
    """The same model's run started twice at once, as a user who typed ``make run`` in two terminals."""
    processes = {name: project.start("--models", MODEL, *args, train=BOTH_TRAIN, name=name) for name in ("first", "second")}
    for process, out in processes.values():
        assert process.wait(timeout=900) == 0, out.read_text()[-4000:]
    return Started(project, {name: out.read_text() for name, (_, out) in processes.items()}, whole_graph=not args)


def _project(root: Path, pbc_subset_dir: Path, storage: str, database: dict[str, str] | None = None) -> Project:
    env = {**os.environ, "BC_DATA_DIR": str(root / "data"), "DAGSTER_HOME": str(root / "home"), "BC_SOURCE": "folder",
           "BC_SOURCE_PATH": str(pbc_subset_dir), "BC_IMAGE_SIZE": "64", "TF_CPP_MIN_LOG_LEVEL": "2", **(database or {})}  # fmt: skip
    write_instance_home(root / "home", storage)
    return Project(root / "data", root / "home", env, storage)


@pytest.fixture(scope="module")
def sqlite_project(pbc_subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Started:
    """A user's project after two whole-graph ``bc_pipeline.run`` started at once (two models)."""
    return _start_both(_project(tmp_path_factory.mktemp("faults_sqlite"), pbc_subset_dir, "sqlite"))


@pytest.fixture(scope="module")
def postgres_project(sqlite_project: Started, pbc_subset_dir: Path, tmp_path_factory: pytest.TempPathFactory, request) -> Started:
    """A team's PostgreSQL instance: the two runs started at once over the stored assets (``--models-only``)."""
    root = tmp_path_factory.mktemp("faults_postgres")
    project = _project(root, pbc_subset_dir, "postgres", request.getfixturevalue("postgres_server").new_database("faults"))
    shutil.copytree(sqlite_project.project.data_dir / "assets", project.data_dir / "assets")
    return _start_both(project, "--models-only")


@pytest.fixture(scope="module")
def started(request) -> Started:
    return request.getfixturevalue(f"{request.param}_project")


@pytest.fixture
def project(started: Started) -> Project:
    return started.project


@pytest.mark.slow
@BOTH
def test_make_run_prints_a_few_dozen_lines_and_ends_with_the_full_log_path(started: Started):
    for output in started.outputs.values():
        lines = output.strip().splitlines()
        assert len(lines) < 60, f"{len(lines)} lines:\n{output}"  # a few dozen, not hundreds
        assert "trained_model done in" in output
        assert "succeeded (checks: 5 passed)" in output if started.whole_graph else " succeeded\n" in output
        assert lines[-1].startswith("Full log: ")
        log = Path(lines[-1].removeprefix("Full log: "))
        assert log.is_file() and len(log.read_text().splitlines()) > 5 * len(lines)  # everything is in the file
    with started.project.instance() as instance:
        kind = type(instance.run_storage).__name__
        assert kind == ("PostgresRunStorage" if started.project.storage == "postgres" else "SqliteRunStorage")


@pytest.mark.slow
@BOTH
def test_two_runs_started_at_once_both_finish_and_their_trainings_queue_on_the_gpu_pool(started: Started):
    spans, blocked = [], 0
    with started.project.instance() as instance:
        runs = [r for r in _runs_of_partition(instance, MODEL) if r.status == dg.DagsterRunStatus.SUCCESS]
        assert len(runs) == 2, "the setup's two runs, nothing else yet"
        for run in runs:
            events = _step_events(instance, run.run_id, "trained_model")
            kinds = {e.dagster_event.event_type_value: e.timestamp for e in events if e.dagster_event}
            spans.append((kinds["STEP_START"], kinds["STEP_SUCCESS"]))
            blocked += any("blocked by limit for pool gpu" in e.user_message for e in events)
        assert instance.get_latest_materialization_event(dg.AssetKey("submission_package")) is not None
    (first, second) = sorted(spans)
    assert first[1] <= second[0], f"two trainings overlapped: {spans}"
    assert blocked == 1, f"one training should have waited for the other: {spans}"


@pytest.mark.slow
@SQLITE
def test_a_run_killed_with_kill_9_in_training_blocks_nothing_and_the_next_run_resumes_from_its_checkpoint(project: Project):
    model = "custom_cnn"
    process, out = project.start("--models-only", "--models", model, train={**LONG_TRAIN, "epochs": 6}, name="killed")
    _wait_for(lambda: project.checkpoint_epochs(model) >= 2 or process.poll() is not None, 600, "epoch 2's checkpoint")
    process.send_signal(signal.SIGKILL)  # the process the user started, as `kill -9 <pid>` does
    process.wait(timeout=30)
    _wait_for(lambda: not project.processes(), 15, "the run's child and training worker to exit with it")
    # Read after the worker is gone: it may save one more epoch before it notices its parent died.
    done = project.checkpoint_epochs(model)
    assert 2 <= done < 6, out.read_text()[-3000:]
    with project.instance() as instance:
        (stale,) = [r for r in _runs_of_partition(instance, model) if r.status == dg.DagsterRunStatus.STARTED]
        assert instance.event_log_storage.get_concurrency_info("gpu").active_run_ids == {stale.run_id}

    output = project.run("--models-only", train={**LONG_TRAIN, "epochs": 6})  # upstream unchanged: the models, as make run's later models
    assert f"run {stale.run_id[:8]} marked failed, 1 pool slot(s) freed" in output
    assert f"resuming from the checkpoint after epoch {done}" in output
    with project.instance() as instance:
        assert instance.get_run_by_id(stale.run_id).status == dg.DagsterRunStatus.FAILURE
        event = instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
        assert event.asset_materialization.metadata["resumed_from_epoch"].value == done
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots


@pytest.mark.slow
@SQLITE
def test_kill_9_of_every_process_while_shards_are_written_keeps_the_stored_shards_and_the_next_run_finishes(project: Project):
    stored = project.data_dir / "assets" / "augmented_train_set"
    before = read_artifact(stored)
    digests = [fingerprint(before.load(i)[0]) for i in range(len(before.manifest))]
    staging = project.data_dir / "cache" / "staging" / "augmented_train_set"
    augment = {"copies": 4, "shard_size": 64, "seed": 11}  # a new sample: 16 shards of the 256 training images
    process, out = project.start(augment=augment, name="shards")
    deadline = time.monotonic() + 600
    while process.poll() is None and not any(staging.glob("*/*.images.npy")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, out.read_text()[-3000:]
    # Every process of the run at once (the one the user started, its run child, the steps'), as a
    # power cut or `kill -9` of them all does.
    for pid in [process.pid, *(int(line.split()[0]) for line in project.processes())]:
        os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
    killed = [folder.name for folder in staging.iterdir() if any(folder.glob("*.images.npy"))]
    assert killed, "the kill came after the shards were stored"  # it hit the stage while it wrote them
    after = read_artifact(stored)
    assert [fingerprint(after.load(i)[0]) for i in range(len(after.manifest))] == digests  # the stored shards, untouched

    project.run(augment=augment)
    fresh = read_artifact(stored)
    assert sorted(set(fresh.manifest["copy"])) == [0, 1, 2, 3] and len(fresh) == 4 * len(before)
    assert not set(killed) & {folder.name for folder in staging.iterdir()}  # the killed run's staging is gone


@pytest.mark.slow
@SQLITE
def test_ctrl_c_and_sigterm_stop_a_training_and_a_run_waiting_on_the_pool_within_seconds(project: Project):
    training, training_out = project.start("--models-only", "--models", "custom_cnn", train=LONG_TRAIN, name="training")
    _wait_for(lambda: project.checkpoint_epochs("custom_cnn") >= 1, 600, "the first training's first epoch")
    waiting, waiting_out = project.start("--models-only", "--models", "mobilenetv3small", name="waiting")
    with project.instance() as instance:

        def blocked() -> bool:
            runs = [r for r in _runs_of_partition(instance, "mobilenetv3small") if r.status == dg.DagsterRunStatus.STARTED]
            return any("blocked by limit for pool gpu" in e.user_message
                       for r in runs for e in _step_events(instance, r.run_id, "trained_model"))  # fmt: skip

        _wait_for(blocked, 300, "the second run to wait on the gpu pool")
        for process, sig, out in ((waiting, signal.SIGINT, waiting_out), (training, signal.SIGTERM, training_out)):
            start = time.monotonic()
            process.send_signal(sig)  # Ctrl-C (SIGINT) of the waiting run, SIGTERM of the training one
            assert process.wait(timeout=30) == 128 + sig, out.read_text()[-3000:]
            assert time.monotonic() - start < 15
            text = out.read_text()
            assert f"{sig.name} received: stopping the run" in text
            # Ended by us (canceled) or, inside a step that noticed the signal, by Dagster (failed).
            assert "marked canceled" in text or " failed\n" in text, text
        _wait_for(lambda: not project.processes(), 15, "no process of the stopped runs left")
        for model in ("custom_cnn", "mobilenetv3small"):
            latest = max(_runs_of_partition(instance, model), key=lambda r: instance.get_run_record_by_id(r.run_id).create_timestamp)
            assert latest.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.FAILURE)
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
