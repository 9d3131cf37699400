"""Balance the training split: class weights, augmented oversampling, SMOTE, and their sensible mixes.

Only the training split is ever balanced; validation and test keep the natural class mix, so the
scores they give are the scores a user will see. Every strategy returns a :class:`Balanced`: the
images (real ones first, in input order, then the added ones), where each came from, and the
class weights training should use (``None`` when the loss is left unweighted).

Strategies (``STRATEGIES``):

- ``none``: the split as it is, unweighted.
- ``class_weights``: the split as it is; the loss weighs each class by n / (k * n_c).
- ``oversample``: minority classes are repeated up to ``target_ratio`` x the majority count; each
  repeat is a geometric variant (one of the 7 non-identity flips / right-angle turns, plus a small
  reflected shift once those run out), and no two images of the result are identical.
- ``smote``: imbalanced-learn's SMOTE on flattened float32 pixels (uint8 arithmetic would wrap
  around), run one class at a time so that memory peaks at one class's floats, not the split's.
- ``oversample+class_weights`` / ``smote+class_weights``: raise minorities part of the way
  (``target_ratio`` < 1) with synthetic images and let the loss weights do the rest.

Oversampling and SMOTE together would only stack two kinds of copies of the same minority images,
so that combination is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.settings import declare

STRATEGIES: tuple[str, ...] = (
    "none",
    "class_weights",
    "oversample",
    "smote",
    "oversample+class_weights",
    "smote+class_weights",
)
ORIGINS: tuple[str, ...] = ("real", "oversample", "smote")
# The 8 symmetries of a square as (number of quarter turns, flip left-right); index 0 is identity.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((turns, flip) for flip in (False, True) for turns in range(4))
MAX_SHIFT = 8

Log = Callable[[str], None]
CLASS_COUNTS = "class_counts"  # the balanced set's side table: label, before, after, weight (training reads the weights)
Strategy = Literal[STRATEGIES]  # type: ignore[valid-type]


@dataclass(frozen=True)
class BalanceSettings:
    """How the training split is balanced (the ``balanced_train_set`` asset's config).

    Validation and test always keep the natural class mix.
    """

    strategy: Strategy = declare(
        "class_weights", "none | class_weights | oversample (geometric repeats) | smote | oversample/smote+class_weights."
    )
    target_ratio: float = declare(1.0, "Raise each minority class to this share of the majority count.", gt=0, le=1)
    smote_neighbors: int = declare(5, "k of SMOTE's nearest neighbours within a class.", ge=1)
    seed: int = declare(0)


@dataclass
class Balanced:
    """A balanced training set: ``images[i]`` has ``labels[i]``; ``origin[i]`` says how it was made.

    ``source[i]`` is the row of the input the image was made from (-1 for SMOTE samples, which mix
    two images); ``transform[i]`` names the geometric variant of an oversampled repeat.
    """

    images: np.ndarray
    labels: np.ndarray
    origin: np.ndarray
    source: np.ndarray
    transform: np.ndarray
    class_weight: dict[int, float] | None
    counts: pd.DataFrame  # label, before, after, weight

    def manifest(self, rows: np.ndarray) -> pd.DataFrame:
        """One row per image: its row in the image set ``rows`` indexes (-1 for SMOTE samples), label, origin, transform."""
        rows = np.asarray(rows)
        return pd.DataFrame({
            "clean_index": np.where(self.source >= 0, rows[np.maximum(self.source, 0)], -1),
            "label": self.labels, "origin": self.origin.astype(str), "transform": self.transform.astype(str),
        })  # fmt: skip

    def named_counts(self, class_names: Sequence[str]) -> pd.DataFrame:
        """``counts`` with each label's class name first: class, label, before, after, weight."""
        counts = self.counts.assign(**{"class": [class_names[i] for i in self.counts["label"]]})
        return counts[["class", "label", "before", "after", "weight"]]

    def image_set(self, rows: np.ndarray, class_names: Sequence[str]) -> ImageSet:
        """The balanced set as stored: images, :meth:`manifest`, and the named counts as its :data:`CLASS_COUNTS` table."""
        tables = {CLASS_COUNTS: self.named_counts(class_names)}
        return ImageSet(images=self.images, manifest=self.manifest(rows), tables=tables, class_names=tuple(class_names))


def parse_strategy(strategy: str) -> tuple[str | None, bool]:
    """``"smote+class_weights"`` -> ("smote", True); raise ValueError for unknown or refused mixes."""
    if strategy not in STRATEGIES:
        parts = set(strategy.split("+"))
        if {"oversample", "smote"} <= parts:
            raise ValueError(
                f"strategy {strategy!r}: oversampling and SMOTE both add minority copies; pick one "
                "(and add '+class_weights' to let the loss weights finish the balancing)"
            )
        raise ValueError(f"unknown balancing strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    resampler = next((part for part in ("oversample", "smote") if part in strategy), None)
    return resampler, "class_weights" in strategy


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n / (k * n_c) for each present class, so every class weighs the same in the loss."""
    counts = np.bincount(labels, minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return {c: float(weights[c]) for c in range(num_classes) if present[c]}


def target_counts(labels: np.ndarray, num_classes: int, target_ratio: float = 1.0) -> np.ndarray:
    """Per-class counts after raising every present class to ``target_ratio`` x the majority count."""
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio must be in (0, 1], got {target_ratio}")
    counts = np.bincount(labels, minlength=num_classes)
    goal = int(np.ceil(target_ratio * counts.max())) if len(labels) else 0
    return np.where(counts > 0, np.maximum(counts, goal), 0)


def balance(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    strategy: str = BalanceSettings.strategy,
    target_ratio: float = BalanceSettings.target_ratio,
    smote_neighbors: int = BalanceSettings.smote_neighbors,
    seed: int = BalanceSettings.seed,
    log: Log = print,
) -> Balanced:
    """Balance uint8 images (N, H, W, 3) with integer labels according to ``strategy``."""
    resampler, weighted = parse_strategy(strategy)
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"balance expects uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    goal = target_counts(labels, num_classes, target_ratio)
    if resampler == "oversample":
        extra, extra_labels, source, transform = oversample(images, labels, goal, seed=seed, log=log)
    elif resampler == "smote":
        extra, extra_labels = smote(images, labels, goal, neighbors=smote_neighbors, seed=seed, log=log)
        source, transform = np.full(len(extra), -1), np.full(len(extra), "", dtype=object)
    else:
        extra, extra_labels = images[:0], labels[:0]
        source, transform = np.zeros(0, np.int64), np.zeros(0, dtype=object)
    all_labels = np.concatenate([labels, extra_labels])
    weights = class_weights(all_labels, num_classes) if weighted else None
    counts = pd.DataFrame(
        {
            "label": np.arange(num_classes),
            "before": np.bincount(labels, minlength=num_classes),
            "after": np.bincount(all_labels, minlength=num_classes),
            "weight": [weights.get(c, 0.0) if weights else 1.0 for c in range(num_classes)],
        }
    )
    return Balanced(
        images=np.concatenate([images, extra]) if len(extra) else images,
        labels=all_labels,
        origin=np.array(["real"] * len(labels) + [resampler or "real"] * len(extra), dtype=object),
        source=np.concatenate([np.arange(len(labels)), source]).astype(np.int64),
        transform=np.concatenate([np.full(len(labels), "", dtype=object), transform]),
        class_weight=weights,
        counts=counts,
    )


def dihedral(image: np.ndarray, index: int) -> np.ndarray:
    """One of the 8 flips / right-angle turns of a square image (0 is the identity)."""
    turns, flip = DIHEDRAL[index]
    out = np.rot90(image, turns, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate by (dy, dx) pixels, filling the uncovered border by reflection (no black edges)."""
    h, w = image.shape[:2]
    pad = max(abs(dy), abs(dx))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return padded[pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def oversample(
    images: np.ndarray, labels: np.ndarray, goal: np.ndarray, *, seed: int = 0, log: Log = print
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Geometric repeats of minority images up to ``goal`` per class: (images, labels, source, transform).

    Repeats cycle through a class's images in a shuffled order, so every image is reused about as
    often as every other. Round r of a class uses the (r+1)-th non-identity symmetry; from the 8th
    round on a random symmetry is combined with a random shift of up to ``MAX_SHIFT`` pixels. A
    repeat that equals any image already in the set (a symmetric cell, a uniform patch) is redrawn.
    """
    rng = np.random.default_rng(seed)
    seen = {_digest(image) for image in images}
    made, made_labels, sources, names = [], [], [], []
    for label in np.nonzero(goal > np.bincount(labels, minlength=len(goal)))[0]:
        members = rng.permutation(np.nonzero(labels == label)[0])
        missing = int(goal[label]) - len(members)
        for j in range(missing):
            row = int(members[j % len(members)])
            repeat, name = _unique_variant(images[row], j // len(members), rng, seen)
            made.append(repeat)
            made_labels.append(label)
            sources.append(row)
            names.append(name)
        log(f"oversample: class {label} {len(members)} -> {goal[label]} ({missing} geometric repeats)")
    if not made:
        return images[:0], labels[:0], np.zeros(0, np.int64), np.zeros(0, dtype=object)
    return np.stack(made), np.array(made_labels, np.int64), np.array(sources, np.int64), np.array(names, dtype=object)


def _unique_variant(image: np.ndarray, round_: int, rng: np.random.Generator, seen: set[bytes]) -> tuple[np.ndarray, str]:
    for attempt in range(50):
        if round_ < 7 and attempt == 0:
            index, dy, dx = round_ + 1, 0, 0
        else:
            index = int(rng.integers(0, 8))
            dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2))
        variant = dihedral(image, index)
        if dy or dx:
            variant = shift(variant, dy, dx)
        digest = _digest(variant)
        if digest not in seen:
            seen.add(digest)
            turns, flip = DIHEDRAL[index]
            return variant, f"rot{90 * turns}{'+flip' if flip else ''}" + (f"+shift({dy},{dx})" if dy or dx else "")
    raise ValueError("could not make a repeat that differs from every image already in the set (a blank image?)")


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def smote(
    images: np.ndarray,
    labels: np.ndarray,
    goal: np.ndarray,
    *,
    neighbors: int = 5,
    seed: int = 0,
    log: Log = print,
) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE samples (uint8 images, labels) bringing each class up to ``goal``.

    Each class is resampled on its own: imbalanced-learn's SMOTE interpolates only between members
    of the class it is filling, so running it per class gives the same kind of samples while only
    one class's pixels are ever held as float32 (pbc96's whole training split would be 1.3 GB).
    imbalanced-learn still copies the class several times and builds the new rows in float64, so
    the peak is 5-10x one class's floats (bench_smote: 1.46 GiB on pbc96 against 6.34 GiB one-shot).
    SMOTE needs a second class to be present, so a single row labelled with another class rides
    along; it is never used to make samples. The float results are rounded and clipped back to uint8
    (interpolation between two images cannot leave the pixel range; the clip only guards rounding).
    """
    from imblearn.over_sampling import SMOTE

    shape = images.shape[1:]
    made, made_labels = [], []
    for label in np.nonzero(goal > np.bincount(labels, minlength=len(goal)))[0]:
        members = np.nonzero(labels == label)[0]
        missing = int(goal[label]) - len(members)
        if len(members) < 2:
            raise ValueError(f"SMOTE needs at least 2 images of class {label}, found {len(members)}")
        k = min(neighbors, len(members) - 1)
        x = images[members].reshape(len(members), -1).astype(np.float32)
        filler_label = label + 1
        x_fit = np.concatenate([x, x[:1]])
        y_fit = np.concatenate([np.full(len(members), label), [filler_label]])
        sampler = SMOTE(sampling_strategy={label: int(goal[label])}, k_neighbors=k, random_state=seed + int(label))
        resampled, _ = sampler.fit_resample(x_fit, y_fit)
        made.append(np.clip(np.rint(resampled[len(x_fit) :]), 0, 255).astype(np.uint8).reshape(-1, *shape))
        del x, x_fit, resampled, sampler  # free this class's floats before the next class's
        made_labels.append(np.full(missing, label, np.int64))
        log(f"smote: class {label} {len(members)} -> {goal[label]} ({missing} synthetic, k={k})")
    if not made:
        return images[:0], labels[:0]
    return np.concatenate(made), np.concatenate(made_labels)


def class_weight_of(balanced: ImageSet) -> dict[int, float] | None:
    """The loss weights a balanced set was stored with (its :data:`CLASS_COUNTS` table); None when all are 1 (unweighted)."""
    counts = balanced.tables[CLASS_COUNTS]
    weights = dict(zip(counts["label"].astype(int), counts["weight"].astype(float)))
    return None if all(w == 1.0 for w in weights.values()) else {c: w for c, w in weights.items() if w > 0}
