"""Where the worker's log lines and events go: to Dagster through Pipes, or to the console.

Launched by Dagster (``PipesSubprocessClient``, ``PipesDockerClient``, ``PipesK8sClient``), the
worker finds the Pipes context in its environment: log lines appear in the run's log as they
happen, and each :class:`bc_pipeline.training.events.WorkerEvent` (ready, resumed, each epoch,
finished) is a custom message the asset relays into the run's event log as it arrives. Run by
hand, the same lines are printed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from bc_pipeline.training.events import WorkerEvent


class Reporter(Protocol):
    def log(self, message: str) -> None: ...

    def event(self, event: WorkerEvent) -> None: ...


class ConsoleReporter:
    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def event(self, event: WorkerEvent) -> None:
        self.log(event.text())


class PipesReporter:
    def __init__(self, pipes: Any) -> None:
        self.pipes = pipes

    def log(self, message: str) -> None:
        self.pipes.log.info(message)

    def event(self, event: WorkerEvent) -> None:
        self.pipes.report_custom_message(event.to_message())


def launched_by_dagster() -> bool:
    from dagster_pipes import PipesEnvVarParamsLoader

    return PipesEnvVarParamsLoader().is_dagster_pipes_process()


@contextmanager
def open_reporter() -> Iterator[Reporter]:
    """A Pipes reporter inside a Dagster launch (errors are then reported to Dagster too), else the console."""
    if not launched_by_dagster():
        yield ConsoleReporter()
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        yield PipesReporter(pipes)
