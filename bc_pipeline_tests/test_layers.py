"""The house rules a newcomer can rely on, checked on the source itself.

- The layers of ``bc_pipeline/__init__.py`` hold: ``lint-imports`` (import-linter, the contracts in
  pyproject.toml) finds no upward import, no import between the stages' cores, no Dagster below
  the wiring, and a training worker that needs neither Dagster nor keras-cv.
- Functions stay short enough to read at once (60 lines at most) and take at most 8 parameters,
  except asset functions, whose parameters are their upstream inputs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_PARAMETERS = 8


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count(" KEPT") >= 3  # layers, Dagster-free cores, the worker's isolation


def test_a_broken_contract_is_reported(tmp_path):
    """The check can fail: an upward import planted in a copy of the package breaks the layers."""
    shutil.copytree(ROOT / "bc_pipeline", tmp_path / "bc_pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "bc_pipeline" / "core" / "classes.py", "a") as module:
        module.write("\nimport bc_pipeline.evaluation.metrics  # an upward import\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert result.returncode != 0
    assert "bc_pipeline.core.classes -> bc_pipeline.evaluation.metrics" in result.stdout


def _functions(paths: list[Path]):
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def _is_asset(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any("asset" in ast.unparse(decorator).split("(")[0] for decorator in node.decorator_list)


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
    return names + [f"*{a.arg}" for a in (args.vararg, args.kwarg) if a is not None]


@pytest.fixture(scope="module")
def source_files() -> list[Path]:
    return sorted([*(ROOT / "bc_pipeline").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "scripts").glob("*.py")])


def test_no_function_is_longer_than_60_lines(source_files):
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions(source_files) if node.end_lineno - node.lineno + 1 > MAX_LINES]  # fmt: skip
    assert long == []


def test_no_function_but_an_asset_takes_more_than_8_parameters(source_files):
    wide = [f"{path}:{node.lineno} {node.name} ({len(_parameters(node))} parameters)"
            for path, node in _functions(source_files) if len(_parameters(node)) > MAX_PARAMETERS and not _is_asset(node)]  # fmt: skip
    assert wide == []
