"""Corrupted images: a clean cell blended pixel by pixel with one of a few fixed templates.

Model: ``A = a * B + (1 - a) * C`` with ``A`` the corrupted image, ``B`` a clean base image, ``C``
the template and ``a`` the blend weight. One image alone cannot be decomposed (any ``A`` is
``C = A`` with ``a = 0``), but the corrupted images of one template share ``C``:

1. *Group by template.* For each candidate (an atypical image, see
   :mod:`bc_pipeline.lib.anomalies`), subtract its most correlated clean image, scaled by least
   squares: what is left of a blend is mostly ``(1 - a) * C``. Candidates whose remainders
   correlate above ``link_threshold`` are linked, and grouped by connected components.
2. *Find each base.* Within a group, ``A_i - mean(A)`` equals ``a * (B_i - mean(B))``: the template
   cancels, so the clean image most correlated with that difference is the base.
3. *Fit.* Given the bases, least squares gives the blend weights and the template
   (``A_i - C = a_i (B_i - C)``; ``C`` from all members at once). Then each base is searched again
   as the clean image nearest to ``(A_i - (1 - a_i) C) / a_i``, and the fit repeated. Members that
   do not fit (the template photo itself, at ``a ~ 0``, or an unrelated image) are trimmed.
4. *Score.* The share of an image's own variance that the decomposition explains (1 = perfect),
   with the template estimated from the *other* members of its group (leave one out), so that
   two unrelated images cannot explain each other through a template fitted to both.

Averaging over all members of a template cancels what is left of the bases, so the recovered
template is much cleaner than any single ``(A - a B) / (1 - a)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

REPORT_COLUMNS = ["index", "base_index", "weight", "template", "residual_rms", "score"]


@dataclass(frozen=True)
class CorruptionSettings:
    link_threshold: float = 0.6  # correlation (mean-removed, coarse) that links two candidates
    min_members: int = 2  # distinct images needed to estimate a template
    min_weight: float = 0.05  # below this the image is the template itself, not a blend
    max_weight: float = 0.95  # above this the "blend" is just the cell
    min_score: float = 0.98  # share of the image's variance the decomposition must explain
    iterations: int = 4
    coarse_side: int = 24  # resolution of the base search before the exact check
    shortlist: int = 8  # coarse matches checked at full resolution


@dataclass(frozen=True)
class CorruptionResult:
    report: pd.DataFrame  # one row per corrupted image (REPORT_COLUMNS); indices are the caller's
    templates: np.ndarray  # (K, H, W, 3) float64 in 0..255, K = number of recovered templates
    template_summary: pd.DataFrame  # template, members, weight, median score


def _coarse(images: np.ndarray, side: int) -> np.ndarray:
    """(N, side*side*3) float32 box-downsampled copies, for fast correlation and search."""
    images = np.asarray(images)
    size = images.shape[1]
    if size % side == 0 and images.shape[2] == size:
        f = size // side
        out = np.empty((len(images), side * side * 3), dtype=np.float32)
        for start in range(0, len(images), 1024):
            batch = images[start : start + 1024].astype(np.float32)
            out[start : start + len(batch)] = batch.reshape(len(batch), side, f, side, f, 3).mean(axis=(2, 4)).reshape(len(batch), -1)
        return out
    out = np.empty((len(images), side * side * 3), dtype=np.float32)
    for i, image in enumerate(images):
        small = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((side, side), Image.Resampling.BOX)
        out[i] = np.asarray(small, dtype=np.float32).reshape(-1)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def group_candidates(candidates_coarse: np.ndarray, pool_coarse: np.ndarray, threshold: float) -> np.ndarray:
    """Group candidates by template: connected components of strongly correlated base residuals.

    Each candidate's most correlated clean image is scaled by least squares and subtracted; what is
    left of a blend is mostly ``(1 - a) * C``, so blends of one template agree, while an unusual
    clean image leaves residue that matches nothing.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    mean = pool_coarse.mean(axis=0)
    pool_unit = _unit_rows(pool_coarse - mean)
    best = np.argmax(_unit_rows(candidates_coarse - mean) @ pool_unit.T, axis=1)
    bases = pool_coarse[best]
    da = candidates_coarse - candidates_coarse.mean(axis=1, keepdims=True)
    db = bases - bases.mean(axis=1, keepdims=True)
    scale = (da * db).sum(axis=1) / np.maximum((db * db).sum(axis=1), 1e-9)
    unit = _unit_rows(candidates_coarse - scale[:, None] * bases)
    rows, cols = np.nonzero(np.triu(unit @ unit.T > threshold, k=1))
    n = len(candidates_coarse)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


class _BaseSearch:
    """Nearest clean images, by correlation or distance: coarse shortlist, exact check at full size."""

    def __init__(self, pool: np.ndarray, settings: CorruptionSettings, coarse: np.ndarray | None = None):
        self.pool = pool
        self.settings = settings
        self.coarse = _coarse(pool, settings.coarse_side) if coarse is None else coarse
        self.coarse_sq = (self.coarse.astype(np.float64) ** 2).sum(axis=1)
        self.coarse_mean = self.coarse.mean(axis=0)
        self.coarse_unit = _unit_rows(self.coarse - self.coarse_mean)
        self.mean = pool.reshape(len(pool), -1).mean(axis=0, dtype=np.float64)

    def most_correlated(self, direction: np.ndarray) -> int:
        """Pool row whose deviation from the clean mean best matches ``direction`` (full-size)."""
        coarse_dir = _coarse_float(direction, self.settings.coarse_side)
        scores = self.coarse_unit @ _unit_rows(coarse_dir[None])[0]
        shortlist = np.argsort(-scores)[: self.settings.shortlist]
        full = self.pool[shortlist].reshape(len(shortlist), -1).astype(np.float64) - self.mean
        full_scores = _unit_rows(full) @ _unit_rows(direction[None].astype(np.float64))[0]
        return int(shortlist[int(np.argmax(full_scores))])

    def nearest(self, target: np.ndarray) -> int:
        """Pool row closest (L2) to ``target`` (full-size, float)."""
        coarse_target = _coarse_float(target, self.settings.coarse_side)
        distances = self.coarse_sq - 2.0 * (self.coarse @ coarse_target)  # + |target|^2, same for all
        shortlist = np.argsort(distances)[: self.settings.shortlist]
        full = self.pool[shortlist].reshape(len(shortlist), -1).astype(np.float64)
        return int(shortlist[int(np.argmin(((full - target.reshape(-1)) ** 2).sum(axis=1)))])


def _coarse_float(flat: np.ndarray, side: int) -> np.ndarray:
    """Box-downsample one flattened float image (any range) to side x side x 3."""
    size = int(round(np.sqrt(flat.size / 3)))
    image = flat.reshape(size, size, 3)
    if size % side == 0:
        f = size // side
        return image.reshape(side, f, side, f, 3).mean(axis=(1, 3)).reshape(-1).astype(np.float32)
    # Shift into 0..255 for PIL and back; the shift cancels in correlations and distances.
    low, high = float(image.min()), float(image.max())
    scaled = np.clip((image - low) / max(high - low, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(scaled).resize((side, side), Image.Resampling.BOX), np.float32)
    return (small / 255.0 * (high - low) + low).reshape(-1)


@dataclass
class _Fit:
    members: np.ndarray  # positions in the group
    bases: np.ndarray  # pool rows
    weights: np.ndarray
    template: np.ndarray  # flat float64
    residual_rms: np.ndarray
    score: np.ndarray


def _solve(a_images: np.ndarray, b_images: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares template and per-image weights for A_i = a_i B_i + (1 - a_i) C."""
    if weights is None:  # one shared weight first: A_i - mean(A) = a (B_i - mean(B))
        da = a_images - a_images.mean(axis=0)
        db = b_images - b_images.mean(axis=0)
        shared = float((da * db).sum() / max((db * db).sum(), 1e-9))
        weights = np.full(len(a_images), np.clip(shared, 0.0, 0.99))
    template = estimate_template(a_images, b_images, weights)
    return template, _weights_against(a_images, b_images, template)


def estimate_template(a_images: np.ndarray, b_images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The C minimising sum_i ||A_i - a_i B_i - (1 - a_i) C||^2.

    It is the average of the per-image estimates ``(A_i - a_i B_i) / (1 - a_i)`` weighted by
    ``(1 - a_i)^2``: images with more template in them count more, and what is left of each base
    (rounding, a slightly wrong base) averages out over the members.
    """
    a_images = np.asarray(a_images, dtype=np.float64).reshape(len(a_images), -1)
    b_images = np.asarray(b_images, dtype=np.float64).reshape(len(b_images), -1)
    complement = 1.0 - np.asarray(weights, dtype=np.float64)
    numerator = (complement[:, None] * (a_images - (1.0 - complement)[:, None] * b_images)).sum(axis=0)
    return numerator / max(float((complement**2).sum()), 1e-9)


def _fit_group(a_images: np.ndarray, search: _BaseSearch, settings: CorruptionSettings) -> _Fit | None:
    members = np.arange(len(a_images))
    mean_a = a_images.mean(axis=0)
    bases = np.array([search.most_correlated(a - mean_a) for a in a_images])
    weights = None
    for _ in range(settings.iterations):
        b_images = search.pool[bases[members]].reshape(len(members), -1).astype(np.float64)
        template, member_weights = _solve(a_images[members], b_images, weights)
        # Search every image's base again with the current template, and re-weigh all of them.
        all_weights = np.full(len(a_images), float(np.median(member_weights)))
        all_weights[members] = member_weights
        for i in range(len(a_images)):
            a = max(all_weights[i], settings.min_weight)
            bases[i] = search.nearest((a_images[i] - (1 - a) * template) / a)
        b_all = search.pool[bases].reshape(len(a_images), -1).astype(np.float64)
        held_out = _leave_one_out_templates(a_images, b_all, all_weights, members)
        all_weights = _weights_against(a_images, b_all, held_out)
        residual, score = _quality(a_images, b_all, all_weights, held_out)
        keep = (all_weights >= settings.min_weight) & (all_weights <= settings.max_weight)
        keep &= score >= settings.min_score
        if keep.sum() < settings.min_members:
            return None
        members, weights = np.nonzero(keep)[0], all_weights[keep]
        template = estimate_template(a_images[members], b_all[members], weights)
    # Report weights against the template of all members; scores stay leave-one-out.
    final_weights = _weights_against(a_images[members], b_all[members], template)
    return _Fit(members, bases[members], final_weights, template, residual[members], score[members])


def _leave_one_out_templates(
    a_images: np.ndarray, b_images: np.ndarray, weights: np.ndarray, members: np.ndarray
) -> np.ndarray:
    """For each image, the template estimated from the *other* members (all members for non-members).

    Judging an image against a template it did not help to estimate is what separates a real
    shared template from two unrelated images that any free "template" can average together.
    """
    complement = 1.0 - weights
    contributions = complement[:, None] * (a_images - weights[:, None] * b_images)
    numerator = contributions[members].sum(axis=0)
    denominator = float((complement[members] ** 2).sum())
    held_out = np.repeat((numerator / max(denominator, 1e-9))[None], len(a_images), axis=0)
    for i in members:
        rest = denominator - complement[i] ** 2
        held_out[i] = (numerator - contributions[i]) / max(rest, 1e-9)
    return held_out


def _weights_against(a_images: np.ndarray, b_images: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Per-image a minimising ||(A_i - C_i) - a (B_i - C_i)||^2."""
    da, db = a_images - templates, b_images - templates
    return np.clip((da * db).sum(axis=1) / np.maximum((db * db).sum(axis=1), 1e-9), 0.0, 1.0)


def _quality(a_images, b_images, weights, template) -> tuple[np.ndarray, np.ndarray]:
    """RMS residual and explained share of each image's own variance (template: one or per image)."""
    fitted = weights[:, None] * b_images + (1 - weights[:, None]) * template
    error = ((a_images - fitted) ** 2).mean(axis=1)
    own_variance = ((a_images - a_images.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)
    return np.sqrt(error), 1.0 - error / np.maximum(own_variance, 1e-9)


def find_corruptions(
    images: np.ndarray,
    candidates: np.ndarray,
    pool: np.ndarray,
    *,
    settings: CorruptionSettings = CorruptionSettings(),
) -> CorruptionResult:
    """Decompose candidate images as blends of a pool (clean) image and a shared template.

    ``candidates`` and ``pool`` are row indices into ``images`` (distinct images; no overlap).
    Returns one report row per corrupted candidate, with indices into ``images``.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    pool = np.asarray(pool, dtype=np.int64)
    shape = images.shape[1:]
    empty = CorruptionResult(
        report=pd.DataFrame({c: pd.Series(dtype="float64" if c in ("weight", "residual_rms", "score") else "int64")
                             for c in REPORT_COLUMNS}),
        templates=np.zeros((0, *shape)),
        template_summary=pd.DataFrame({"template": [], "members": [], "weight": [], "median_score": []}),
    )  # fmt: skip
    if len(candidates) < settings.min_members or len(pool) == 0:
        return empty
    candidate_images = np.asarray(images[candidates])
    candidate_coarse = _coarse(candidate_images, settings.coarse_side)
    pool_coarse = _coarse(np.asarray(images[pool]), settings.coarse_side)
    groups = group_candidates(candidate_coarse, pool_coarse, settings.link_threshold)
    # Candidates in no group are merely unusual clean images: they may well be someone's base.
    sizes = np.bincount(groups)
    singles = sizes[groups] < settings.min_members
    pool = np.concatenate([pool, candidates[singles]])
    pool_coarse = np.concatenate([pool_coarse, candidate_coarse[singles]])
    search = _BaseSearch(np.asarray(images[pool]), settings, coarse=pool_coarse)

    fits: list[tuple[np.ndarray, _Fit]] = []
    for group in _ordered_groups(groups):
        if len(group) < settings.min_members:
            continue
        a_images = candidate_images[group].reshape(len(group), -1).astype(np.float64)
        fit = _fit_group(a_images, search, settings)
        if fit is not None:
            fits.append((group, fit))

    if not fits:
        return empty
    rows, templates, summary = [], [], []
    for template_id, (group, fit) in enumerate(fits):
        for member, base, weight, residual, score in zip(
            fit.members, fit.bases, fit.weights, fit.residual_rms, fit.score
        ):
            rows.append((int(candidates[group[member]]), int(pool[base]), float(weight), template_id,
                         float(residual), float(score)))  # fmt: skip
        templates.append(fit.template.reshape(shape))
        summary.append((template_id, len(fit.members), float(np.median(fit.weights)), float(np.median(fit.score))))
    report = pd.DataFrame(rows, columns=REPORT_COLUMNS).sort_values("index").reset_index(drop=True)
    return CorruptionResult(
        report=report,
        templates=np.clip(np.stack(templates), 0.0, 255.0),
        template_summary=pd.DataFrame(summary, columns=["template", "members", "weight", "median_score"]),
    )


def _ordered_groups(labels: np.ndarray) -> list[np.ndarray]:
    """Groups as arrays of positions, ordered by their first member."""
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    return sorted(groups, key=lambda g: int(g.min()))


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 0..255 images."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def templates_from_report(images: np.ndarray, report: pd.DataFrame) -> np.ndarray:
    """Recover each template from the report's decompositions (distinct images only).

    This is the "average the per-image estimates C = (A - a B) / (1 - a)" step, done as the
    weighted least-squares average of :func:`estimate_template`.
    """
    if report.empty:
        return np.zeros((0, *images.shape[1:]))
    distinct = report.drop_duplicates("representative") if "representative" in report else report
    templates = []
    for _, rows in distinct.groupby("template", sort=True):
        a_images = np.asarray(images[rows["index"].to_numpy()], dtype=np.float64)
        b_images = np.asarray(images[rows["base_index"].to_numpy()], dtype=np.float64)
        template = estimate_template(a_images, b_images, rows["weight"].to_numpy())
        templates.append(np.clip(template, 0.0, 255.0).reshape(images.shape[1:]))
    return np.stack(templates)
