"""How the library declares a stage's settings: frozen dataclasses whose fields carry their own docs.

Each stage's settings are one frozen dataclass in its library module (``DedupSettings``,
``SplitSettings``, ``TrainingSettings``, ...). A field is declared with :func:`declare`: its default,
and as metadata its description and bounds. That declaration is the only one: the stage's Dagster
config declares the same field by name and takes default, bounds and description from it
(``dagster_utils.versions.setting``), and the library's functions take the dataclass itself.
Plain dicts as metadata, so a dataclass needs neither pydantic nor Dagster (the training worker
reads its settings without either).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def declare(default: Any, description: str = "", **bounds: float) -> Any:
    """A dataclass field with its ``default``, and its ``description`` and ``bounds`` (ge, gt, le, lt) as metadata."""
    unknown = set(bounds) - {"ge", "gt", "le", "lt"}
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}: use ge, gt, le, lt")
    metadata = {**({"description": description} if description else {}), **bounds}
    return dataclasses.field(default=default, metadata=metadata)
