"""Resources: where images come from, and where reports and caches go."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg

from bc_pipeline.lib.bloodmnist import BLOODMNIST_FILENAME, fetch_bloodmnist
from bc_pipeline.lib.classes import CLASS_NAMES
from bc_pipeline.lib.loaders import LoadedImages, load_source


class PipelineStorage(dg.ConfigurableResource):
    """The data directory: reports (PNG, Markdown, JSON) and caches live below it."""

    data_dir: str

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def report_dir(self, name: str) -> Path:
        path = self.root / "reports" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cache_dir(self) -> Path:
        path = self.root / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, name: str) -> Path:
        """An empty folder on the data directory's file system, for files an asset writes one by one.

        The IO manager then renames it into place, so the artifact appears complete or not at all.
        Left-overs of a killed run are removed here, the next time the same asset runs.
        """
        path = self.cache_dir() / "staging" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


class ImageSource(dg.ConfigurableResource):
    """Which images the pipeline starts from.

    ``kind``: ``bloodmnist`` (default; fetched into ``<data_dir>/raw/`` if missing), ``npz`` (the
    course challenge layout) or ``folder`` (one sub-folder per class). ``path`` is the file or
    folder; empty means the default BloodMNIST file.
    """

    kind: Literal["bloodmnist", "npz", "folder"] = "bloodmnist"
    path: str = ""
    image_size: int = 96
    class_names: list[str] = list(CLASS_NAMES)
    on_bad_item: Literal["skip", "fail"] = "skip"

    def resolve_path(self, data_dir: Path) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        if self.kind != "bloodmnist":
            raise ValueError(f"image source kind {self.kind!r} needs a path (set BC_SOURCE_PATH)")
        return data_dir / "raw" / BLOODMNIST_FILENAME

    def load(self, data_dir: Path, log: Callable[[str], None]) -> LoadedImages:
        path = self.resolve_path(data_dir)
        if self.kind == "bloodmnist" and not path.exists():
            log(f"{path} is missing: fetching BloodMNIST")
            fetch_bloodmnist(path, log=log)
        log(f"loading {self.kind} source {path} at {self.image_size}px")
        return load_source(
            self.kind,
            path,
            image_size=self.image_size,
            class_names=self.class_names,
            on_bad_item=self.on_bad_item,
        )
