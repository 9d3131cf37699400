"""Content versions of an image source on disk, and cheap change detection for a drop folder.

The pipeline's raw data is observed, not materialized: a digest of what is on disk becomes the
data version of the source, and Dagster reruns ``raw_images`` (and what follows) only when that
version changes. The digest is over file *content* and relative paths, never over modification
times, so touching or copying a file unchanged keeps the version, while adding, removing,
renaming or editing an image changes it. Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``)
are ignored, as the folder loader ignores them.

Hashing all 14,416 PBC JPEGs (69 MB) takes about a second; the sensor that watches the source
every 30 s first compares a digest of cheap ``(path, size, mtime)`` stamps (a third of that) and
hashes content only when the stamps moved.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

MISSING = "missing"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SourceSnapshot:
    """What an observation saw: the content ``version`` (``"missing"`` if absent), files and bytes."""

    path: Path
    version: str
    files: int
    bytes: int

    @property
    def exists(self) -> bool:
        return self.version != MISSING


def source_files(path: Path) -> list[Path]:
    """The files that make up a source: the file itself, or every non-hidden file below a folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )


def snapshot(path: Path) -> SourceSnapshot:
    """Digest the content of a source: a file's bytes, or a folder's relative paths and bytes in sorted order."""
    path = Path(path)
    files = source_files(path)
    if not files:
        return SourceSnapshot(path=path, version=MISSING, files=0, bytes=0)
    digest = hashlib.blake2b(digest_size=16)
    total = 0
    for file in files:
        if file != path:  # a folder's layout is content (class folders are labels); a file's name is not
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                total += len(chunk)
        digest.update(b"\0")
    return SourceSnapshot(path=path, version=digest.hexdigest(), files=len(files), bytes=total)


def folder_stamps(folder: Path, skip: Path | None = None) -> dict[str, str]:
    """``{relative path: "size:mtime_ns"}`` of the non-hidden files below ``folder`` (empty if absent).

    A cheap listing to notice that *something* changed; the content digest then decides whether
    anything really did. Files at or below ``skip`` are left out (whole folders are not walked).
    """
    folder = Path(folder)
    skip = Path(skip).resolve() if skip is not None else None
    stamps = {}
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (skip and is_within(here / d, skip)))
        for name in files:
            file = here / name
            if name.startswith(".") or (skip and is_within(file, skip)):
                continue
            stat = file.stat()
            stamps[file.relative_to(folder).as_posix()] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return stamps


def stamp_digest(path: Path) -> str:
    """A digest of the ``(relative path, size, mtime)`` stamps of a source file or folder."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    for file in source_files(path):
        stat = file.stat()
        name = "" if file == path else file.relative_to(path).as_posix()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def changed_entries(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Relative paths that were added, removed or re-stamped between two listings, sorted."""
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def is_within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (after resolving both)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents
