"""The algebra of a stored blend ``A = a * B + (1 - a) * C + t``, and the noise it is judged by.

A corrupted image is a clean cell ``B`` and a template ``C`` mixed pixel by pixel with the cell's
share ``a``, then stored as integers. Storing is the only noise: rounding to the nearest integer
leaves an error uniform on [-0.5, 0.5] in every value (RMS ``1/sqrt(12)``, about 0.29 grey
levels); truncation leaves the same spread around a constant 0.5, which the per-image offset
``t`` absorbs. Nothing else perturbs a blend of arrays, so every test here asks whether a
residual is *as small as rounding makes it*, with the rounding noise of each image that enters
the fit propagated through its coefficient. Real images that are not blends of each other miss
that level by orders of magnitude: two distinct photographs of cells, even near duplicates of
one cell, differ by sensor noise and JPEG artefacts of several grey levels.

Everything works on flattened float arrays of any resolution. A box-downsampled copy of a blend
is still an exact blend of the downsampled parts (downsampling is linear), with the rounding
noise divided by the square root of the pixels averaged per coarse value; see
:func:`noise_rms`.
"""

from __future__ import annotations

import numpy as np

#: RMS of the error that storing a real value as an integer leaves (uniform over one step).
QUANTISATION_RMS = 1.0 / np.sqrt(12.0)


def noise_rms(pixels_per_value: float) -> float:
    """Rounding noise per value after averaging ``pixels_per_value`` independent pixels."""
    return QUANTISATION_RMS / np.sqrt(max(pixels_per_value, 1.0))


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=-1, keepdims=True)


def affine_fit(target: np.ndarray, points: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``target ~ sum_k c_k * points[k] + t`` with ``sum_k c_k = 1``, row by row.

    ``target`` is (m, d), each ``points[k]`` (m, d); the offset ``t`` is free (it absorbs the
    rounding mode). Returns (coefficients (m, K), residual RMS (m,)). With one point the fit is
    ``target ~ point + t``.
    """
    y = _centre(np.asarray(target, np.float64) - points[0])
    basis = [_centre(np.asarray(p, np.float64) - points[0]) for p in points[1:]]
    m = len(y)
    if not basis:
        return np.ones((m, 1)), np.sqrt((y**2).mean(axis=1))
    q = np.stack(basis, axis=1)  # (m, K-1, d)
    gram = np.einsum("mkd,mld->mkl", q, q)
    rhs = np.einsum("mkd,md->mk", q, y)
    scale = np.maximum(np.einsum("mkk->m", gram), 1e-12)[:, None, None]
    ridge = 1e-12 * scale * np.eye(q.shape[1])[None]
    coef = np.linalg.solve(gram + ridge, rhs[..., None])[..., 0]
    residual = y - np.einsum("mk,mkd->md", coef, q)
    first = 1.0 - coef.sum(axis=1, keepdims=True)
    return np.concatenate([first, coef], axis=1), np.sqrt((residual**2).mean(axis=1))


def scale_fit(target: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """RMS residual of ``target ~ s * reference + t`` (free scale and offset), row by row.

    This is how much of ``target`` one other image cannot explain. For a blend and its own base
    it is the template's share, ``(1 - a)`` times the part of ``C`` not already like ``B``.
    """
    y, x = _centre(np.asarray(target, np.float64)), _centre(np.asarray(reference, np.float64))
    s = (x * y).sum(axis=1) / np.maximum((x * x).sum(axis=1), 1e-12)
    return np.sqrt(((y - s[:, None] * x) ** 2).mean(axis=1))


def template_part(scale_residual: np.ndarray, blend_residual: np.ndarray) -> np.ndarray:
    """RMS of what the template explains in a blend beyond a scaled copy of its base.

    ``scale_residual`` is :func:`scale_fit` of the blend on its base, ``blend_residual`` what is
    left once the template enters (:func:`blend_fit`); the difference of their squares is the
    template's share of the image. A copy of the base with its own noise or a contrast change
    (the "blend" with ``a`` near 1 that any template would fit) leaves next to nothing here.
    """
    return np.sqrt(np.maximum(np.asarray(scale_residual) ** 2 - np.asarray(blend_residual) ** 2, 0.0))


def blend_fit(
    blends: np.ndarray, bases: np.ndarray, template: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row weight ``a``, offset ``t`` and residual RMS of ``A - C = a (B - C) + t``.

    ``template`` is one flat template (d,) or one per row (m, d). Float32 inputs stay float32
    (the coarse searches fit many rows at once).
    """
    dtype = np.result_type(blends, bases, template, np.float32)
    y = np.asarray(blends, dtype) - template
    x = np.asarray(bases, dtype) - template
    y_mean, x_mean = y.mean(axis=1), x.mean(axis=1)
    y -= y_mean[:, None]
    x -= x_mean[:, None]
    xx, xy, yy = (np.einsum("md,md->m", u, v) for u, v in ((x, x), (x, y), (y, y)))
    weight = xy / np.maximum(xx, 1e-12)
    residual = np.sqrt(np.maximum(yy - weight * xy, 0.0) / x.shape[1])
    return weight, y_mean - weight * x_mean, residual


def estimate_template(
    blends: np.ndarray, bases: np.ndarray, weights: np.ndarray, offsets: np.ndarray | None = None
) -> np.ndarray:
    """The C minimising sum_i ||A_i - a_i B_i - (1 - a_i) C - t_i||^2.

    It is the average of the per-image estimates ``(A_i - a_i B_i - t_i) / (1 - a_i)`` weighted by
    ``(1 - a_i)^2``: images with more template in them count more, and what is left of rounding
    averages out over the members. A copy of the template itself is a member with ``a = 0``.
    """
    blends = np.asarray(blends, np.float64).reshape(len(blends), -1)
    bases = np.asarray(bases, np.float64).reshape(len(bases), -1)
    weights = np.asarray(weights, np.float64)
    offsets = np.zeros(len(blends)) if offsets is None else np.asarray(offsets, np.float64)
    complement = 1.0 - weights
    numerator = (complement[:, None] * (blends - weights[:, None] * bases - offsets[:, None])).sum(axis=0)
    return numerator / max(float((complement**2).sum()), 1e-12)


def template_noise(weights: np.ndarray, rms: float, base_rms: float = 0.0) -> float:
    """RMS error of :func:`estimate_template` from the noise of its members (``rms`` each) and, where
    storage was lossy, of their bases (``base_rms``, entering with the cell share)."""
    complement = 1.0 - np.asarray(weights, np.float64)
    total = max(float((complement**2).sum()), 1e-12)
    variance = float((complement**2 * (rms**2 + (1.0 - complement) ** 2 * base_rms**2)).sum())
    return float(np.sqrt(variance) / total)


def expected_residual(
    weights: np.ndarray, rms: float, template_rms: float | np.ndarray, base_rms: float = 0.0
) -> np.ndarray:
    """RMS that noise alone leaves when a blend is fitted against an estimated template.

    The blend's own noise (``rms``), its base's (``base_rms``: zero where only the blend was
    rounded, the storage noise where every image went through a lossy format) scaled by the cell
    share, and the template's error scaled by the template's share.
    """
    weights = np.asarray(weights, np.float64)
    return np.sqrt(rms**2 + (weights * base_rms) ** 2 + ((1.0 - weights) * template_rms) ** 2)


def fit_members(
    blends: np.ndarray, bases: np.ndarray, is_copy: np.ndarray, rounds: int = 3, noise: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares template and per-image weights and offsets: (template, weights, offsets).

    Written as ``C = B_i + p_i (A_i - B_i)`` with ``p_i = 1 / (1 - a_i)``, every blend says that
    the template lies on the line through its base and itself, and the template is the point
    nearest to all those lines: linear in ``C`` and the ``p_i``, so one small (members x members)
    solve gives it, where alternating between template and weights would crawl along the valley
    that similar-looking bases make. Distances to a line are weighted ``(1 - a_i)^2``, the inverse
    of how much that line magnifies its blend's rounding (refined over ``rounds``). A copy of the
    template (``is_copy``; its base row is ignored) is a point on it with weight 1. Mean levels
    are removed first, so per-image offsets cannot bend the fit; the template's own mean level
    is then the one that leaves no offset on average.

    ``noise`` (per member, e.g. its residual against the template) weights each member by the
    inverse of its variance: under lossy storage some images carry several times the noise of
    others (fine texture compresses worse), and an equal vote would let them blur the template.
    """
    blends = np.asarray(blends, np.float64)
    is_copy = np.asarray(is_copy, bool)
    vote = np.ones(len(blends)) if noise is None else 1.0 / np.maximum(np.asarray(noise, np.float64), 1e-6) ** 2
    vote = vote / vote.mean()
    bases = np.where(is_copy[:, None], 0.0, np.asarray(bases, np.float64))
    lines = ~is_copy
    a, b = _centre(blends), _centre(bases)
    d = (a - b)[lines]
    b_lines, points, point_vote = b[lines], a[is_copy], vote[is_copy]
    gram = d @ d.T
    cross = d @ b_lines.T  # d_k . b_i
    p = np.full(len(d), 2.0)  # a = 0.5 to start the weights
    for _ in range(max(rounds, 1)):
        w = vote[lines] / p**2
        total = w.sum() + point_vote.sum()
        # Q = (sum_i w_i b_i + sum_copies v_j P_j) / total, projected on each d_k
        dq = (cross @ w + d @ (point_vote @ points)) / total
        matrix = np.diag(np.diag(gram)) - gram * (w / total)[None, :]
        rhs = dq - np.diag(cross)
        ridge = 1e-12 * max(float(np.trace(gram)), 1e-12) * np.eye(len(d))
        p = np.linalg.solve(matrix + ridge, rhs) if len(d) else p
        p = np.maximum(p, 1.0 + 1e-6)  # a = 1 - 1/p stays in [0, 1)
    w = vote[lines] / p**2
    total = w.sum() + point_vote.sum()
    centred = ((w[:, None] * (b_lines + p[:, None] * d)).sum(axis=0) + point_vote @ points) / total
    # Mean level: the one for which the offsets t_i = mean(A_i - a_i B_i - (1 - a_i) C) average 0.
    weights = np.zeros(len(blends))
    weights[lines] = 1.0 - 1.0 / p
    raw_lines = bases[lines].mean(axis=1) + p * (blends[lines].mean(axis=1) - bases[lines].mean(axis=1))
    level = ((w * raw_lines).sum() + (point_vote * blends[is_copy].mean(axis=1)).sum()) / total
    template = centred + level
    offsets = blends.mean(axis=1) - weights * bases.mean(axis=1) - (1.0 - weights) * level
    return template, weights, offsets


def leave_one_out_templates(
    blends: np.ndarray, bases: np.ndarray, weights: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each member, the template estimated from the *other* members, and its rounding weight sum.

    Judging an image against a template it did not help to estimate is what separates a real
    shared template from unrelated images that a free "template" fitted to all of them explains.
    Returns (templates (m, d), sum over the others of (1 - a_j)^2).
    """
    complement = 1.0 - np.asarray(weights, np.float64)
    contributions = complement[:, None] * (
        np.asarray(blends, np.float64) - weights[:, None] * np.asarray(bases, np.float64) - offsets[:, None]
    )
    numerator = contributions.sum(axis=0)
    denominator = float((complement**2).sum())
    rest = np.maximum(denominator - complement**2, 1e-12)
    return (numerator[None] - contributions) / rest[:, None], rest


def psnr(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 0..255 images."""
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)
