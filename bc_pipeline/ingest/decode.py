"""Decode single images into RGB uint8 at one square size, and name them by their content.

The part of loading that runs in worker processes (:mod:`bc_pipeline.ingest.loaders` sends it
batches of files or array rows), so it imports only numpy and Pillow: a worker starts in a fraction
of a second, which is what lets two processes ingest nearly twice as fast as one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bc_pipeline.core.chunks import RowTarget

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
# A file this much smaller (or larger) than the target size is accepted with a note in the manifest.
TINY_FACTOR, HUGE_FACTOR = 4, 16


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


def decode_files(image_size: int, files: list[str]) -> tuple[np.ndarray, list[tuple[str | None, str]]]:
    """Pixels of the readable ``files`` (stacked), and per file (image id, 'HxW[ note]') or (None, reason)."""
    pixels, results = [], []
    for file in files:
        image, info = read_image_file(Path(file), image_size)
        if image is not None:
            pixels.append(image)
        results.append((None if image is None else image_id(image), info))
    stacked = np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, results


def file_problem(file: Path) -> str | None:
    """Why ``file`` is no image to decode, from its name alone; None if it may be one."""
    if file.name.startswith("."):
        return "hidden file, not an image"
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (extension {file.suffix or 'none'!r})"
    return None


def read_image_file(file: Path, image_size: int) -> tuple[np.ndarray | None, str]:
    """Return (pixels, 'HxW[ note]') or (None, reason). Never raises for a bad file.

    Degenerate but usable images are kept with a note (the manifest's ``note`` column): 16-bit and
    32-bit images are scaled to 8 bits by their range (clipping would turn most of them white),
    transparency is composited on white (a microscope slide's background), and images far smaller
    or larger than ``image_size`` say by how much they were resized.
    """
    problem = file_problem(file)
    if problem is not None:
        return None, problem
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


def convert_batch(image_size: int, images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """RGB (image_size, image_size) pixels of a batch of array images, and their ids."""
    pixels = np.stack([to_rgb_square(image, image_size) for image in images])
    return pixels, [image_id(image) for image in pixels]


def convert_batch_into(image_size: int, target: RowTarget, first_row: int, start: int, images: np.ndarray) -> list[str]:
    """:func:`convert_batch`, the pixels written at row ``first_row + start`` of ``target``; the ids."""
    pixels, ids = convert_batch(image_size, images)
    target.write(first_row + start, pixels)
    return ids


def decode_files_into(image_size: int, target: RowTarget, job: tuple[list[str], list[int | None]]) -> list[tuple[str | None, str]]:
    """:func:`decode_files` for ``(files, rows)``, each readable image written at its row of ``target``.

    Only ids and notes go back to the loading process: sending 27 KB of pixels per image back costs
    that process (one of two cores) about a tenth of what decoding costs a worker.
    """
    files, places = job
    pixels, results = decode_files(image_size, files)
    target.write_rows([place for place, (identity, _) in zip(places, results) if identity is not None], list(pixels))
    return results