"""Where the worker's log lines and per-epoch metrics go: to Dagster through Pipes, or to the console.

Launched by Dagster (``PipesSubprocessClient``, ``PipesDockerClient``, ``PipesK8sClient``), the
worker finds the Pipes context in its environment: log lines appear in the run's log as they
happen, and each epoch's metrics arrive as a custom message the asset records. Run by hand, the
same lines are printed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

EPOCH = "epoch"
SUMMARY = "summary"


class Reporter(Protocol):
    def log(self, message: str) -> None: ...

    def message(self, kind: str, payload: dict[str, Any]) -> None: ...


class ConsoleReporter:
    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def message(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == SUMMARY:
            print(f"{kind}: {payload}", file=sys.stderr, flush=True)


class PipesReporter:
    def __init__(self, pipes: Any) -> None:
        self.pipes = pipes

    def log(self, message: str) -> None:
        self.pipes.log.info(message)

    def message(self, kind: str, payload: dict[str, Any]) -> None:
        self.pipes.report_custom_message({"kind": kind, **payload})


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
