"""Another lab's framing, found from its unlabelled images: the zoom at which the model tells its cells apart best.

Models trained on PBC fail first on another lab's *framing*: LISC's crops show the white cell at
about a third of the frame (PBC's fill most of it), and the shipped transfer-cpu model calls 93 %
of them platelets (docs/domain_shift.md). Every image of one lab comes through the same objective,
camera and cropping, so one zoom brings the whole set to the scale the model learnt. Which zoom
needs no labels: :func:`calibrate_framing` tries the zooms of :data:`ZOOMS` (powers of 2^(1/4)
from 0.71x, a crop a third wider, to 2.83x, a cell at 35 % of its width: the span between a tight
crop and a 40x objective's) and keeps the one where the mutual information between image and
predicted class, ``H(mean prediction) - mean H(prediction)``, is highest: each cell predicted
surely *and* the set spread over classes. This is the information-maximisation objective of
discriminative clustering (Krause, Perona and Gomes, NeurIPS 2010) that source-free domain
adaptation minimises over weights (SHOT, Liang et al., ICML 2020); here it picks one number.

Why not the confidence alone (mean entropy): a from-scratch model is surest when every cell of a
wrong zoom looks like one class (the quick recipe's CNN at 0.71x calls nearly all LISC cells platelets,
at 0.05 entropy-chosen accuracy); the spread term rules that collapse out. Measured over three
models and four sets (pbc96's own test split and three other labs), the information choice is never
worse than leaving the set as given, and picks 1.0 on pbc96; the entropy choice lost up to 0.23.
A zoom other than 1.0 must also beat the set as given in :data:`CONFIDENCE` of bootstrap resamples
of the set's cells (:func:`bootstrap_evidence`): on a small set, a zoom can carry a little more
information only because of which cells the set happens to hold, and then the set stays as given.
Every choice of the table in docs/domain_shift.md won in 99.5-100 % of resamples.
Why one zoom per set, not per image: a single cell's score is noise (per image, LISC 0.45 and
pbc96 0.92 where the set's choice gives 0.84 and 0.99). The set must hold several classes (a
folder of one class is pushed towards the zoom that spreads it) and :data:`MIN_IMAGES` images,
or it stays as given. Nothing is fitted to a set: the criterion is the model's own predictions.

Pure numpy/Pillow: the caller passes the prediction function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

ZOOMS: tuple[float, ...] = tuple(round(2.0 ** (k / 4), 3) for k in range(-2, 7))  # 0.707 ... 2.828, 1.0 included
MIN_IMAGES = 20
# A zoom other than 1.0 is kept only if it carries more information than the set as given in this
# share of bootstrap resamples of the set's images: a one-sided test at the conventional 5 % level,
# so a zoom that wins by which cells happen to be in the set leaves the set as given.
CONFIDENCE = 0.95
RESAMPLES = 200


@dataclass(frozen=True)
class FramingCalibration:
    """The zoom chosen for one set of images and the information (nats) at every zoom tried."""

    zoom: float
    information: dict[float, float]
    images: int
    reason: str  # why this zoom, in words
    evidence: float | None = None  # share of resamples in which the most informative zoom beat 1.0

    def to_json(self) -> dict[str, object]:
        return {"zoom": self.zoom, "information": {str(z): round(e, 4) for z, e in self.information.items()},
                "images": self.images, "reason": self.reason, "evidence": self.evidence}  # fmt: skip


def zoom_images(images: np.ndarray, factor: float) -> np.ndarray:
    """Each image zoomed by ``factor`` about its centre, at its own size (uint8, N x H x W x 3).

    Above 1 the centre 1/factor of the frame is enlarged; below 1 the frame shrinks and its
    surroundings come from reflecting the image at its borders, not black, as a wider crop of a
    smear would show more smear.
    """
    if factor <= 0:
        raise ValueError(f"zoom factor must be positive, got {factor}")
    if factor == 1.0 or not len(images):
        return images
    height, width = images.shape[1:3]
    pad = int(np.ceil(max(height, width) * max(0.0, 1.0 / factor - 1.0) / 2)) + 1
    out = np.empty_like(images)
    for k, image in enumerate(images):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect") if factor < 1 else image
        off = pad if factor < 1 else 0
        half_h, half_w = height / factor / 2, width / factor / 2
        box = (off + width / 2 - half_w, off + height / 2 - half_h, off + width / 2 + half_w, off + height / 2 + half_h)
        out[k] = np.asarray(Image.fromarray(padded).resize((width, height), Image.Resampling.BILINEAR, box=box))
    return out


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) along the last axis."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=-1)


def information(probabilities: np.ndarray) -> float:
    """Mutual information between image and predicted class over a set: H(mean row) - mean H(row)."""
    return float(entropy(probabilities.mean(axis=0)) - entropy(probabilities).mean())


def calibrate_framing(
    predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    *,
    zooms: Sequence[float] = ZOOMS,
    min_images: int = MIN_IMAGES,
    as_given: np.ndarray | None = None,
) -> tuple[FramingCalibration, np.ndarray]:
    """The zoom of highest :func:`information` over ``images``, and the probabilities ``predict`` gives there.

    ``predict`` maps uint8 images to class probabilities; ``as_given``, when the caller already has
    them, are its probabilities at zoom 1 (one pass fewer). With fewer than ``min_images`` images
    the set stays as given (zoom 1): a handful of cells cannot say how a lab frames them.
    """
    if not zooms or any(z <= 0 for z in zooms):
        raise ValueError(f"zooms must be positive factors, got {list(zooms)}")
    if len(images) < min_images:
        reason = f"{len(images)} images, fewer than {min_images}: left as given"
        return FramingCalibration(1.0, {}, len(images), reason), predict(images) if as_given is None else as_given
    scores, probabilities = {}, {}
    for zoom in zooms:
        known = zoom == 1.0 and as_given is not None
        probabilities[zoom] = as_given if known else predict(zoom_images(images, zoom))
        scores[zoom] = information(probabilities[zoom])
    best = max(scores, key=scores.__getitem__)
    if best == 1.0 or 1.0 not in scores:
        reason = f"highest image-class information ({scores[best]:.3f} nats)"
        return FramingCalibration(float(best), scores, len(images), reason), probabilities[best]
    evidence = bootstrap_evidence(probabilities[best], probabilities[1.0])
    if evidence < CONFIDENCE:
        reason = (f"{best:g}x carries the most information ({scores[best]:.3f} nats; 1.0x {scores[1.0]:.3f}) but beats "
                  f"the set as given in only {evidence:.0%} of resamples of its images: left as given")  # fmt: skip
        return FramingCalibration(1.0, scores, len(images), reason, evidence), probabilities[1.0]
    reason = (f"highest image-class information ({scores[best]:.3f} nats; at 1.0x {scores[1.0]:.3f}), "
              f"higher in {evidence:.0%} of resamples")  # fmt: skip
    return FramingCalibration(float(best), scores, len(images), reason, evidence), probabilities[best]


def bootstrap_evidence(candidate: np.ndarray, as_given: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Share of bootstrap resamples of the images (rows, the same rows for both) in which ``candidate``'s
    probabilities carry more :func:`information` than ``as_given``'s."""
    rng = np.random.default_rng(seed)
    n = len(candidate)
    wins = 0
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        wins += information(candidate[rows]) > information(as_given[rows])
    return wins / resamples


def apply_framing(
    predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, framing: str | float
) -> tuple[np.ndarray, float, str]:
    """``images`` at the zoom ``framing`` asks for, that zoom, and why: ``auto`` (:func:`calibrate_framing`),
    ``none`` (as given) or a number (that zoom)."""
    if framing == "auto":
        calibration, _ = calibrate_framing(predict, images)
        return zoom_images(images, calibration.zoom), calibration.zoom, calibration.reason
    if framing == "none":
        return images, 1.0, "as given"
    return zoom_images(images, float(framing)), float(framing), "asked for"
