"""Find images whose label is probably wrong: confident learning on out-of-sample probabilities.

Why: duplicates with disagreeing labels are caught by :mod:`bc_pipeline.quality.cleaning`, but an
image with one wrong label and no duplicate passes untouched; and wrong labels are the commonest
defect of hand-labelled microscopy sets (immature granulocytes vs neutrophils, monocytes vs
lymphocytes). This module implements confident learning (Northcutt, Jiang & Chuang, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021) from the paper, not from cleanlab
(AGPL):

1. **Per-class thresholds.** ``t_j`` = the mean probability of class j over the images labelled j
   (how confident the model is, on average, where the label is j). Derived from the file, never set:
   a hard class has a low threshold, an easy one a high one.
2. **Confident joint.** An image labelled i counts towards (i, j) when its probability of j reaches
   ``t_j`` (the highest such j where several do). Calibrated so each row sums to the number of images
   labelled i, and normalised, it estimates the joint distribution ``Q`` of given and true labels
   (step 4 refines it; ``LabelIssues.noise_matrix`` is the refined one row-normalised, P(true j | given i)).
3. **Pruning by noise rate.** For every off-diagonal cell (i, j), the ``n * Q[i, j]`` images labelled
   i with the largest margin ``p_j - p_i`` are issues; an image whose most probable class is its
   given label is never one (the model agrees with the label). Available as ``flag_by:
   prune_by_noise_rate``; not the default, because ``Q`` counts the model's own confident mistakes
   as label noise (pbc96, 5 % confusable flips: 726 images estimated wrong for 577 planted, precision
   0.74).
4. **Posterior check (the default).** From ``Q`` as a start, expectation-maximisation fits the noise
   matrix P(given i | true j) and a temperature for the probabilities by maximum likelihood of the
   given labels under "true class from the model, then a flip from the matrix" (:func:`estimate_noise`).
   Each image then has a posterior probability that its label is wrong, and it is an issue when
   that is above 1/2: wrong more likely than right, the Bayes decision at equal costs, a property of
   the estimate and not a tuned cut. Why it counts better: an image the model is unsure of weighs
   in as a fraction, not as a whole flip; on pbc96 with 5 % planted it estimates 4.9 %.
5. **Ranking.** Issues are ranked by *normalised margin* (``p_given - max_other``, lowest first) or
   by *self-confidence* (``p_given``).

The probabilities must be out-of-sample (each from a model that never saw the image, e.g. k-fold):
a model that saw a wrong label learns it, and then agrees with it. :func:`out_of_fold_probabilities`
makes them cheaply from fixed image embeddings (a small MLP per fold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.core.folds import fold_assignment
from bc_pipeline.core.settings import declare

RANKINGS = ("normalized_margin", "self_confidence")
FLAG_RULES = ("posterior", "prune_by_noise_rate")
ISSUE_COLUMNS = [
    "row", "given", "suggested", "score", "self_confidence", "suggested_probability", "wrong_probability", "rank", "reason",
]  # fmt: skip


@dataclass(frozen=True)
class LabelIssueSettings:
    """How the out-of-sample probabilities are made and the issues ranked and acted on."""

    folds: int = declare(5, "k: each train/val image is predicted by a model fitted on the other k-1 folds", ge=3, le=20)
    hidden: int = declare(256, "hidden units of the per-fold MLP probe; 0: a logistic regression", ge=0)
    penalty: float = declare(1e-3, "L2 penalty of the probe (MLP alpha; 1/C of the logistic regression)", gt=0)
    passes: int = declare(2, "rounds of fit-and-flag; each refits without the previous round's issues", ge=1, le=5)
    ranked_by: str = declare("normalized_margin", "issue order: normalized_margin (p_given - best other) or self_confidence (p_given)")
    flag_by: str = declare("posterior", "which images are issues: posterior (probability the label is wrong > 1/2) or prune_by_noise_rate (confident learning's n*Q count)")
    auto_drop: int = declare(0, "drop this many top-ranked issues without review (written as decided_by auto in the review file); 0: only what a person decides", ge=0)
    seed: int = declare(0, "deals the images into folds and seeds the probe")

    def __post_init__(self) -> None:
        if self.ranked_by not in RANKINGS:
            raise ValueError(f"ranked_by must be one of {RANKINGS}, not {self.ranked_by!r}")
        if self.flag_by not in FLAG_RULES:
            raise ValueError(f"flag_by must be one of {FLAG_RULES}, not {self.flag_by!r}")


@dataclass(frozen=True)
class NoiseEstimate:
    """What :func:`estimate_noise` found.

    ``wrong``: per image, the posterior probability that its given label is wrong. ``true``: per
    image, the posterior over its true class (rows sum to 1). ``joint``: the joint distribution of
    (given, true) labels, the images' expected counts, summing to 1. ``temperature``: the
    probabilities were recalibrated as ``p ** (1 / temperature)``, renormalised.
    """

    wrong: np.ndarray
    true: np.ndarray
    joint: np.ndarray
    temperature: float
    iterations: int

    @property
    def flips(self) -> np.ndarray:
        """P(given i | true j): columns sum to 1 (a class no image is likely to be keeps its label)."""
        return _column_normalised(self.joint)

    @property
    def rate(self) -> float:
        """The estimated share of wrong labels."""
        return float(self.wrong.mean()) if len(self.wrong) else 0.0


@dataclass(frozen=True)
class LabelIssues:
    """What :func:`find_label_issues` found.

    ``issues``: one row per flagged image, best first (columns ``ISSUE_COLUMNS``; ``row`` indexes the
    inputs, ``given`` / ``suggested`` are class numbers). ``thresholds``: the per-class thresholds.
    ``confident_joint``: raw counts (given x likely true). ``joint``: the estimated joint distribution
    of given x true labels (:func:`estimate_noise`'s). ``noise``: that estimate in full.
    """

    issues: pd.DataFrame
    thresholds: np.ndarray
    confident_joint: np.ndarray
    joint: np.ndarray
    noise: NoiseEstimate

    @property
    def noise_matrix(self) -> np.ndarray:
        """P(likely true class | given class): rows = given, columns = likely true; rows sum to 1."""
        totals = self.joint.sum(axis=1, keepdims=True)
        return np.divide(self.joint, totals, out=np.zeros_like(self.joint), where=totals > 0)


def check_probabilities(labels: np.ndarray, probabilities: np.ndarray) -> None:
    """Raise ValueError naming the problem when labels and probabilities do not fit together."""
    if probabilities.ndim != 2 or len(probabilities) != len(labels):
        raise ValueError(f"probabilities of shape {probabilities.shape} for {len(labels)} labels: need (n, classes)")
    if len(labels) and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise ValueError(f"labels must lie in 0..{probabilities.shape[1] - 1}; found {labels.min()}..{labels.max()}")
    if not np.isfinite(probabilities).all() or (probabilities < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of probabilities must sum to 1")


def per_class_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``t_j``: the mean probability of class j over the images labelled j (1 where no image is)."""
    classes = probabilities.shape[1]
    thresholds = np.ones(classes)
    for j in range(classes):
        mine = labels == j
        if mine.any():
            thresholds[j] = probabilities[mine, j].mean()
    return thresholds


def confident_joint(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts given x likely true, each image's likely true class or -1 where no class reaches its threshold)."""
    classes = probabilities.shape[1]
    above = probabilities >= thresholds[None, :] - 1e-12
    likely = np.where(above.any(axis=1), np.where(above, probabilities, -1.0).argmax(axis=1), -1)
    counts = np.zeros((classes, classes), np.int64)
    counted = likely >= 0
    np.add.at(counts, (labels[counted], likely[counted]), 1)
    return counts, likely


def calibrated_joint(counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint scaled so row i sums to the number of images labelled i, then to a total of 1."""
    given = np.bincount(labels, minlength=counts.shape[0]).astype(float)
    rows = counts.sum(axis=1, keepdims=True).astype(float)
    scaled = np.divide(counts * given[:, None], rows, out=np.zeros(counts.shape), where=rows > 0)
    total = scaled.sum()
    return scaled / total if total > 0 else scaled


def find_label_issues(
    labels: np.ndarray, probabilities: np.ndarray, ranked_by: str = "normalized_margin",
    class_names: Sequence[str] | None = None, flag_by: str = "posterior",
) -> LabelIssues:  # fmt: skip
    """Confident learning and the posterior check (module docstring): the images whose label is probably wrong, ranked.

    ``class_names`` name the classes in the reasons (default: their numbers).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    check_probabilities(labels, probabilities)
    if ranked_by not in RANKINGS:
        raise ValueError(f"ranked_by must be one of {RANKINGS}, not {ranked_by!r}")
    if flag_by not in FLAG_RULES:
        raise ValueError(f"flag_by must be one of {FLAG_RULES}, not {flag_by!r}")
    thresholds = per_class_thresholds(labels, probabilities)
    counts, _ = confident_joint(labels, probabilities, thresholds)
    start = calibrated_joint(counts, labels)
    noise = estimate_noise(labels, probabilities, start)
    if flag_by == "posterior":
        flagged = np.flatnonzero(noise.wrong > 0.5)
        others = np.where(np.arange(probabilities.shape[1])[None, :] == labels[:, None], -1.0, noise.true)
        suggested = others.argmax(axis=1)
    else:
        flagged, suggested = _prune_by_noise_rate(labels, probabilities, start)
    issues = _issue_table(labels, probabilities, (flagged, suggested), noise.wrong, ranked_by)
    names = [str(c) for c in (class_names if class_names is not None else range(probabilities.shape[1]))]
    issues["reason"] = [_reason(names, thresholds, row) for row in issues.itertuples()]
    return LabelIssues(issues, thresholds, counts, noise.joint, noise)


def estimate_noise(
    labels: np.ndarray, probabilities: np.ndarray, start: np.ndarray, *, iterations: int = 200, tolerance: float = 1e-6,
) -> NoiseEstimate:  # fmt: skip
    """The noise matrix and each image's probability of a wrong label, by expectation-maximisation.

    Model: an image's true class is drawn from the (tempered) out-of-sample probabilities, then its
    given label from P(given | true). E-step: each image's posterior over its true class, from its
    probabilities times the column of its given label. M-step: the matrix from those posteriors
    summed, and the temperature that maximises the likelihood of the given labels. ``start``: a joint
    of (given, true) to begin from (confident learning's calibrated joint).

    Why a temperature: the out-of-fold probe is over- or under-confident by an amount no one can
    set by hand, and the posterior depends on the probabilities' scale; fitting it through the noise
    model (not against the given labels directly, which would soften the probabilities by the noise
    itself) keeps it about the model alone.
    """
    labels = np.asarray(labels, dtype=np.int64)
    flips, temperature = _column_normalised(start), 1.0
    if len(labels) == 0:
        return NoiseEstimate(np.zeros(0), np.zeros((0, len(flips))), np.zeros_like(flips), temperature, 0)
    for done in range(1, iterations + 1):
        true = _true_class_posterior(labels, _tempered(probabilities, temperature), flips)
        counts = np.zeros_like(flips)
        np.add.at(counts, labels, true)
        updated = _column_normalised(counts)
        temperature = _fit_temperature(labels, probabilities, updated)
        converged = np.abs(updated - flips).max() < tolerance
        flips = updated
        if converged:
            break
    true = _true_class_posterior(labels, _tempered(probabilities, temperature), flips)
    joint = np.zeros_like(flips)
    np.add.at(joint, labels, true)
    wrong = 1.0 - true[np.arange(len(labels)), labels]
    return NoiseEstimate(wrong, true, joint / max(len(labels), 1), temperature, done)


def _column_normalised(matrix: np.ndarray) -> np.ndarray:
    """Columns scaled to sum to 1; an empty column becomes that class keeping its label."""
    totals = matrix.sum(axis=0, keepdims=True)
    return np.where(totals > 0, matrix / np.where(totals > 0, totals, 1.0), np.eye(matrix.shape[0]))


def _tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``p ** (1 / temperature)``, renormalised per row (computed in logs)."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def _true_class_posterior(labels: np.ndarray, probabilities: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """P(true j | image, given label) ∝ p_j * P(given | true j)."""
    joint = probabilities * flips[labels, :]
    return joint / np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)


def _fit_temperature(labels: np.ndarray, probabilities: np.ndarray, flips: np.ndarray) -> float:
    """The temperature in [1/4, 4] that maximises the likelihood of the given labels under ``flips``."""
    from scipy.optimize import minimize_scalar

    def loss(log_temperature: float) -> float:
        likely = (_tempered(probabilities, float(np.exp(log_temperature))) * flips[labels, :]).sum(axis=1)
        return float(-np.log(likely + 1e-300).mean())

    found = minimize_scalar(loss, bounds=(np.log(0.25), np.log(4.0)), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(found.x))


def _reason(names: Sequence[str], thresholds: np.ndarray, issue: tuple) -> str:
    """One issue in words: the given class's probability against its threshold, the suggested class's, the posterior."""
    given, best = names[issue.given], names[issue.suggested]
    return (f"labelled {given}, but a model that never saw it gives {given} {issue.self_confidence:.2f} "
            f"(its class's threshold {thresholds[issue.given]:.2f}) and {best} {issue.suggested_probability:.2f}; "
            f"label wrong with probability {issue.wrong_probability:.2f}")  # fmt: skip


def _prune_by_noise_rate(labels: np.ndarray, probabilities: np.ndarray, joint: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flagged rows, suggested class per row): per off-diagonal (i, j), the n Q[i, j] largest margins p_j - p_i."""
    n, classes = probabilities.shape
    rows = np.arange(n)
    flagged = np.zeros(n, bool)
    suggested = probabilities.argmax(axis=1)
    best_margin = np.full(n, -np.inf)
    for i in range(classes):
        mine = np.flatnonzero(labels == i)
        for j in range(classes):
            count = int(round(n * joint[i, j]))
            if i == j or count == 0 or len(mine) == 0:
                continue
            margin = probabilities[mine, j] - probabilities[mine, i]
            top = mine[np.argsort(-margin, kind="stable")[: min(count, len(mine))]]
            flagged[top] = True
            better = probabilities[top, j] - probabilities[top, i] > best_margin[top]
            suggested[top[better]] = j
            best_margin[top[better]] = (probabilities[top, j] - probabilities[top, i])[better]
    flagged &= probabilities.argmax(axis=1) != labels  # the model agrees with the label: not an issue
    return rows[flagged], suggested


def label_quality(labels: np.ndarray, probabilities: np.ndarray, ranked_by: str = "normalized_margin") -> np.ndarray:
    """Per image, how well the label fits (lower = more likely wrong): self-confidence or normalised margin."""
    given = probabilities[np.arange(len(labels)), labels]
    if ranked_by == "self_confidence":
        return given
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return given - others.max(axis=1)


def _issue_table(
    labels: np.ndarray, probabilities: np.ndarray, found: tuple[np.ndarray, np.ndarray], wrong: np.ndarray, ranked_by: str
) -> pd.DataFrame:
    """The flagged rows (``found``: rows, suggested class of every image) as a table, lowest label quality first.

    ``reason`` is filled in by the caller.
    """
    flagged, suggested = found
    quality = label_quality(labels, probabilities, ranked_by)[flagged]
    order = np.argsort(quality, kind="stable")
    rows = flagged[order]
    given, best = labels[rows], suggested[rows]
    own, other = probabilities[rows, given], probabilities[rows, best]
    table = pd.DataFrame({
        "row": rows.astype(np.int64), "given": given, "suggested": best.astype(np.int64),
        "score": quality[order], "self_confidence": own, "suggested_probability": other, "wrong_probability": wrong[rows],
        "rank": np.arange(1, len(rows) + 1, dtype=np.int64),
    })  # fmt: skip
    table["reason"] = ""
    return table[ISSUE_COLUMNS]


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None,
    settings: LabelIssueSettings | None = None, exclude: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(probabilities (n, classes), fold of each row): each row predicted by a model fitted without it.

    Per fold, a small MLP (one hidden layer of ``settings.hidden`` units; 0: a multinomial logistic
    regression) on standardised ``features``, fitted on the other folds only, early-stopped on a
    tenth of them. Rows of one ``group`` (near duplicates) share a fold: a near copy in the fitting
    folds would carry the row's own label, wrong or not, into its prediction. ``exclude``: rows left
    out of every fit but still predicted (the issues of a previous pass). Why an MLP: on the same
    embeddings it ranks planted wrong labels better than the linear probe (pbc96, 5 % confusable
    flips: precision 0.81 against 0.53 at recall 0.8), at the same out-of-fold accuracy.
    """
    settings = settings or LabelIssueSettings()
    labels = np.asarray(labels, dtype=np.int64)
    classes = int(labels.max()) + 1 if len(labels) else 0
    assignment = fold_assignment(labels, np.arange(len(labels)) if groups is None else groups, settings.folds, seed=settings.seed)
    usable = np.ones(len(labels), bool) if exclude is None else ~np.asarray(exclude, bool)
    probabilities = np.zeros((len(labels), classes))
    for fold in range(settings.folds):
        held, fit = assignment == fold, (assignment != fold) & usable
        if not held.any():
            continue
        mean, scale = features[fit].mean(axis=0), features[fit].std(axis=0) + 1e-6
        counts = np.bincount(labels[fit])
        model = _probe(settings, early_stopping=counts[counts > 0].min() >= 20).fit((features[fit] - mean) / scale, labels[fit])
        probabilities[np.ix_(held, model.classes_)] = model.predict_proba((features[held] - mean) / scale)
        if log is not None:
            log(f"fold {fold + 1}/{settings.folds}: {int(held.sum())} predicted by a model fitted on {int(fit.sum())}")
    return probabilities, assignment


def _probe(settings: LabelIssueSettings, early_stopping: bool = True) -> object:
    """The per-fold classifier (scikit-learn), seeded; no early stopping where a class has too few rows to hold some out."""
    if settings.hidden == 0:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=1.0 / settings.penalty, max_iter=500)
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier((settings.hidden,), alpha=settings.penalty, max_iter=40, early_stopping=early_stopping, random_state=settings.seed)


def find_label_issues_in_passes(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, settings: LabelIssueSettings,
    class_names: Sequence[str] | None = None, log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, LabelIssues]:  # fmt: skip
    """(final probabilities, folds, issues): ``settings.passes`` rounds of out-of-fold fits and confident learning.

    Each pass after the first fits without the images the previous pass flagged: a model fitted on
    wrong labels learns part of them (it gives a flipped class pair some probability everywhere,
    which both hides issues and inflates the estimated noise); refitted on the cleaner rest, its
    probabilities of the flagged and unflagged images alike are closer to the truth. Measured on
    pbc96 with 5 % confusable flips: F1 0.74 -> 0.80; a third pass changed nothing.
    """
    flagged = np.zeros(len(labels), bool)
    for number in range(settings.passes):
        probabilities, folds = out_of_fold_probabilities(features, labels, groups, settings, flagged, log)
        found = find_label_issues(labels, probabilities, settings.ranked_by, class_names, settings.flag_by)
        flagged = np.zeros(len(labels), bool)
        flagged[found.issues["row"].to_numpy()] = True
        if log is not None:
            log(f"pass {number + 1}/{settings.passes}: {int(flagged.sum())} issues")
    return probabilities, folds, found
