"""Runs whose process is gone, a few lines per run, processes that end with their parent: the pieces
``bc_pipeline.run`` is built from (the whole, with real killed processes, is in test_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dagster as dg

from bc_pipeline.core.processes import fresh_folder, process_alive
from bc_pipeline.dagster_utils import pools
from bc_pipeline.dagster_utils.progress import RunProgress, key_figures, record_worker_event
from bc_pipeline.dagster_utils.runs import owner_tags, release_dead_runs, release_runs_of
from bc_pipeline.training.events import WorkerEvent
from bc_pipeline_tests.conftest import write_instance_home


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@dg.asset(pool="gpu")
def pooled() -> int:
    return 1


def _started_run(instance: dg.DagsterInstance, tags: dict[str, str], claim: bool = False) -> dg.DagsterRun:
    """A run recorded as started by the process its tags name, holding the gpu slot if ``claim``."""
    job = dg.Definitions(assets=[pooled], jobs=[dg.define_asset_job("train", [pooled])]).resolve_job_def("train")
    run = instance.create_run_for_job(job, tags=tags)
    instance.handle_run_event(run.run_id, dg.DagsterEvent(event_type_value="PIPELINE_START", job_name=run.job_name))
    if claim:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", run.run_id, "pooled").is_claimed
    return run


def test_a_dead_process_s_run_is_marked_failed_and_its_slot_freed_but_a_live_one_is_left_alone(tmp_path):
    with dg.DagsterInstance.from_config(str(write_instance_home(tmp_path / "home", "sqlite"))) as instance:
        dead = _started_run(instance, owner_tags(_dead_pid()), claim=True)  # a run killed with kill -9
        alive = _started_run(instance, owner_tags())

        (released,) = release_dead_runs(instance)
        assert (released.run_id, released.status, released.slots) == (dead.run_id, "FAILURE", 1)
        assert "is gone (killed or crashed)" in released.describe() and "1 pool slot(s) freed" in released.describe()
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED  # its process is this one
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert release_dead_runs(instance) == []  # nothing left to do

        (stopped,) = release_runs_of(instance, os.getpid(), canceled=True, reason="stopped by SIGINT")
        assert stopped.status == "CANCELED" and instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.CANCELED


def test_two_runs_claiming_the_gpu_slot_in_the_same_instant_get_it_once(tmp_path, monkeypatch):
    """The interleaving seen in CI, made deterministic: both runs queue their step having read "a slot
    is unassigned" (so both are assigned), A reads slot 1 as free, B claims it, then A writes its
    claim. With Dagster's unconditional UPDATE both were told "claimed" and trained at once."""
    home = str(write_instance_home(tmp_path / "home", "sqlite"))
    with dg.DagsterInstance.from_config(home) as first, dg.DagsterInstance.from_config(home) as second:
        run_a, run_b = _started_run(first, owner_tags()), _started_run(second, owner_tags())
        first.event_log_storage.set_concurrency_slots("gpu", 1)
        for instance, run in ((first, run_a), (second, run_b)):  # each read "1 unassigned slot" before the other queued
            instance.event_log_storage.add_pending_step("gpu", run.run_id, "pooled", priority=0, should_assign=True)
        read_free_slot = pools.free_slot_id
        claims: dict[str, object] = {}

        def b_claims_between_a_s_read_and_write(conn, key):  # noqa: ANN001, ANN202 - Dagster's connection
            slot = read_free_slot(conn, key)
            if not claims:  # A's read: B's whole claim happens now (B's own read is the plain one)
                claims["b"] = None
                claims["b"] = second.event_log_storage.claim_concurrency_slot("gpu", run_b.run_id, "pooled")
            return slot

        pools.claim_slots_atomically()
        monkeypatch.setattr(pools, "free_slot_id", b_claims_between_a_s_read_and_write)
        claims["a"] = first.event_log_storage.claim_concurrency_slot("gpu", run_a.run_id, "pooled")
        assert claims["b"].is_claimed and not claims["a"].is_claimed  # A waits, as the pool's limit of 1 means
        (holder,) = first.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert holder.run_id == run_b.run_id


def test_the_definitions_apply_the_atomic_claim():
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    from bc_pipeline.definitions import load

    load()
    assert SqlEventLogStorage._claim_concurrency_slot is pools._claim_concurrency_slot


def test_progress_prints_one_line_per_stage_with_its_key_figures(tmp_path):
    @dg.asset
    def counted() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"num_images": 320, "num_skipped": 2, "seconds": 0.1})

    @dg.asset_check(asset=counted)
    def positive() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False)

    @dg.asset(deps=[counted])
    def broken() -> None:
        raise ValueError("images.npy is truncated: rematerialize raw_images")

    epoch = {"epoch": 3, "phase": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75, "lr": 1e-3, "seconds": 2.0}

    @dg.asset(deps=[counted])
    def trained(context) -> None:  # noqa: ANN001 - Dagster reads a string annotation as no context type
        record_worker_event(context, WorkerEvent("epoch", epoch))  # what the training asset relays
        record_worker_event(context, WorkerEvent("finished", {"device": "cpu", "backend": "jax", "train_seconds": 9.0,
                                                              "epochs_run": 3, "best_epoch": 2}))  # fmt: skip
        context.log.info("epoch 9 (phase 1): a log line that merely reads like an epoch")

    lines: list[str] = []
    with dg.instance_for_test() as instance:
        dg.materialize([counted, positive, broken, trained], instance=instance, tags=owner_tags(), raise_on_error=False)
        RunProgress(instance, os.getpid(), emit=lines.append).poll()
    text = "\n".join(lines)
    assert f"trained {WorkerEvent('epoch', epoch).text()}" in text  # rebuilt from the event's metadata
    assert "epoch 9" not in text and "finished:" not in text  # text is not parsed; the end line has the figures
    assert "counted done in" in text and "num_images=320, num_skipped=2" in text
    assert "check positive on counted did not pass" in text
    assert "broken FAILED" in text and "ValueError: images.npy is truncated: rematerialize raw_images" in text
    assert "DagsterExecutionStepExecutionError" not in text and "Traceback" not in text
    assert lines[-1].endswith("failed (checks: 1 failed)") and len(lines) <= 8, lines
    assert key_figures({"x": dg.MetadataValue.float(0.25)}) == "x=0.25"  # no known figure: the first number
    left_out = {"models": dg.MetadataValue.int(1), "not_evaluated": dg.MetadataValue.text("resnet50, ensemble")}
    assert key_figures(left_out) == "models=1 (not evaluated: resnet50, ensemble)"  # information, not a warning
    assert key_figures({**left_out, "not_evaluated": dg.MetadataValue.text("none")}) == "models=1"


def test_a_child_started_with_exit_with_parent_ends_when_its_parent_is_killed(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    grandchild = ("import sys, time; from bc_pipeline.core.processes import exit_with_parent; exit_with_parent(0.2);"
                  "open(sys.argv[1], 'w').write(__import__('os').getpid().__str__()); time.sleep(120)")  # fmt: skip
    spawn = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}, {str(pid_file)!r}]); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", spawn])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    assert process_alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(child), "the grandchild outlived its killed parent"


def test_each_process_gets_its_own_staging_folder_and_dead_ones_are_cleaned(tmp_path):
    root = tmp_path / "staging" / "augmented_train_set"
    root.mkdir(parents=True)
    (root / f"{_dead_pid()}-deadbeef").mkdir()
    (root / "copy00_part000.images.npy").write_bytes(b"left by an older version")
    live = root / f"{os.getppid()}-cafe0000"
    live.mkdir()
    mine = fresh_folder(root)
    again = fresh_folder(root)
    assert mine != again and mine.parent == root and mine.name.startswith(f"{os.getpid()}-")
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, mine.name, again.name])


def test_relayed_pipes_messages_reach_the_callback_as_they_arrive_and_dagster_still_gets_them():
    from contextlib import contextmanager

    from bc_pipeline.dagster_utils.progress import relaying

    class Reader:  # a Pipes reader: hands every message to its handler while the process runs
        @contextmanager
        def read_messages(self, handler):
            handler.handle_message({"method": "log", "params": {"message": "hello"}})
            handler.handle_message({"method": "report_custom_message", "params": {"payload": {"bc_event": "epoch"}}})
            yield {"path": "x"}

    class Handler:
        def __init__(self):
            self.seen, self.opened = [], True

        def handle_message(self, message):
            self.seen.append(message["method"])

    relayed, handler = [], Handler()
    with relaying(Reader(), relayed.append).read_messages(handler) as params:
        assert relayed == [{"bc_event": "epoch"}] and params == {"path": "x"}
    assert handler.seen == ["log", "report_custom_message"]  # Dagster's own handler still gets every message
