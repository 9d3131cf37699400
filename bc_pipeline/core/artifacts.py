"""On-disk formats of the pipeline's artifacts: arrays as .npy, tables as Parquet, models as .keras.

One function writes any artifact atomically and one reads it back, choosing the format from the
object's type (and, when reading, from what is on disk). The Dagster IO manager is a thin wrapper
around these, so the formats can be used and tested without Dagster.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bc_pipeline.core.storage import atomic_path, save_json, save_npy, save_parquet

# The files that mark a stored folder artifact (what other modules look for, named once).
IMAGES_FILE = "images.npy"  # an ImageSet's images (memory-mapped by readers and by the training worker)
SHARDS_FILE = "shards.parquet"  # a ShardSet's table of shards
MODEL_FILE = "model.keras"  # a ModelFolder's network


@dataclass
class ImageSet:
    """Images (N, S, S, 3) uint8, a manifest whose row i describes image i, and side tables.

    ``class_names`` names the labels in label order (empty for sets that are not labelled data of
    their own, like perturbed copies): they travel with the images from ingest on, so a stage never
    takes them from a setting that could have changed since the images were read.
    """

    images: np.ndarray
    manifest: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    # The folder it was read from (images.npy there), so a worker process can map the same file.
    directory: Path | None = field(default=None, compare=False)
    # A finished .npy of exactly ``images`` that this run wrote in staging (a streamed ingest):
    # stored by moving it into place, not by writing a million images again.
    images_file: Path | None = field(default=None, compare=False)

    @property
    def stored_images(self) -> Path | None:
        """The stored ``images.npy`` this set was read from (a worker can map the same file), or None."""
        if self.directory is not None and (Path(self.directory) / IMAGES_FILE).is_file():
            return Path(self.directory) / IMAGES_FILE
        return None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.manifest):
            raise ValueError(f"{len(self.images)} images but {len(self.manifest)} manifest rows")
        reserved = {"images", "manifest"} & set(self.tables)
        if reserved:
            raise ValueError(f"side tables cannot be named {sorted(reserved)}: those names are the image set itself")


@dataclass
class ShardSet:
    """Image shards on disk: ``manifest`` has one row per shard (file, labels_file, copy, policy, count).

    Shards are ``.npy`` files of uint8 images (n, H, W, 3) with a matching int64 labels file, written
    one at a time so that K augmented copies of a large set never have to fit in memory together.
    ``directory`` is where the files are now: a staging folder while the asset runs, the artifact
    folder once stored. :meth:`load` memory-maps one shard.
    """

    directory: Path
    manifest: pd.DataFrame

    def load(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        row = self.manifest.iloc[shard]
        images = np.load(self.directory / row["file"], mmap_mode="r", allow_pickle=False)
        return images, np.load(self.directory / row["labels_file"], allow_pickle=False)

    def __len__(self) -> int:
        return int(self.manifest["count"].sum()) if len(self.manifest) else 0


@dataclass
class ModelFolder:
    """A trained model as the worker wrote it: a folder of files (model.keras, history.parquet, info.json).

    Stored by moving the folder into place and read back as a folder again, so neither storing nor
    reading one loads Keras: :mod:`bc_pipeline.training.model_folder` knows what the files hold
    and loads the model when a stage needs it.
    """

    directory: Path


class ArtifactNotFoundError(FileNotFoundError):
    pass


def write_artifact(base: Path, value: Any) -> Path:
    """Write ``value`` at ``base`` (+ suffix for single files); return the path written."""
    if isinstance(value, ImageSet):
        with atomic_path(base) as tmp:
            tmp.mkdir()
            if value.images_file is not None:
                _move_dir(Path(value.images_file), tmp / IMAGES_FILE)
                value.images_file = None
            else:
                np.save(tmp / IMAGES_FILE, value.images, allow_pickle=False)
            value.manifest.to_parquet(tmp / "manifest.parquet", engine="pyarrow", index=False)
            for name, table in value.tables.items():
                table.to_parquet(tmp / f"{name}.parquet", engine="pyarrow", index=False)
            if value.class_names:
                (tmp / "class_names.json").write_text(json.dumps(list(value.class_names)))
        return base
    if isinstance(value, ModelFolder):
        if not (Path(value.directory) / MODEL_FILE).is_file():
            raise ValueError(f"{value.directory}: no model.keras; the worker did not finish writing the model")
        with atomic_path(base) as tmp:
            _move_dir(Path(value.directory), tmp)
        value.directory = base
        return base
    if isinstance(value, ShardSet):
        with atomic_path(base) as tmp:
            _move_dir(Path(value.directory), tmp)
            value.manifest.to_parquet(tmp / SHARDS_FILE, engine="pyarrow", index=False)
        value.directory = base
        return base
    if isinstance(value, pd.DataFrame):
        return save_parquet(base.with_suffix(".parquet"), value)
    if isinstance(value, np.ndarray):
        return save_npy(base.with_suffix(".npy"), value)
    if isinstance(value, dict):
        return save_json(base.with_suffix(".json"), value)
    raise TypeError(f"no artifact format for {type(value).__name__}")


def read_artifact(base: Path, *, what: str = "artifact") -> Any:
    """Read back whatever :func:`write_artifact` wrote at ``base``.

    A file that is there but cannot be read (truncated, overwritten, half-copied by hand) raises
    :class:`ArtifactDamagedError` naming the file and the asset to rematerialize, not the reader's
    traceback (writes go through a rename, so only a change outside the pipeline damages one).
    """
    read = functools.partial(_read_or_explain, what=what)
    if (base / IMAGES_FILE).is_file():
        tables = {p.stem: read(p, pd.read_parquet) for p in sorted(base.glob("*.parquet")) if p.stem != "manifest"}
        images = read(base / IMAGES_FILE, lambda p: np.load(p, mmap_mode="r", allow_pickle=False))
        names = tuple(read(base / "class_names.json", _load_json)) if (base / "class_names.json").is_file() else ()
        manifest = read(base / "manifest.parquet", pd.read_parquet)
        return ImageSet(images=images, manifest=manifest, tables=tables, class_names=names, directory=base)
    if (base / SHARDS_FILE).is_file():
        return ShardSet(directory=base, manifest=read(base / SHARDS_FILE, pd.read_parquet))
    if (base / MODEL_FILE).is_file():
        return ModelFolder(base)
    for suffix, reader in ((".parquet", pd.read_parquet), (".npy", _load_npy), (".json", _load_json)):
        if base.with_suffix(suffix).is_file():
            return read(base.with_suffix(suffix), reader)
    raise ArtifactNotFoundError(f"{what}: nothing stored at {base}; materialize it first")


class ArtifactDamagedError(ValueError):
    """A stored artifact's file exists but cannot be read."""


def _read_or_explain(path: Path, reader: Callable[[Path], Any], *, what: str) -> Any:
    try:
        return reader(path)
    except FileNotFoundError as error:
        raise ArtifactNotFoundError(f"{what}: {path} is missing ({error.strerror}); materialize {what.split('[')[0]} again") from None
    except Exception as error:  # noqa: BLE001 - any reader's failure on a present file means a damaged file
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ArtifactDamagedError(
            f"{what}: {path} cannot be read ({type(error).__name__}: {first}); the file is damaged or "
            f"truncated: materialize {what.split('[')[0]} again to rewrite it"
        ) from None


def artifact_exists(base: Path) -> bool:
    """Whether :func:`write_artifact` has stored something at ``base``."""
    folder_markers = (IMAGES_FILE, SHARDS_FILE, MODEL_FILE)
    if any((base / marker).is_file() for marker in folder_markers):
        return True
    return any(base.with_suffix(suffix).is_file() for suffix in (".parquet", ".npy", ".json"))


class PartitionedArtifacts(Mapping[str, Any]):
    """The stored partitions of one asset, read lazily: ``artifacts[key]`` loads only that one.

    A leaderboard needs every model's small report, a submission only the best model: neither
    should load all the models. Partitions never materialized are left out and named in
    ``missing``, so the caller can say which ones it could not use.
    """

    def __init__(self, base: Path, keys: Sequence[str], *, what: str = "artifact") -> None:
        self.base, self.what = Path(base), what
        self.keys_present = [k for k in keys if artifact_exists(self.base / k)]
        self.missing = [k for k in keys if k not in self.keys_present]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys_present:
            raise KeyError(f"{self.what}: partition {key!r} is not stored; stored: {self.keys_present}")
        return read_artifact(self.base / key, what=f"{self.what}[{key}]")

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_present)

    def __len__(self) -> int:
        return len(self.keys_present)


def _move_dir(source: Path, target: Path) -> None:
    """Rename folder or file ``source`` to ``target`` (a copy then delete across file systems)."""
    try:
        os.replace(source, target)
    except OSError:
        if source.is_dir():
            shutil.copytree(source, target)
            shutil.rmtree(source, ignore_errors=True)
        else:
            shutil.copyfile(source, target)
            source.unlink(missing_ok=True)


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text())
