"""The bc_pipeline code location: every definition of ``defs/``, with the project's policy applied once.

Loaded by ``dg`` and ``dagster dev`` (``[tool.dg]`` in pyproject.toml, workspace.yaml) and by the
tests. Importing it must stay fast and must not import TensorFlow or Keras (the web UI and the
daemon import it constantly): TensorFlow and Keras are imported inside the functions that use them.

Policy applied here rather than per asset: every materializable asset without an automation
condition of its own gets :func:`bc_pipeline.dagster_utils.automation.on_change`; the assets that
state one (``trained_model``, ``model_leaderboard``, ``submission_package``) are the exceptions.
Where images come from, where artifacts go and where models train is read from the environment in
one module, ``defs/resources.py``.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from bc_pipeline.dagster_utils.automation import on_change
from bc_pipeline.defs.resources import build_resources

__all__ = ["all_asset_checks", "all_assets", "build_resources", "defs"]


def _default_automation(spec: dg.AssetSpec) -> dg.AssetSpec:
    """``on_change`` unless the asset states its own condition."""
    return spec if spec.automation_condition is not None else spec.replace_attributes(automation_condition=on_change())


def assemble() -> dg.Definitions:
    """The definitions autoloaded from ``defs/`` with the default automation condition applied."""
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    sources = [a for a in loaded.assets or [] if isinstance(a, dg.SourceAsset)]  # observed, never materialized
    assets = dg.map_asset_specs(_default_automation, [a for a in loaded.assets or [] if not isinstance(a, dg.SourceAsset)])
    return dg.Definitions(
        assets=[*sources, *assets], asset_checks=loaded.asset_checks, jobs=loaded.jobs, schedules=loaded.schedules,
        sensors=loaded.sensors, resources=loaded.resources,
    )  # fmt: skip


defs = assemble()
# What dg.materialize takes (run.py and the tests): the assets and checks as the definitions hold them.
all_assets = list(defs.assets or [])
all_asset_checks = list(defs.asset_checks or [])
