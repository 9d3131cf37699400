"""Load an image source into one validated array and a manifest.

Three source layouts are supported:

- ``npz``: the course challenge layout, ``images`` uint8 (N, H, W, 3) and ``labels`` (N,) or (N, 1);
- ``folder``: one sub-folder per class of image files (the PBC layout);
- ``bloodmnist``: the MedMNIST v2 BloodMNIST file, train/val/test merged into one pool because the
  pipeline makes its own leakage-free splits.

Every image is normalised to RGB uint8 at one square size. Sources larger than memory stream
through: with ``out_dir`` the images are written to ``out_dir/images.npy`` a chunk at a time and come
back memory-mapped, files are decoded over worker processes (``workers``), and the members of an
uncompressed ``.npz`` (what ``np.savez`` writes) are memory-mapped rather than read whole
(:mod:`bc_pipeline.core.chunks`). Problems with the source as a whole
(missing file, wrong array shape or dtype, unknown class folder, nothing readable) raise
:class:`ImageSourceError` with the file and the problem in the message. Problems with single items
(an unreadable or truncated file, a non-image file, a label out of range) are skipped and recorded
with their reason, or raise when ``on_bad_item="fail"``.
"""

from __future__ import annotations

import functools
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image

from bc_pipeline.core import chunks
from bc_pipeline.core.artifacts import IMAGES_FILE
from bc_pipeline.core.classes import CLASS_NAMES

# image_id and to_rgb_square are part of this module's API too.
from bc_pipeline.ingest.decode import (  # noqa: F401
    convert_batch,
    convert_batch_into,
    decode_files,
    decode_files_into,
    file_problem,
    image_id,  # fmt: skip
    to_rgb_square,
)

SourceKind = Literal["npz", "folder", "bloodmnist"]
OnBadItem = Literal["skip", "fail"]

MANIFEST_COLUMNS = ["image_id", "source", "label", "class_name", "orig_height", "orig_width", "note"]
SKIP_COLUMNS = ["source", "reason"]
#: Images decoded per job: large enough that sending a job costs little, small enough (7 MB at
#: 96 px) that a few jobs in flight stay small.
BATCH_SIZE = 256
Progress = Callable[[int, int], None]


class ImageSourceError(ValueError):
    """The image source cannot be used; the message names the file or index and the problem."""


@dataclass(frozen=True)
class LoadedImages:
    """Images (N, S, S, 3) uint8, their manifest (row i describes image i), and recorded skips.

    ``images_file``: the ``.npy`` file ``images`` maps when loading wrote one (``out_dir``), to be
    moved into place rather than written again.
    """

    images: np.ndarray
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    images_file: Path | None = None


def load_source(
    kind: SourceKind,
    path: str | Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
    out_dir: Path | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> LoadedImages:
    """Load any supported source; see the module docstring for the layouts and ``out_dir``/``workers``.

    ``progress(done, total)`` is called after each chunk of images.
    """
    if image_size < 8:
        raise ImageSourceError(f"image_size must be at least 8 pixels, got {image_size}")
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ImageSourceError(f"unknown source kind {kind!r}: use one of {sorted(_LOADERS)}")
    streaming = _Streaming(out_dir, workers or chunks.default_workers(), progress)
    return loader(Path(path), image_size=image_size, class_names=class_names, on_bad_item=on_bad_item, streaming=streaming)


# --- npz sources -------------------------------------------------------------------------------


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ImageSourceError(f"{path}: file not found")
    # An .npz is a zip archive; anything else (a bare .npy, text, a truncated download) is not.
    if not zipfile.is_zipfile(path):
        raise ImageSourceError(f"{path}: not a readable .npz archive (not a zip file)")
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            return {info.filename.removesuffix(".npy"): _npz_member(path, archive, raw, info) for info in archive.infolist()}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ImageSourceError(f"{path}: holds pickled object arrays; expected plain uint8 arrays") from None
        raise ImageSourceError(f"{path}: not a readable .npz archive ({error})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ImageSourceError(f"{path}: not a readable .npz archive ({error})") from None


def _npz_member(path: Path, archive: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo) -> np.ndarray:
    """One array of an .npz: memory-mapped where stored uncompressed (``np.savez``), else read."""
    if info.compress_type == zipfile.ZIP_STORED:
        raw.seek(info.header_offset)
        local = raw.read(30)  # the zip local file header: its name and extra field lengths end it
        if local[:4] == b"PK\x03\x04":
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            raw.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(raw)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(raw)
            if not fortran_order and not dtype.hasobject and int(np.prod(shape)) > 0:
                return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape)
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_images_array(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8:
        raise ImageSourceError(f"{where}: dtype is {images.dtype}, expected uint8 pixels in 0..255")
    channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
    if not channels_ok:
        raise ImageSourceError(
            f"{where}: shape is {images.shape}, expected (N, H, W, 3), (N, H, W, 1) or (N, H, W)"
        )
    if images.shape[0] == 0:
        raise ImageSourceError(f"{where}: holds no images (empty source)")


def _check_labels_array(labels: np.ndarray, n_images: int, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ImageSourceError(f"{where}: shape is {labels.shape}, expected (N,) or (N, 1)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ImageSourceError(f"{where}: dtype is {labels.dtype}, expected integer class indices")
    if labels.shape[0] != n_images:
        raise ImageSourceError(f"{where}: {labels.shape[0]} labels for {n_images} images")
    return labels.astype(np.int64)


def load_npz(
    path: Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
    streaming: _Streaming | None = None,
) -> LoadedImages:
    """Load the challenge layout: ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) or (N, 1)."""
    arrays = _open_npz(path)
    for key in ("images", "labels"):
        if key not in arrays:
            raise ImageSourceError(f"{path}: no {key!r} array (found: {sorted(arrays) or 'nothing'})")
    return _from_arrays(
        [(arrays["images"], arrays["labels"], f"{path.name}")],
        path=path,
        image_size=image_size,
        class_names=class_names,
        on_bad_item=on_bad_item,
        streaming=streaming or _Streaming(),
    )


BLOODMNIST_SPLITS = ("train", "val", "test")


def load_bloodmnist(
    path: Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
    streaming: _Streaming | None = None,
) -> LoadedImages:
    """Load BloodMNIST and merge its train/val/test parts into one pool."""
    arrays = _open_npz(path)
    parts = []
    for split in BLOODMNIST_SPLITS:
        images_key, labels_key = f"{split}_images", f"{split}_labels"
        if images_key not in arrays or labels_key not in arrays:
            raise ImageSourceError(
                f"{path}: not a BloodMNIST file, missing {images_key!r}/{labels_key!r} "
                f"(found: {sorted(arrays)})"
            )
        parts.append((arrays[images_key], arrays[labels_key], f"{path.name}:{split}"))
    return _from_arrays(
        parts, path=path, image_size=image_size, class_names=class_names, on_bad_item=on_bad_item,
        streaming=streaming or _Streaming(),
    )  # fmt: skip


def _from_arrays(
    parts: list[tuple[np.ndarray, np.ndarray, str]],
    *,
    path: Path,
    image_size: int,
    class_names: Sequence[str],
    on_bad_item: OnBadItem,
    streaming: _Streaming,
) -> LoadedImages:
    checked, skipped = [], []
    for images, labels, prefix in parts:
        _check_images_array(images, f"{path}: array {prefix!r} images")
        labels = _check_labels_array(labels, images.shape[0], f"{path}: array {prefix!r} labels")
        for index in np.flatnonzero((labels < 0) | (labels >= len(class_names))):
            reason = f"label {labels[index]} out of range 0..{len(class_names) - 1}"
            _bad_item(on_bad_item, path, f"{prefix}[{index}]", reason, skipped)
        checked.append((images, labels, prefix))
    sink = _Sink(streaming, sum(len(labels) for _, labels, _ in checked), image_size)
    rows: list[tuple] = []
    with sink:
        for images, labels, prefix in checked:
            good = np.flatnonzero((labels >= 0) & (labels < len(class_names)))
            height, width = images.shape[1:3]
            for start, ids in sink.convert(images, good, streaming.workers, first_row=len(rows)):
                for index, identity in zip(good[start : start + len(ids)], ids):
                    label = int(labels[index])
                    rows.append((identity, f"{prefix}[{index}]", label, class_names[label], height, width, ""))
                streaming.report(len(rows), sink.capacity)
        return _assemble(sink, rows, skipped, path)


# --- folder sources ----------------------------------------------------------------------------


def load_folder(
    root: Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
    streaming: _Streaming | None = None,
    unknown_classes: OnBadItem = "fail",
) -> LoadedImages:
    """Load one sub-folder per class; the class order (and so the labels) comes from ``class_names``.
    A sub-folder of no class fails the load, or is recorded as skipped (``unknown_classes="skip"``)."""
    if not root.is_dir():
        raise ImageSourceError(f"{root}: folder not found")
    label_of = {name.lower(): label for label, name in enumerate(class_names)}
    files: list[tuple[Path, int]] = []
    skipped: list[tuple[str, str]] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            _bad_item(on_bad_item, root, entry.name, "file outside any class folder", skipped)
            continue
        if entry.name.lower() not in label_of and unknown_classes == "skip":
            skipped.append((entry.name + "/", f"class folder not among the classes {list(class_names)}"))
            continue
        if entry.name.lower() not in label_of:
            raise ImageSourceError(
                f"{entry}: unknown class folder {entry.name!r}; expected one of {list(class_names)}"
            )
        label = label_of[entry.name.lower()]
        for file in sorted(entry.rglob("*")):
            if file.is_file():
                files.append((file, label))
    if not files and not skipped:
        raise ImageSourceError(f"{root}: no class folders with files (empty source)")

    streaming = streaming or _Streaming()
    # Files that may be images get the next row of the output; the rest are skipped by name.
    places, candidates = [], 0
    for file, _ in files:
        places.append(None if file_problem(file) else candidates)
        candidates += places[-1] is not None
    sink = _Sink(streaming, candidates, image_size)
    rows: list[tuple] = []
    with sink:
        done, decoded = 0, np.zeros(candidates, dtype=bool)
        for results in sink.decode(files, places, streaming.workers):
            for (file, label), place, (identity, info) in zip(files[done:], places[done:], results):
                source = str(file.relative_to(root))
                if identity is None:
                    _bad_item(on_bad_item, root, source, info, skipped)
                    continue
                decoded[place] = True
                size, _, note = info.partition(" ")
                height, width = (int(v) for v in size.split("x"))
                rows.append((identity, source, label, class_names[label], height, width, note))
            done += len(results)
            streaming.report(done, len(files))
        sink.drop_unwritten(decoded)
        return _assemble(sink, rows, skipped, root)


_LOADERS = {"npz": load_npz, "folder": load_folder, "bloodmnist": load_bloodmnist}


# --- shared ------------------------------------------------------------------------------------


def _bad_item(
    on_bad_item: OnBadItem, where: Path, source: str, reason: str, skipped: list[tuple[str, str]]
) -> None:
    if on_bad_item == "fail":
        raise ImageSourceError(f"{where}: {source}: {reason}")
    skipped.append((source, reason))


@dataclass(frozen=True)
class _Streaming:
    """Where and how a loader streams: ``out_dir`` for images.npy (None: in memory), worker processes, progress."""

    out_dir: Path | None = None
    workers: int = 1
    progress: Progress | None = None

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


class _Sink:
    """Decoded images, in memory or written by workers into ``out_dir/images.npy``; removed again if loading fails."""

    def __init__(self, streaming: _Streaming, capacity: int, image_size: int) -> None:
        self.parts: list[np.ndarray] = []
        self.image_size, self.capacity = image_size, capacity
        self.writer = None
        if streaming.out_dir is not None:
            file = Path(streaming.out_dir) / IMAGES_FILE
            self.writer = chunks.NpyWriter(file, (image_size, image_size, 3), np.uint8, capacity)

    def convert(self, images: np.ndarray, rows: np.ndarray, workers: int, first_row: int) -> Iterator[tuple[int, list[str]]]:
        """Convert ``images[rows]`` batch by batch into the sink; yield (start, ids) per batch.

        Streamed to a file, workers write their pixels in place (only ids come back: for images
        that need little work, sending pixels back would cost about as much as converting them).
        """
        if self.writer is None:
            convert = functools.partial(convert_batch, self.image_size)
            for start, (pixels, ids) in chunks.map_rows(convert, images, rows, batch_size=BATCH_SIZE, workers=workers):
                self.parts.append(pixels)
                yield start, ids
            return
        into = functools.partial(convert_batch_into, self.image_size, self.writer.target(), first_row)
        for start, ids in chunks.map_rows(into, images, rows, batch_size=BATCH_SIZE, workers=workers, indexed=True):
            self.writer.written(len(ids))
            yield start, ids

    def decode(self, files: list[tuple[Path, int]], places: list[int | None], workers: int) -> Iterator[list[tuple[str | None, str]]]:
        """Decode ``files`` a batch at a time into the sink; yield each batch's (id or None, info) per file.

        Streamed to a file, workers write each image at its place (see :meth:`convert`).
        """
        starts = range(0, len(files), BATCH_SIZE)
        workers = min(workers, len(starts))
        if self.writer is None:
            jobs = ([str(file) for file, _ in files[start : start + BATCH_SIZE]] for start in starts)
            for pixels, results in chunks.parallel_map(functools.partial(decode_files, self.image_size), jobs, workers=workers):
                self.parts.append(pixels)
                yield results
            return
        into = functools.partial(decode_files_into, self.image_size, self.writer.target())
        jobs = [([str(file) for file, _ in files[start : start + BATCH_SIZE]], places[start : start + BATCH_SIZE]) for start in starts]
        for (_, job_places), results in zip(jobs, chunks.parallel_map(into, jobs, workers=workers)):
            self.writer.written(sum(place is not None for place in job_places))  # rows reserved, written or not
            yield results

    def drop_unwritten(self, decoded: np.ndarray) -> None:
        """Close the gaps that files which turned out unreadable left in the file."""
        if self.writer is not None:
            self.writer.compact(decoded)

    def finish(self) -> tuple[np.ndarray, Path | None]:
        if self.writer is not None:
            return self.writer.finish(), self.writer.path
        empty = np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        return (np.concatenate(self.parts) if self.parts else empty), None

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, error_type: Any, *_: Any) -> None:
        if error_type is not None and self.writer is not None:
            self.writer.close()
            self.writer.path.unlink(missing_ok=True)


def _assemble(sink: _Sink, rows: list[tuple], skipped: list[tuple[str, str]], where: Path) -> LoadedImages:
    skipped_frame = pd.DataFrame(skipped, columns=SKIP_COLUMNS)
    if not rows:
        reasons = skipped_frame["reason"].value_counts().head(3).to_dict() if skipped else {}
        raise ImageSourceError(
            f"{where}: no usable images (empty source); {len(skipped)} items skipped: {reasons}"
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"label": "int64", "orig_height": "int64", "orig_width": "int64"})
    images, file = sink.finish()
    assert len(images) == len(manifest) and images.shape[1:] == (sink.image_size, sink.image_size, 3)
    return LoadedImages(images=images, manifest=manifest, skipped=skipped_frame, images_file=file)


def sample_class_files(
    root: Path, per_class: int, *, seed: int = 0, class_names: Sequence[str] = CLASS_NAMES, pattern: str = "*.jpg"
) -> list[tuple[Path, int]]:
    """A stratified random subset of a class-folder dataset: ``per_class`` files of each class, with labels.

    One generator walks the classes in label order and picks among each folder's sorted files, so
    a (root, per_class, seed) always names the same files: tests and benchmarks that share a
    subset measure the same images.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(class_names):
        files = sorted((Path(root) / name).glob(pattern))
        for index in sorted(rng.choice(len(files), size=min(per_class, len(files)), replace=False)):
            chosen.append((files[index], label))
    return chosen


def read_labelled_files(files: Sequence[tuple[Path, int]], image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, S, S, 3), labels (N,)) of ``(file, label)`` pairs; resized to ``image_size`` if given."""
    def read(file: Path) -> np.ndarray:
        image = Image.open(file).convert("RGB")
        return np.asarray(image if image_size is None else image.resize((image_size, image_size)))

    return np.stack([read(file) for file, _ in files]), np.array([label for _, label in files])
