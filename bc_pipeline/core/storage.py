"""Atomic artifact writes and content fingerprints.

Every artifact is written to a temporary sibling and renamed into place, so a run killed
half-way leaves either the previous complete artifact or the new complete one, never a torn
file. Fingerprints are content hashes used as Dagster data versions: identical output gives an
identical version, so downstream assets are not marked stale by a rerun that changed nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    Works for files and directories. For a directory the old copy is moved aside first and
    deleted after the new one is in place (rename(2) cannot replace a non-empty directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` and rename the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def save_via_temp(path: Path, save: Callable[[Path], Any]) -> None:
    """Save through a temporary sibling and rename it into place.

    Keras picks the format from the suffix, so the temporary name keeps it (``.name.1a2b.keras``).
    """
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.{uuid.uuid4().hex[:8]}{suffix}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path: Path, array: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return write_atomic(path, write)


def save_parquet(path: Path, frame: pd.DataFrame) -> Path:
    return write_atomic(path, lambda tmp: frame.to_parquet(tmp, engine="pyarrow", index=False))


def save_json(path: Path, payload: Any) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=_json_default)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks (checksums of downloads and installed weights)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short, stable content hash of arrays, frames, bytes, strings and JSON-able values."""
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray) and part.ndim and part.nbytes > _FINGERPRINT_CHUNK:
            _update_in_chunks(digest, part)
        else:
            digest.update(_fingerprint_bytes(part))
    return digest.hexdigest()


_FINGERPRINT_CHUNK = 64 << 20


def _update_in_chunks(digest: Any, array: np.ndarray) -> None:
    """The same bytes as :func:`_fingerprint_bytes`, a few rows at a time: a memory-mapped million
    images are read through once, never copied whole into memory."""
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    step = max(1, _FINGERPRINT_CHUNK // max(1, array[0].nbytes))
    for start in range(0, len(array), step):
        digest.update(np.ascontiguousarray(array[start : start + step]).tobytes())


def _fingerprint_bytes(part: Any) -> bytes:
    if isinstance(part, np.ndarray):
        header = f"{part.dtype.str}{part.shape}".encode()
        return header + np.ascontiguousarray(part).tobytes()
    if isinstance(part, pd.DataFrame):
        hashed = pd.util.hash_pandas_object(part.reset_index(drop=True), index=False)
        return ",".join(map(str, part.columns)).encode() + hashed.to_numpy().tobytes()
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        return part.encode()
    return json.dumps(part, sort_keys=True, default=_json_default).encode()
