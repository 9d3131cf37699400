"""Load an image source into one validated array and a manifest.

Three source layouts are supported:

- ``npz``: the course challenge layout, ``images`` uint8 (N, H, W, 3) and ``labels`` (N,) or (N, 1);
- ``folder``: one sub-folder per class of image files (the PBC layout);
- ``bloodmnist``: the MedMNIST v2 BloodMNIST file, train/val/test merged into one pool because the
  pipeline makes its own leakage-free splits.

Every image is normalised to RGB uint8 at one square size. Problems with the source as a whole
(missing file, wrong array shape or dtype, unknown class folder, nothing readable) raise
:class:`ImageSourceError` with the file and the problem in the message. Problems with single items
(an unreadable or truncated file, a non-image file, a label out of range) are skipped and recorded
with their reason, or raise when ``on_bad_item="fail"``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from bc_pipeline.lib.classes import CLASS_NAMES

SourceKind = Literal["npz", "folder", "bloodmnist"]
OnBadItem = Literal["skip", "fail"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
MANIFEST_COLUMNS = ["image_id", "source", "label", "class_name", "orig_height", "orig_width", "note"]
# A file this much smaller (or larger) than the target size is accepted with a note in the manifest.
TINY_FACTOR, HUGE_FACTOR = 4, 16
SKIP_COLUMNS = ["source", "reason"]


class ImageSourceError(ValueError):
    """The image source cannot be used; the message names the file or index and the problem."""


@dataclass(frozen=True)
class LoadedImages:
    """Images (N, S, S, 3) uint8, their manifest (row i describes image i), and recorded skips."""

    images: np.ndarray
    manifest: pd.DataFrame
    skipped: pd.DataFrame


def image_id(pixels: np.ndarray) -> str:
    """A stable id from pixel content: identical images get identical ids, wherever they come from."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8).hexdigest()


def to_rgb_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Convert an (H, W), (H, W, 1) or (H, W, 3) uint8 image to RGB (size, size, 3) uint8."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[:2] == (size, size):
        return np.ascontiguousarray(pixels)
    resized = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized)


def load_source(
    kind: SourceKind,
    path: str | Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
) -> LoadedImages:
    """Load any supported source; see the module docstring for the layouts."""
    if image_size < 8:
        raise ImageSourceError(f"image_size must be at least 8 pixels, got {image_size}")
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ImageSourceError(f"unknown source kind {kind!r}: use one of {sorted(_LOADERS)}")
    return loader(Path(path), image_size=image_size, class_names=class_names, on_bad_item=on_bad_item)


# --- npz sources -------------------------------------------------------------------------------


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ImageSourceError(f"{path}: file not found")
    # An .npz is a zip archive; anything else (a bare .npy, text, a truncated download) is not.
    if not zipfile.is_zipfile(path):
        raise ImageSourceError(f"{path}: not a readable .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ImageSourceError(f"{path}: holds pickled object arrays; expected plain uint8 arrays") from None
        raise ImageSourceError(f"{path}: not a readable .npz archive ({error})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ImageSourceError(f"{path}: not a readable .npz archive ({error})") from None


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
    )


BLOODMNIST_SPLITS = ("train", "val", "test")


def load_bloodmnist(
    path: Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
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
    return _from_arrays(parts, path=path, image_size=image_size, class_names=class_names, on_bad_item=on_bad_item)


def _from_arrays(
    parts: list[tuple[np.ndarray, np.ndarray, str]],
    *,
    path: Path,
    image_size: int,
    class_names: Sequence[str],
    on_bad_item: OnBadItem,
) -> LoadedImages:
    images_out, rows, skipped = [], [], []
    for images, labels, prefix in parts:
        _check_images_array(images, f"{path}: array {prefix!r} images")
        labels = _check_labels_array(labels, images.shape[0], f"{path}: array {prefix!r} labels")
        height, width = images.shape[1:3]
        for index in range(images.shape[0]):
            source = f"{prefix}[{index}]"
            label = int(labels[index])
            if not 0 <= label < len(class_names):
                reason = f"label {label} out of range 0..{len(class_names) - 1}"
                _bad_item(on_bad_item, path, source, reason, skipped)
                continue
            pixels = to_rgb_square(images[index], image_size)
            images_out.append(pixels)
            rows.append((image_id(pixels), source, label, class_names[label], height, width, ""))
    return _assemble(images_out, rows, skipped, path, image_size)


# --- folder sources ----------------------------------------------------------------------------


def load_folder(
    root: Path,
    *,
    image_size: int = 96,
    class_names: Sequence[str] = CLASS_NAMES,
    on_bad_item: OnBadItem = "skip",
) -> LoadedImages:
    """Load one sub-folder per class; the class order (and so the labels) comes from ``class_names``."""
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

    def read(item: tuple[Path, int]) -> tuple[np.ndarray | None, str]:
        return _read_image_file(item[0], image_size)

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(read, files))

    images_out, rows = [], []
    for (file, label), (pixels, info) in zip(files, results):
        source = str(file.relative_to(root))
        if pixels is None:
            _bad_item(on_bad_item, root, source, info, skipped)
            continue
        size, _, note = info.partition(" ")
        height, width = (int(v) for v in size.split("x"))
        images_out.append(pixels)
        rows.append((image_id(pixels), source, label, class_names[label], height, width, note))
    return _assemble(images_out, rows, skipped, root, image_size)


def _read_image_file(file: Path, image_size: int) -> tuple[np.ndarray | None, str]:
    """Return (pixels, 'HxW[ note]') or (None, reason). Never raises for a bad file.

    Degenerate but usable images are kept with a note (the manifest's ``note`` column): 16-bit and
    32-bit images are scaled to 8 bits by their range (clipping would turn most of them white),
    transparency is composited on white (a microscope slide's background), and images far smaller
    or larger than ``image_size`` say by how much they were resized.
    """
    if file.name.startswith("."):
        return None, "hidden file, not an image"
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        return None, f"not an image file (extension {file.suffix or 'none'!r})"
    try:
        with Image.open(file) as image:
            image.load()
            height, width = image.height, image.width
            pixels, notes = _to_rgb8(image)
    except UnidentifiedImageError:
        return None, "not a readable image (unknown or damaged format)"
    except Image.DecompressionBombError as error:
        return None, f"too large to decode safely ({error})"
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"unreadable or truncated image ({error})"
    if min(height, width) * TINY_FACTOR <= image_size:
        notes.append(f"tiny {height}x{width} image upscaled {image_size / min(height, width):.0f}x")
    elif max(height, width) >= HUGE_FACTOR * image_size:
        notes.append(f"huge {height}x{width} image downscaled {max(height, width) / image_size:.0f}x")
    return to_rgb_square(pixels, image_size), f"{height}x{width} {'; '.join(notes)}".rstrip()


def _to_rgb8(image: Image.Image) -> tuple[np.ndarray, list[str]]:
    """8-bit RGB pixels of ``image`` and what was done to get them."""
    notes: list[str] = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max(initial=0.0))
        if image.mode.startswith("I;16") or 255 < peak <= 65535:  # 16-bit data (PIL opens 16-bit PNGs as "I")
            top, bits = 65535.0, 16
        else:  # 8-bit values in a 32-bit container, or float/32-bit data: scale by its own peak
            top, bits = (255.0, 8) if peak <= 255 else (peak, 32)
        if bits != 8:
            notes.append(f"{bits}-bit image scaled to 8 bits")
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), notes
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("transparency composited on white")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), notes
    return np.asarray(image.convert("RGB")), notes


_LOADERS = {"npz": load_npz, "folder": load_folder, "bloodmnist": load_bloodmnist}


# --- shared ------------------------------------------------------------------------------------


def _bad_item(
    on_bad_item: OnBadItem, where: Path, source: str, reason: str, skipped: list[tuple[str, str]]
) -> None:
    if on_bad_item == "fail":
        raise ImageSourceError(f"{where}: {source}: {reason}")
    skipped.append((source, reason))


def _assemble(
    images: list[np.ndarray],
    rows: list[tuple],
    skipped: list[tuple[str, str]],
    where: Path,
    image_size: int,
) -> LoadedImages:
    skipped_frame = pd.DataFrame(skipped, columns=SKIP_COLUMNS)
    if not images:
        reasons = skipped_frame["reason"].value_counts().head(3).to_dict() if skipped else {}
        raise ImageSourceError(
            f"{where}: no usable images (empty source); {len(skipped)} items skipped: {reasons}"
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest = manifest.astype({"label": "int64", "orig_height": "int64", "orig_width": "int64"})
    stacked = np.stack(images).astype(np.uint8, copy=False)
    assert stacked.shape[1:] == (image_size, image_size, 3)
    return LoadedImages(images=stacked, manifest=manifest, skipped=skipped_frame)


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
