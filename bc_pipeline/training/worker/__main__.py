"""``python -m bc_pipeline.training.worker --spec spec.json``: run one training job (see the package docstring)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from bc_pipeline.core.processes import exit_with_parent
from bc_pipeline.models.zoo import WeightsUnavailableError
from bc_pipeline.training.spec import EXIT_CANNOT_START, FAILURE_FILE, SpecError, WorkerSpec
from bc_pipeline.training.worker.backend import WorkerStartError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bc_pipeline.training.worker", description="Train one model from a job spec.")
    parser.add_argument("--spec", required=True, type=Path, help="the job's spec.json (written by the trained_model asset)")
    args = parser.parse_args(argv)
    exit_with_parent()  # started by a run process that may be killed: never train on as an orphan
    from bc_pipeline.training.worker.report import open_reporter
    from bc_pipeline.training.worker.run import run_job

    spec: WorkerSpec | None = None
    try:
        spec = WorkerSpec.load(args.spec)
        with open_reporter() as reporter:
            try:
                run_job(spec, reporter)
            except (WorkerStartError, SpecError, WeightsUnavailableError) as error:
                reporter.log(f"the training worker cannot start: {error}")
                raise
    except (WorkerStartError, SpecError, WeightsUnavailableError) as error:
        _record_failure(spec, str(error))
        print(f"bc_pipeline.training.worker: cannot start: {error}", file=sys.stderr)
        return EXIT_CANNOT_START
    except Exception as error:  # noqa: BLE001 - recorded for the asset, then re-raised with its traceback
        _record_failure(spec, f"{type(error).__name__}: {error}\n\n{traceback.format_exc(limit=8)}")
        raise
    return 0


def _record_failure(spec: WorkerSpec | None, text: str) -> None:
    """Leave the reason next to the outputs, where the asset looks for it (any launcher, any machine)."""
    if spec is None:
        return
    try:
        folder = spec.path(spec.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILURE_FILE).write_text(text)
    except OSError:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
