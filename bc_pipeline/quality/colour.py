"""How typical each image's colours are for this data set, and whether it looks stained at all.

Why this works: every image of a May-Grünwald-Giemsa smear is made of the same few materials (a
pale background of erythrocytes and plasma, pink-to-purple stained cells), so the colours that
occur in real cell images fill one small region of colour space, and they fill it over and over.
We pool the colours of all *distinct* images into one histogram (16 levels per channel); since
real cells are the bulk, the histogram describes them, whatever the order of the file or the
number of copies of any image. An image's atypicality is the mean negative log-probability of its
own pixels under that histogram, as a robust z-score (median and MAD over the distinct images):
a photograph of something else, or a cell with a photograph blended over it, is made of colours
that smears rarely contain and scores far out. The score is relative to the bulk; the *tint*
(mean green below mean red and mean blue: both dyes absorb green) is absolute, and is what tells
that a whole data set is not made of stained smears.
"""

from __future__ import annotations

import numpy as np

LEVELS = 16  # quantisation per channel for the pooled colour histogram (_colour_codes relies on it)


def _colour_codes(images: np.ndarray) -> np.ndarray:
    """Quantised colour of every other pixel in each direction: the same colour distribution, 4x cheaper."""
    q = (np.asarray(images)[:, ::2, ::2] >> 4).astype(np.uint16)  # 256 // LEVELS == 16: the top four bits
    return ((q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]).reshape(len(images), -1)


def colour_counts(images: np.ndarray) -> np.ndarray:
    """How often each quantised colour occurs in one batch of images (float64, exact up to 2**53)."""
    return np.bincount(_colour_codes(images).ravel(), minlength=LEVELS**3).astype(np.float64)


def colour_scores(histogram: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(N, 2) for one batch: colour negative log-likelihood under ``histogram``, and 1.0 where stain-tinted."""
    codes = _colour_codes(images)
    nll = (-np.log(histogram + 1e-12))[codes].mean(axis=1)
    return np.stack([nll, stain_tinted(images).astype(np.float64)], axis=1)


def pooled_colour_histogram(images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Probability of each quantised colour over all pixels of ``images``."""
    counts = np.zeros(LEVELS**3, dtype=np.float64)
    for start in range(0, len(images), batch_size):
        counts += np.bincount(_colour_codes(np.asarray(images[start : start + batch_size])).ravel(), minlength=LEVELS**3)
    return counts / max(counts.sum(), 1.0)


def colour_nll(images: np.ndarray, histogram: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Mean negative log-probability of each image's pixels under ``histogram``."""
    log_p = -np.log(histogram + 1e-12)
    out = np.empty(len(images))
    for start in range(0, len(images), batch_size):
        codes = _colour_codes(np.asarray(images[start : start + batch_size]))
        out[start : start + len(codes)] = log_p[codes].mean(axis=1)
    return out


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD): a z-score that up to half of the data cannot drag."""
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / max(mad, 1e-9)


def atypicality(images: np.ndarray) -> np.ndarray:
    """Robust z-score of colour negative log-likelihood; pass distinct images only."""
    return robust_z(colour_nll(images, pooled_colour_histogram(images)))


def stain_tinted(images: np.ndarray) -> np.ndarray:
    """True where the image's mean green is below its mean red and mean blue.

    Compared as exact integer sums per channel (equal pixel counts, so the same decision as the
    means), one contiguous channel plane at a time: ten times faster than a float mean over
    interleaved channels, and no float copy of the pixels.
    """
    images = np.asarray(images)
    sums = np.stack([images[..., c].reshape(len(images), -1).sum(axis=1, dtype=np.uint64) for c in range(3)], axis=1)
    return (sums[:, 1] < sums[:, 0]) & (sums[:, 1] < sums[:, 2])
