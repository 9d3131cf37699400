"""Calibration: how far a classifier's confidence is from its accuracy, and temperature scaling.

A model that says "90 %" should be right 9 times in 10. Networks trained with cross-entropy are
usually over-confident; dividing their logits by one temperature ``T > 1`` fitted on held-out data
fixes most of it without changing any prediction (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017). Our models end in a softmax, so the logits are recovered as ``log p`` (equal
to the logits up to a per-image constant, which softmax ignores).

numpy only: the training worker fits the temperature without SciPy or Keras, and ``bc-predict``
applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Equal-width confidence bins of the expected calibration error (15, as in Guo et al.).
ECE_BINS = 15
# Bounds of the temperature search: far outside what any trained classifier needs.
_T_RANGE = (0.05, 20.0)
_EPS = 1e-12


def scale_probabilities(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(proba) / temperature)``: the same ranking, sharper (T < 1) or softer (T > 1)."""
    proba = np.asarray(proba, np.float64)
    if temperature == 1.0:
        return proba
    logits = np.log(np.clip(proba, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the true labels."""
    picked = np.asarray(proba)[np.arange(len(labels)), np.asarray(labels, np.int64)]
    return float(-np.mean(np.log(np.clip(picked, _EPS, 1.0))))


def fit_temperature(proba: np.ndarray, labels: np.ndarray, *, iterations: int = 60) -> float:
    """The temperature that minimises the validation NLL (golden-section search on log T).

    The NLL of temperature-scaled logits is unimodal in ``log T``, so a bracketing search finds
    its minimum without gradients. An empty set gives 1.0 (no scaling).
    """
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    low, high = np.log(_T_RANGE[0]), np.log(_T_RANGE[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0

    def loss(log_t: float) -> float:
        return negative_log_likelihood(scale_probabilities(proba, float(np.exp(log_t))), labels)

    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(np.exp((low + high) / 2.0))


@dataclass(frozen=True)
class Reliability:
    """Per-bin confidence and accuracy: the reliability diagram's data and the ECE it sums to."""

    edges: np.ndarray  # (bins + 1,)
    confidence: np.ndarray  # mean confidence per bin (NaN where empty)
    accuracy: np.ndarray  # accuracy per bin (NaN where empty)
    counts: np.ndarray  # images per bin
    ece: float  # sum over bins of |accuracy - confidence| x share of images
    nll: float
    brier: float


def reliability(proba: np.ndarray, labels: np.ndarray, *, bins: int = ECE_BINS) -> Reliability:
    """Bin predictions by their top probability and compare each bin's confidence with its accuracy."""
    proba, labels = np.asarray(proba, np.float64), np.asarray(labels, np.int64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    if len(labels) == 0:
        empty = np.full(bins, np.nan)
        return Reliability(edges, empty, empty, np.zeros(bins, np.int64), float("nan"), float("nan"), float("nan"))
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == labels).astype(np.float64)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / counts
        mean_accuracy = np.bincount(which, weights=correct, minlength=bins) / counts
    gaps = np.abs(np.nan_to_num(mean_accuracy) - np.nan_to_num(mean_confidence))
    ece = float(np.sum(gaps * counts) / len(labels))
    onehot = np.eye(proba.shape[1])[labels]
    brier = float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))
    return Reliability(edges, mean_confidence, mean_accuracy, counts, ece, negative_log_likelihood(proba, labels), brier)


def calibration_summary(proba: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE, NLL and Brier score before and after scaling by ``temperature``."""
    before, after = reliability(proba, labels), reliability(scale_probabilities(proba, temperature), labels)
    return {
        "temperature": float(temperature),
        "ece": before.ece,
        "ece_scaled": after.ece,
        "nll": before.nll,
        "nll_scaled": after.nll,
        "brier": before.brier,
        "brier_scaled": after.brier,
    }


def stored_or_fitted(
    temperature: float | None, source: str, val_proba: np.ndarray, val_labels: np.ndarray, test_proba: np.ndarray,
    test_labels: np.ndarray,
) -> dict[str, float | str]:  # fmt: skip
    """:func:`calibration_summary` on the test split with the model's stored ``temperature`` (fitted by ``source``).

    A model stored before temperatures were (``temperature`` None) gets one fitted here on the
    validation split; ``fitted_by`` says which.
    """
    if temperature:
        return {**calibration_summary(test_proba, test_labels, float(temperature)), "fitted_by": source}
    fitted = fit_temperature(val_proba, val_labels)
    return {**calibration_summary(test_proba, test_labels, fitted), "fitted_by": "the evaluation, on the validation split"}
