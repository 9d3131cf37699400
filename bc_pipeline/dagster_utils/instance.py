"""The shipped Dagster instance: ``instance/dagster.yaml``, with ``instance/postgres.yaml`` laid over it.

Why one function: the pools, the run coordinator and run monitoring are declared once (in
dagster.yaml) whatever the storage; the PostgreSQL overlay adds only ``storage``. The Makefile's
``bc-instance init`` writes the result into ``$DAGSTER_HOME`` when no instance is there yet.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

INSTANCE_DIR = Path(__file__).resolve().parents[1] / "instance"
STORAGES = {"sqlite": None, "postgres": "postgres.yaml"}  # storage -> overlay file


def instance_config(storage: str = "sqlite") -> dict:
    """The instance settings for ``storage`` (sqlite: Dagster's files in DAGSTER_HOME; postgres)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown Dagster storage {storage!r}: choose one of {', '.join(STORAGES)}")
    config = yaml.safe_load((INSTANCE_DIR / "dagster.yaml").read_text())
    overlay = STORAGES[storage]
    if overlay:
        config.update(yaml.safe_load((INSTANCE_DIR / overlay).read_text()))
    return config


def write_instance(home: Path, storage: str = "sqlite", *, replace: bool = False) -> Path:
    """Write ``home/dagster.yaml`` for ``storage`` (kept if it exists, unless ``replace``)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    if path.exists() and not replace:
        return path
    # The files' text (their comments explain each setting); the overlay adds top-level keys only.
    parts = ["dagster.yaml", *([STORAGES[storage]] if STORAGES.get(storage) else [])]
    text = "\n".join((INSTANCE_DIR / name).read_text() for name in parts)
    if yaml.safe_load(text) != instance_config(storage):
        raise ValueError(f"{' + '.join(parts)}: the overlay must only add top-level keys")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"# Written by `bc-instance init --storage {storage}` from bc_pipeline/instance/{' + '.join(parts)}.\n{text}")
    os.replace(tmp, path)
    return path


def get_instance() -> "dg.DagsterInstance":
    """``DagsterInstance.get()``, with the first creation of its storage done by one process at a time.

    Why: two ``bc_pipeline.run`` started at once on a new DAGSTER_HOME would both create the SQLite
    databases and race in their schema migration (alembic); a lock file in the home serialises the
    opening, which is instant once the storage exists.
    """
    import fcntl

    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()  # Dagster's own error names what is missing
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".bc-instance.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return dg.DagsterInstance.get()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
