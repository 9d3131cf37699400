"""Progress as structured events, from the training worker to the terminal, and a few readable lines per run.

Why: Dagster's console logger prints every event at DEBUG (about 500 lines for ``make run``); the
user wants to see which stage runs, what it produced, how training goes, and what failed. So
``bc_pipeline.run`` sends the full log to a file and prints what :class:`RunProgress` makes of the
events it finds in the instance: one line per stage start and end with its key figure, one per
event of a training (ready, resumed, each epoch), one per failed check, warnings and errors in
full, one per run end.

A training's events travel typed end to end: the worker sends each
:class:`~bc_pipeline.training.events.WorkerEvent` as a Pipes custom message; :func:`relaying` hands
it to the asset the moment it arrives (Dagster itself returns custom messages only when the
process ends), :func:`record_worker_event` puts it in the run's event log as an engine event whose
metadata are the event's values, and :class:`RunProgress` rebuilds the event from that metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import dagster as dg

from bc_pipeline.dagster_utils.runs import owner_tags
from bc_pipeline.training.events import EVENT_KEY, WorkerEvent

# The figures a stage's end line shows: the first MAX_FIGURES of these its materialization records
# (in this order), else its first number.
KEY_FIGURES = (
    "accuracy", "corruption_accuracy", "num_images", "images", "images_after", "train_images", "val_images",
    "test_images", "num_skipped", "num_removed", "near_groups", "exact_groups", "flagged_images", "templates",
    "outliers", "tinted_share", "epochs_run", "resumed_from_epoch", "best_epoch", "train_seconds", "models",
)  # fmt: skip
MAX_FIGURES = 3
KEY_NOTES = ("not_evaluated",)  # text metadata shown after the figures: which models the leaderboard left out
SLOW_STEP_SECONDS = 2.0  # a stage running longer than this gets a start line too
SHOWN_EVENTS = ("ready", "resumed", "discarded", "epoch")  # a training's events that get a line (its end line has its figures)
_RUN_ENDS = {"PIPELINE_SUCCESS": "succeeded", "PIPELINE_FAILURE": "failed", "PIPELINE_CANCELED": "was canceled"}


def key_figures(metadata: dict) -> str:
    """``name=value, ...`` for the :data:`KEY_FIGURES` entries of ``metadata`` (else its first number),
    then the :data:`KEY_NOTES` it has (text worth a glance, like the models not evaluated yet)."""
    numbers = {k: v.value for k, v in metadata.items() if isinstance(getattr(v, "value", None), (int, float))}
    numbers = {k: v for k, v in numbers.items() if not isinstance(v, bool)}
    names = [k for k in KEY_FIGURES if k in numbers][:MAX_FIGURES] or list(numbers)[:1]
    figures = [f"{k}={numbers[k]:,}" if isinstance(numbers[k], int) else f"{k}={numbers[k]:.4g}" for k in names]
    notes = [f"{k.replace('_', ' ')}: {metadata[k].value}" for k in KEY_NOTES
             if isinstance(getattr(metadata.get(k), "value", None), str) and metadata[k].value != "none"]  # fmt: skip
    return ", ".join(figures) + "".join(f" ({note})" for note in notes)


def _failure_text(event: dg.DagsterEvent, max_lines: int = 12) -> str:
    data = event.step_failure_data
    error = data.error if data else None
    while error is not None and error.cause is not None and error.cls_name.startswith("DagsterExecution"):
        error = error.cause  # Dagster's wrapper around what the stage raised
    message = error.message.strip() if error else (event.message or "")
    if data and data.user_failure_data and data.user_failure_data.description:
        message = f"{message}\n{data.user_failure_data.description.strip()}"
    lines = [line for line in message.splitlines() if line.strip()]
    return "\n".join(f"      {line}" for line in lines[:max_lines])


class RunProgress:
    """Prints the readable lines of every run the process ``pid`` executes, as they happen."""

    def __init__(self, instance: dg.DagsterInstance, pid: int, emit: Callable[[str], None] = print):
        self.instance, self.tags, self.emit = instance, owner_tags(pid), emit
        self._cursors: dict[str, str | None] = {}
        self._figures: dict[str, str] = {}
        self._running: dict[str, float] = {}  # step -> start time, until its start line is printed
        self._checks = {"passed": 0, "failed": 0}
        self._ended: set[str] = set()  # runs whose end line was printed: nothing more to read

    def poll(self) -> None:
        """Print what happened since the last call."""
        for run in sorted(self.instance.get_runs(dg.RunsFilter(tags=self.tags)), key=lambda r: r.run_id):
            if run.run_id not in self._cursors:
                self._cursors[run.run_id] = None
                partition = run.tags.get("dagster/partition")
                what = f"{partition}" if partition else run.job_name.strip("_")
                self.emit(self._line(time.time(), f"run {run.run_id[:8]} started ({what})"))
            if run.run_id not in self._ended:
                self._drain(run.run_id)
        now = time.time()
        for step, started in list(self._running.items()):
            if now - started > SLOW_STEP_SECONDS:
                self.emit(self._line(started, f"  {step} ..."))
                del self._running[step]

    def _drain(self, run_id: str) -> None:
        while True:
            result = self.instance.get_records_for_run(run_id, cursor=self._cursors[run_id], limit=500)
            for record in result.records:
                for line in self.lines(record.event_log_entry):
                    self.emit(line)
            self._cursors[run_id] = result.cursor
            if not result.has_more:
                return

    def lines(self, entry) -> Iterable[str]:
        """The readable lines of one event log entry (most give none)."""
        event, step, at = entry.dagster_event, entry.step_key, entry.timestamp
        if event is None:  # a log message of a stage
            if entry.level >= 30:
                level = "ERROR" if entry.level >= 40 else "warning"
                yield self._line(at, f"  {step or ''} {level}: {entry.user_message.strip()}")
            return
        kind = event.event_type_value
        if kind == "ENGINE_EVENT":
            worker_event = worker_event_of(event)
            if worker_event is not None and worker_event.kind in SHOWN_EVENTS:
                yield self._line(at, f"    {step} {worker_event.text()}")
        elif kind == "STEP_START":
            self._running[step] = at
        elif kind == "ASSET_MATERIALIZATION":
            self._figures[step] = key_figures(event.event_specific_data.materialization.metadata)
        elif kind == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            self._figures.setdefault(step, None)  # a check step: its outcome is the line, not its duration
            self._checks["passed" if evaluation.passed else "failed"] += 1
            if not evaluation.passed:
                yield self._line(at, f"  check {evaluation.check_name} on {evaluation.asset_key.to_user_string()} did not pass")
        elif kind == "STEP_SUCCESS":
            self._running.pop(step, None)
            figures = self._figures.pop(step, "")
            if figures is not None:
                seconds = event.event_specific_data.duration_ms / 1000
                yield self._line(at, f"  {step} done in {seconds:.1f} s" + (f": {figures}" if figures else ""))
        elif kind == "STEP_FAILURE":
            self._running.pop(step, None)
            yield self._line(at, f"  {step} FAILED:\n{_failure_text(event)}")
        elif kind in _RUN_ENDS:
            checks = ", ".join(f"{n} {state}" for state, n in self._checks.items() if n)
            self._checks = {"passed": 0, "failed": 0}
            self._ended.add(entry.run_id)
            yield self._line(at, f"run {entry.run_id[:8]} {_RUN_ENDS[kind]}" + (f" (checks: {checks})" if checks else ""))

    @staticmethod
    def _line(at: float, text: str) -> str:
        return f"{datetime.fromtimestamp(at):%H:%M:%S} {text}"


def record_worker_event(context: dg.AssetExecutionContext, event: WorkerEvent) -> None:
    """``event`` in the run's event log: an engine event of the step, its line as message, its values as metadata.

    An engine event, because it is the one kind of event a step can log with metadata that is
    neither an asset event nor a check (Dagster's own Pipes handler logs the worker's exceptions so).
    """
    from dagster._core.events import DagsterEvent, EngineEventData

    step = context.get_step_execution_context()
    DagsterEvent.engine_event(step, event.text(), EngineEventData(metadata=event.to_message()))


def worker_event_of(event: dg.DagsterEvent) -> WorkerEvent | None:
    """The worker event an engine event carries (see :func:`record_worker_event`), else None."""
    metadata = getattr(event.event_specific_data, "metadata", None) or {}
    if EVENT_KEY not in metadata:
        return None
    return WorkerEvent.from_message({key: getattr(value, "value", value) for key, value in metadata.items()})


def relaying(reader: dg.PipesMessageReader, on_message: Callable[[Any], None]) -> dg.PipesMessageReader:
    """``reader``, each custom message of which also goes to ``on_message`` the moment it arrives.

    Every Pipes reader hands each message to its handler; the handler is wrapped on the way in,
    as Dagster's own composite reader wraps it for each of its children.
    """
    read_messages = reader.read_messages

    @contextmanager
    def relayed(handler: Any) -> Iterator[Any]:
        with read_messages(_Relay(handler, on_message)) as params:
            yield params

    reader.read_messages = relayed  # type: ignore[method-assign]
    return reader


class _Relay:
    """A Pipes message handler seen through, with custom messages passed on as they are handled."""

    def __init__(self, handler: Any, on_message: Callable[[Any], None]) -> None:
        self._handler, self._on_message = handler, on_message

    def handle_message(self, message: dict[str, Any]) -> None:
        self._handler.handle_message(message)
        if message.get("method") == "report_custom_message":
            self._on_message((message.get("params") or {}).get("payload"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)
