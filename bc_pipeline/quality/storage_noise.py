"""How much noise storing a file's images left in them: what every blend test is judged against.

A blend stored losslessly is exact up to rounding (:mod:`bc_pipeline.quality.blend_algebra`).
A file whose images went through JPEG after blending is not: every image carries its own
compression error, a few grey levels, which no exact test survives. That error cannot be seen in
one image, but the encoder leaves a trace that can be: a decoded JPEG is (up to rounding) a fixed
point of its own encoder, *on its own 8x8 grid*. Re-encoding the file's images at the quality
they went through changes them much less than re-encoding the same content shifted off that grid,
while for content that never went through JPEG on that grid (lossless files, images resized or
blended after decoding) the grid makes no difference at all. So:

- the quality is the one where re-encoding on the grid changes the images least relative to
  re-encoding off it (the "JPEG ghost" of image forensics);
- it counts as a JPEG trace only when that ratio stands below 1 by four standard errors of its
  median over the sampled images (the scatter is measured on the file, so the test does not
  depend on what the images show), and re-encoding changes them by more than rounding does;
- the noise level is then *measured*: re-encoding the images shifted off the grid at that quality
  is a fresh compression of content like theirs, and the median RMS change is what compression
  added to each image (at full size and at the coarse size the searches use).

Nothing here is tuned to a file: no quality, level or threshold is assumed, all are measured.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bc_pipeline.quality.blend_algebra import QUANTISATION_RMS, noise_rms

#: JPEG qualities scanned (Pillow / libjpeg's scaling of the standard tables).
QUALITIES = tuple(range(50, 101))
SHIFT = 4  # pixels off the 8x8 grid (and off the 16x16 one of subsampled colour)
#: Images sampled: a first pass over every quality with few, a second at the best few with more.
FIRST_SAMPLE, SECOND_SAMPLE, FINALISTS = 16, 64, 3
#: Standard errors by which the on-grid / off-grid ratio must fall below 1 (one-sided, over ~50
#: qualities: a chance dip this deep happens about once in a thousand files).
TRACE_SIGMAS = 4.0


@dataclass(frozen=True)
class NoiseModel:
    """The noise each stored value carries: full size and coarse copies, and where it comes from."""

    full_rms: float
    coarse_rms: float
    source: str  # "rounding" or "jpeg"
    quality: int | None
    why: str

    @property
    def lossy(self) -> bool:
        return self.source != "rounding"


def rounding(side: int, coarse_side: int, why: str = "") -> NoiseModel:
    """Integer rounding only: uniform over one step in every value, averaged down for coarse copies."""
    coarse = float(noise_rms((side / coarse_side) ** 2))
    return NoiseModel(float(QUANTISATION_RMS), coarse, "rounding", None,
                      why or f"integer rounding only ({QUANTISATION_RMS:.2f} grey levels RMS)")  # fmt: skip


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 RGB ``image`` saved as JPEG at ``quality`` (Pillow / libjpeg) and read back."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _off_grid(image: np.ndarray) -> np.ndarray:
    """``image`` moved ``SHIFT`` pixels off the grid (edges repeated around it)."""
    return np.pad(image, ((SHIFT, SHIFT), (SHIFT, SHIFT), (0, 0)), mode="edge")


def _changes(images: np.ndarray, quality: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image, RMS change of the same pixels from re-encoding them on the grid and off it."""
    on, off = np.empty(len(images)), np.empty(len(images))
    for i, image in enumerate(images):
        grid = image[:crop, :crop].astype(np.float64)
        on[i] = np.sqrt(np.mean((grid - jpeg_round_trip(image[:crop, :crop], quality)) ** 2))
        moved = jpeg_round_trip(_off_grid(image[:crop, :crop]), quality)[SHIFT : SHIFT + crop, SHIFT : SHIFT + crop]
        off[i] = np.sqrt(np.mean((grid - moved) ** 2))
    return on, off


def _ratio(images: np.ndarray, quality: int, crop: int) -> tuple[float, float]:
    """Median on-grid / off-grid change, and the standard error of that median."""
    on, off = _changes(images, quality, crop)
    ratio = on / np.maximum(off, 1e-9)
    spread = 1.4826 * np.median(np.abs(ratio - np.median(ratio)))
    return float(np.median(ratio)), float(1.2533 * spread / np.sqrt(len(ratio)))


def _measured(images: np.ndarray, quality: int, crop: int, coarse_box: int) -> tuple[float, float]:
    """Median RMS error of a fresh encoding at ``quality`` (off the grid): full size and box-averaged."""
    full, coarse = [], []
    for image in images:
        grid = image[:crop, :crop]
        error = jpeg_round_trip(_off_grid(grid), quality)[SHIFT : SHIFT + crop, SHIFT : SHIFT + crop].astype(np.float64) - grid
        full.append(np.sqrt(np.mean(error**2)))
        n = crop // coarse_box * coarse_box
        boxes = error[:n, :n].reshape(n // coarse_box, coarse_box, n // coarse_box, coarse_box, 3).mean(axis=(1, 3))
        coarse.append(np.sqrt(np.mean(boxes**2)))
    return float(np.median(full)), float(np.median(coarse))


def estimate(images: np.ndarray, rows: np.ndarray, coarse_side: int, seed: int = 0) -> NoiseModel:
    """The storage noise of ``images[rows]`` (uint8 (N, S, S, 3)): a JPEG trace's measured noise, else rounding."""
    side = images.shape[1]
    crop = side // 8 * 8
    if images.ndim != 4 or images.shape[-1] != 3 or crop < 16 or len(rows) < 8 or images.dtype != np.uint8:
        return rounding(side, coarse_side, "integer rounding: too few or too small images to look for a JPEG trace")
    rng = np.random.default_rng(seed)
    first = np.asarray(images[np.sort(rng.choice(rows, min(FIRST_SAMPLE, len(rows)), replace=False))])
    scores = sorted((_ratio(first, q, crop)[0], q) for q in QUALITIES)
    second = np.asarray(images[np.sort(rng.choice(rows, min(SECOND_SAMPLE, len(rows)), replace=False))])
    ratio, error, quality = min((*_ratio(second, q, crop), q) for _, q in scores[:FINALISTS])
    full, coarse = _measured(second, quality, crop, max(side // coarse_side, 1))
    if ratio > 1.0 - TRACE_SIGMAS * error or full <= 2 * QUANTISATION_RMS:
        return rounding(side, coarse_side, f"integer rounding: no JPEG trace (re-encoding on the 8x8 grid changes the "
                                           f"images {ratio:.2f} times as much as off it, at best, quality {quality})")  # fmt: skip
    return NoiseModel(full, max(coarse, float(noise_rms((side / coarse_side) ** 2))), "jpeg", quality,
                      f"JPEG at quality {quality}: re-encoding on the 8x8 grid changes the images {ratio:.2f} times as "
                      f"much as off it (1 for content never encoded there); a fresh encoding at that quality adds "
                      f"{full:.2f} grey levels RMS (median over {len(second)} images), {coarse:.2f} on the coarse copies")  # fmt: skip
