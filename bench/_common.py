"""Helpers shared by the benchmark scripts: timing and plain-text tables.

The scripts run as ``python bench/<name>.py``, which puts this folder on ``sys.path``; importing
this module also puts the repository root there, for ``bc_pipeline_tests`` (its challenge-file
generator), which the project does not install.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall s, process CPU s over all threads, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """The run with the best wall time: (wall s, its CPU s, its result)."""
    best = (float("inf"), 0.0, None)
    for _ in range(repeats):
        run = timed(fn)
        if run[0] < best[0]:
            best = run
    return best


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print rows under a header: first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        cells = [f"{c:<{w}}" if j == 0 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(line, widths, strict=True))]
        print("  ".join(cells))


def load_pbc96() -> tuple[Any, float, Any] | None:
    """(all pbc96 images as ``LoadedImages``, seconds loading took, the folder); None, with a message, if absent."""
    import sys
    from pathlib import Path

    from bc_pipeline.defs.resources import shared_datasets_dir
    from bc_pipeline.ingest.loaders import load_folder

    root = Path(shared_datasets_dir()) / "pbc96"
    if not root.is_dir():
        print(f"error: {root} not found (set BC_SHARED_DATASETS)", file=sys.stderr)
        return None
    start = time.perf_counter()
    loaded = load_folder(root)
    return loaded, time.perf_counter() - start, root
