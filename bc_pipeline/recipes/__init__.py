"""Named run configs shipped with the package (``bc_pipeline/recipes/<name>.yaml``).

A recipe is a Dagster run config (``ops: {asset: {config: ...}}``) plus the models it trains and a
one-line description. ``make run RECIPE=<name>`` runs it (bc_pipeline.run), and each recipe is a job
of the same name in the UI whose launchpad opens with the recipe's config. Reading them needs
nothing but PyYAML, so the definitions load them at import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECIPES_DIR = Path(__file__).resolve().parent
DEFAULT_RECIPE = "quick"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    models: tuple[str, ...]
    run_config: dict[str, Any] = field(default_factory=dict)  # {"ops": {...}}
    path: Path | None = None


def recipe_names() -> list[str]:
    """The recipes shipped in :data:`RECIPES_DIR`, sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or any recipe file by path; a clear error for anything else."""
    import yaml

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"no recipe {name_or_path!r}; shipped recipes: {', '.join(recipe_names())} (or give a .yaml path)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    unknown = set(raw) - {"description", "models", "ops"}
    if not isinstance(raw, dict) or unknown:
        raise ValueError(f"{path}: a recipe has description, models and ops; unexpected: {sorted(unknown)}")
    models = raw.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError(f"{path}: 'models' must be a list of model names")
    ops = raw.get("ops") or {}
    if not isinstance(ops, dict):
        raise ValueError(f"{path}: 'ops' must map asset names to {{config: ...}}")
    return Recipe(path.stem, str(raw.get("description", "")), tuple(models), {"ops": ops} if ops else {}, path)


def merged_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` laid over ``base`` key by key (nested dicts merge, anything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged_config(merged[key], value)
        else:
            merged[key] = value
    return merged
