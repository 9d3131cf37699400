"""Runs whose process is gone: found, marked failed or canceled, and their pool slots freed.

Why: a run executed in a process (``bc_pipeline.run``, a script calling ``materialize``) records
"started" in the instance and claims its ``gpu`` pool slot there. If the process dies without
saying so (kill -9, a closed laptop, the OOM killer), the run stays "started" for ever and its slot
stays claimed: every later training waits at "Step still blocked by limit for pool gpu". Dagster's
run monitoring fixes this for runs its daemon launched; for runs executed in a process it cannot
know whether the process lives. So ``bc_pipeline.run`` tags each run with the process that executes
it (:func:`owner_tags`), and :func:`release_dead_runs` (run at its start and while it waits) ends
the runs of this host whose process is gone and frees what they hold. Runs without the tags are
judged only when they are already finished (their slots are then freed): never a live run.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import dagster as dg

from bc_pipeline.core.processes import process_alive

PID_TAG = "bc/pid"
HOST_TAG = "bc/host"

IN_PROGRESS = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


@dataclass(frozen=True)
class Released:
    """One run ended on behalf of its dead process (or a finished run's slots freed)."""

    run_id: str
    status: str  # what the run is now: FAILURE, CANCELED, or its finished status
    slots: int  # pool slots freed
    reason: str

    def describe(self) -> str:
        freed = f", {self.slots} pool slot(s) freed" if self.slots else ""
        status = {"FAILURE": "failed", "CANCELED": "canceled"}.get(self.status, self.status.lower())
        return f"run {self.run_id[:8]} marked {status}{freed}: {self.reason}"


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """The tags that name the process executing a run (this one by default) on this host."""
    return {PID_TAG: str(os.getpid() if pid is None else pid), HOST_TAG: socket.gethostname()}


def free_slots(instance: dg.DagsterInstance, run_id: str) -> int:
    """Free the pool slots ``run_id`` holds or waits for; how many it held."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    held = sum(
        1 for key in storage.get_concurrency_keys()
        for claim in storage.get_concurrency_info(key).claimed_slots if claim.run_id == run_id
    )  # fmt: skip
    storage.free_concurrency_slots_for_run(run_id)
    return held


def end_run(instance: dg.DagsterInstance, run: dg.DagsterRun, *, canceled: bool, reason: str) -> Released:
    """Mark ``run`` failed (or canceled) with ``reason`` and free its slots."""
    if canceled:
        instance.report_run_canceled(run, message=reason)
    else:
        instance.report_run_failed(run, message=reason)
    status = "CANCELED" if canceled else "FAILURE"
    return Released(run.run_id, status, free_slots(instance, run.run_id), reason)


def runs_of(instance: dg.DagsterInstance, pid: int) -> list[dg.DagsterRun]:
    """The unfinished runs executed by process ``pid`` of this host."""
    return list(instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS, tags=owner_tags(pid))))


def release_runs_of(instance: dg.DagsterInstance, pid: int, *, canceled: bool, reason: str) -> list[Released]:
    """End the unfinished runs of process ``pid`` (which the caller has stopped)."""
    return [end_run(instance, run, canceled=canceled, reason=reason) for run in runs_of(instance, pid)]


def release_dead_runs(instance: dg.DagsterInstance) -> list[Released]:
    """End this host's runs whose process is gone, and free the slots finished runs still hold."""
    released = []
    host = socket.gethostname()
    for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS, tags={HOST_TAG: host})):
        pid = int(run.tags.get(PID_TAG, "0") or 0)
        if pid and not process_alive(pid):
            reason = f"its process {pid} on {host} is gone (killed or crashed) without ending the run"
            released.append(end_run(instance, run, canceled=False, reason=reason))
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holding = storage.get_concurrency_run_ids()
        for run in instance.get_runs(dg.RunsFilter(run_ids=list(holding), statuses=FINISHED)) if holding else []:
            slots = free_slots(instance, run.run_id)
            if slots:
                released.append(Released(run.run_id, run.status.value, slots, "the run had finished"))
    return released
