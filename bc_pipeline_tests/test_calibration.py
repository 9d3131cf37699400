"""Calibration: ECE, reliability bins and temperature scaling on generated and real predictions."""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.models.calibration import (
    calibration_summary,
    fit_temperature,
    reliability,
    scale_probabilities,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_sample(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from the softmax of those logits: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.5, size=(n, classes))
    proba = _softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in proba])
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.0, 3.5])
def test_the_fitted_temperature_undoes_a_known_over_or_under_confidence(true_temperature: float):
    logits, labels = _calibrated_sample(20_000, 8, seed=int(true_temperature * 10))
    distorted = _softmax(logits / (1.0 / true_temperature))  # sharper for T > 1: over-confident
    fitted = fit_temperature(distorted, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.06)
    summary = calibration_summary(distorted, labels, fitted)
    assert summary["ece_scaled"] < 0.02
    if true_temperature != 1.0:
        assert summary["ece"] > 2 * summary["ece_scaled"]
        assert summary["nll_scaled"] < summary["nll"]


def test_scaling_never_changes_the_predicted_class():
    logits, _ = _calibrated_sample(2_000, 8, seed=3)
    proba = _softmax(logits)
    for temperature in (0.2, 0.7, 1.0, 4.0):
        scaled = scale_probabilities(proba, temperature)
        assert np.array_equal(scaled.argmax(1), proba.argmax(1))
        assert np.allclose(scaled.sum(1), 1.0)


def test_reliability_bins_by_hand():
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.35, 0.65]])
    labels = np.array([0, 1, 0, 1])  # bin 0.9-1: confidence 0.95, accuracy 0.5; 0.5-0.6: 1.0 right; 0.6-0.7: right
    result = reliability(proba, labels, bins=10)
    assert result.counts.sum() == 4 and result.counts[9] == 2 and result.counts[5] == 1 and result.counts[6] == 1
    expected = (2 * abs(0.5 - 0.95) + abs(1 - 0.55) + abs(1 - 0.65)) / 4
    assert result.ece == pytest.approx(expected)
    assert np.isnan(result.accuracy[0])


def test_empty_sets_give_no_scaling_and_no_error():
    assert fit_temperature(np.zeros((0, 8)), np.zeros(0, np.int64)) == 1.0
    assert np.isnan(reliability(np.zeros((0, 8)), np.zeros(0, np.int64)).ece)
