"""The bc_pipeline code location: every definition of ``defs/``, with the project's policy applied once.

Loaded by ``dg`` and ``dagster dev`` (``[tool.dg]`` in pyproject.toml, workspace.yaml) through the
lazy ``code_location`` (Dagster's ``@dg.definitions``), and by run.py and the tests through ``defs``
/ ``load()``. Importing it is cheap (the definitions are built on first use), and neither importing
nor loading it imports TensorFlow or Keras (the web UI and the daemon load it constantly):
TensorFlow and Keras are imported inside the functions that use them.

Policy applied here rather than per asset: every materializable asset without an automation
condition of its own gets :func:`bc_pipeline.dagster_utils.automation.on_change`; the assets that
state one (``trained_model``, ``model_leaderboard``, ``submission_package``; ``clean_images``, whose
label decisions may not exist yet) are the exceptions.
Where images come from, where artifacts go and where models train is read from the environment in
one module, ``defs/resources.py``. Loading them also makes Dagster's pool-slot claim atomic on
SQLite (``dagster_utils/pools.py``): every process that executes a run loads them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import dagster as dg

from bc_pipeline.dagster_utils.automation import on_change

__all__ = ["all_asset_checks", "all_assets", "build_resources", "code_location", "defs", "load"]


def _default_automation(spec: dg.AssetSpec) -> dg.AssetSpec:
    """``on_change`` unless the asset states its own condition."""
    return spec if spec.automation_condition is not None else spec.replace_attributes(automation_condition=on_change())


@functools.cache
def load() -> dg.Definitions:
    """The definitions autoloaded from ``defs/`` with the default automation condition applied (built once)."""
    from bc_pipeline.dagster_utils.pools import claim_slots_atomically

    claim_slots_atomically()  # the gpu pool's limit holds when two runs reach it at once
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    sources = [a for a in loaded.assets or [] if isinstance(a, dg.SourceAsset)]  # observed, never materialized
    assets = dg.map_asset_specs(_default_automation, [a for a in loaded.assets or [] if not isinstance(a, dg.SourceAsset)])
    return dg.Definitions(
        assets=[*sources, *assets], asset_checks=loaded.asset_checks, jobs=loaded.jobs, schedules=loaded.schedules,
        sensors=loaded.sensors, resources=loaded.resources, executor=loaded.executor,
    )  # fmt: skip


@dg.definitions
def code_location() -> dg.Definitions:
    """What ``dg`` and ``dagster dev`` load: Dagster calls it when it loads the code location, not at import."""
    return load()


def __getattr__(name: str) -> Any:
    """``defs``, ``all_assets``, ``all_asset_checks`` (what ``dg.materialize`` takes) and ``build_resources``,
    for run.py, the tests and notebooks: built on first use, so importing this module stays cheap.

    Not module attributes on purpose: Dagster's loader finds exactly one set of definitions here,
    ``code_location``.
    """
    if name == "defs":
        return load()
    if name == "all_assets":
        return list(load().assets or [])
    if name == "all_asset_checks":
        return list(load().asset_checks or [])
    if name == "build_resources":
        from bc_pipeline.defs.resources import build_resources

        return build_resources
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
