"""Corrupted images: clean cells blended pixel by pixel with a few fixed templates.

Model: ``A = a * B + (1 - a) * C`` stored as integers, with ``A`` the corrupted image, ``B`` a
clean base cell, ``C`` the template and ``a`` the cell's share (fixed per template or not). One
image alone cannot be decomposed (any ``A`` is ``C = A`` with ``a = 0``), but blends of one
template share ``C``, and in files built like the course's the bases also occur clean. Then four
images of the file are tied by one *exact* linear relation: for two blends of one template,

    A_2 = a_2 B_2 + (1 - a_2)/(1 - a_1) (A_1 - a_1 B_1)     (up to rounding and an offset),

which real images that are not blends of each other miss by orders of magnitude (see
:mod:`bc_pipeline.quality.blend_algebra` for the rounding-noise model every test here is judged by).
Nothing in it depends on colour, on what the template shows or on the weights, which is why it
holds on files built with any pictures; colour statistics only serve the outlier stage.

The search, on the distinct images only (all searches run on coarse copies, decorrelated by a
whitening fitted to the file, see :func:`_whitening`):

1. *Neighbours*: each image's two most correlated other images.
2. *Seeds*: quadruples that pass the exact relation, proposed two ways, because which neighbour a
   blend has depends on the template's share:

   - a cell-dominated blend (``a`` high) has its own base as nearest neighbour, so what is left
     after removing that neighbour is ``(1 - a) C`` up to scale: blends of one template leave
     parallel residuals, and each image is paired with the two whose residuals are most parallel;
   - a template-dominated blend (``a`` low) has siblings (or a copy of the template) as nearest
     neighbours, and the difference of two siblings is ``a (B_1 - B_2)``: the images most
     correlated with it, and with its negative, are the two bases.

   Every proposal is tested on the coarse copies, the survivors exactly at full size.
3. *Templates*: seeds are grouped by the template they imply (:func:`_seed_clusters`), and each
   group's template is the least-squares point nearest to all its blends' lines
   (:func:`blend_algebra.fit_members`). With ``C`` known, any blend is found on its own:
   ``A - C`` is parallel to ``B - C`` for its base, so each image's likeliest bases are its most
   parallel images around ``C`` (:func:`_search`), tested exactly; the candidates are tested again
   against the template refitted on everything found. This is what finds every member, however
   few seeds there were.
   *One cell blended at several shares* puts all its blends on one ray from ``C``: each is an exact
   blend of any sibling further along (share ``w a_j``), and the lowest-share one passes as a copy
   of a false template only that cell's blends share. So several bases are tried per image and the
   one farthest along the ray kept, a base that is itself a member is followed to the cell
   (:func:`_root_bases`) or to an image further out on the same line (:func:`_extend_rays`), a
   template needs blends on two rays (:func:`_on_two_rays`), and fits left on one ray are crossed
   with each other to find their template (:func:`_cross_lines`).
4. *Verification* (:func:`_verify`): every member is refitted against the template estimated from
   the *other* members (leave one out) and kept only if its residual is what rounding alone
   leaves and the template explains a part of it that its base cannot; a template needs
   ``min_blends`` distinct blends. Copies of the template are members with ``a = 0``.
5. *Blends whose base is not in the file* pass no exact test. Those of a found template that sit
   far closer to it than any cell does are added (:func:`_closer_than_any_cell`): template-dominated
   blends, yes; cell-dominated ones look like cells and are not found. A template none of whose
   bases is in the file is not found at all. Both limits are measured in ``bench/bench_anomalies.py``.

Averaging over all members cancels what is left of the rounding, so the recovered template is
much cleaner than any single ``(A - a B) / (1 - a)``; each member votes by the inverse of its
residual's square, so the noisier ones (and those that barely passed) count less.

*Lossy storage.* Where this finds nothing, the file may have gone through JPEG after blending:
then every image carries a few grey levels of compression noise and no relation is exact. The
noise is measured on the file (:mod:`bc_pipeline.quality.storage_noise`) and the search runs once
more with every tolerance derived from it, bases included. Three things change with noise that
large. A blend's template part (what the template explains beyond a scaled copy of its base)
is asked at full size *or* on the coarse copies, where faint templates keep their broad shapes
and compression noise (fine detail) averages away (:func:`_template_evidence`); the seeds ask it
of the coarse copies only. An image within a copy's tolerance that is a blend with a cell of the
file is a blend. And templates found early may have pinned a few blends of a later one into a
spurious template of their own: larger templates claim back what they explain (:func:`_reclaim`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from bc_pipeline.quality import blend_algebra as ba
from bc_pipeline.quality import storage_noise
from bc_pipeline.quality.blend_algebra import estimate_template, psnr
from bc_pipeline.quality.storage_noise import NoiseModel

__all__ = ["CorruptionResult", "CorruptionSettings", "estimate_template", "find_corruptions", "psnr",
           "templates_from_report"]  # fmt: skip

REPORT_COLUMNS = ["index", "kind", "base_index", "weight", "template", "residual_rms", "expected_rms", "template_evidence",
                  "template_distance", "score", "reason"]  # fmt: skip
SUMMARY_COLUMNS = ["template", "members", "blends", "cells", "copies", "no_base", "weight_min", "weight_median",
                   "weight_max", "median_score"]  # fmt: skip
BLEND, COPY, NO_BASE = "blend", "template copy", "blend, base not in file"


@dataclass(frozen=True)
class CorruptionSettings:
    #: A residual passes when it is at most this many times what rounding alone leaves. Rounding
    #: noise is a sum over thousands of values, so its RMS scatters by well under 1 %: 3x is a wide
    #: margin for a true blend, and still far below the several grey levels between real images.
    residual_factor: float = field(default=3.0, metadata={"gt": 1, "description": "A fit passes at most this many times the residual rounding leaves."})
    #: The template's part of a blend (what its base alone cannot explain) must stand this many
    #: times above the rounding noise, or ``a`` is so close to 1 that the "blend" is the cell.
    #: ... in the seeds, whose template is not known yet: a blend with ``a`` near 1 implies a
    #: "template" of pure noise (part 1.41 times the noise of its two images), which any image
    #: fits; 1.5x that covers a storage noise underestimated by the most measured (1/0.63 at JPEG
    #: quality 95, see storage_noise), and the exact tests after the seeds decide. Once the
    #: template is known, see ``template_part``.
    template_snr: float = field(default=1.5, metadata={"gt": 0, "description": "A seed's template part must stand this many times above the noise."})
    #: What a known template explains in a blend beyond a scaled copy of its base must stand this
    #: many times above the noise the blend is judged by, at full size or on the coarse copies
    #: (see _template_evidence). An image with no template in it (a near-duplicate of its base
    #: with another contrast) leaves only the noise's projection on one direction, far below.
    template_part: float = 1.0
    min_weight: float = field(default=0.02, metadata={"gt": 0, "lt": 1, "description": "Below this cell share: a copy of the template."})
    max_weight: float = field(default=0.98, metadata={"gt": 0, "lt": 1, "description": "Above this cell share: the cell itself."})
    #: Distinct blends a template needs. Copies of the template do not count: with a copy of ``C``
    #: in the file, every blend is also "a blend of the copy with its cell as template", a false
    #: template that only one blend shares.
    min_blends: int = field(default=2, metadata={"ge": 2, "description": "Distinct blends a template needs."})
    coarse_side: int = 8  # side of the coarse copies used for search and the cheap tests
    shortlist: int = 2  # bases tried on each side of a sibling difference
    #: Bases tried per image around a found template. Blends of one base cell at different shares
    #: lie on one ray from the template and are all exactly parallel to it, so the most parallel
    #: images are the cell *and* its other blends in no useful order; trying several and keeping
    #: the one farthest along the ray (the smallest share that fits) reaches the cell.
    ray_candidates: int = 8
    #: Also flag images of a found template whose base is not in the file (see _closer_than_any_cell).
    missing_bases: bool = field(default=True, metadata={"description": "Also flag blends of a found template whose base is not in the file."})
    #: Where the exact search finds nothing, look for a JPEG trace and search again at its noise.
    lossy: bool = field(default=True, metadata={"description": "Search files that went through JPEG at the noise it left (measured on the file)."})
    missing_bases_gap: float = 1.5  # ... only where no image lies between their reach and this many times it
    whitening_ridge: float = 0.01  # see _whitening
    block: int = 2048  # rows per block of the all-pairs searches (memory: block x N floats)


@dataclass(frozen=True)
class CorruptionResult:
    report: pd.DataFrame  # one row per flagged distinct image (REPORT_COLUMNS); indices are the caller's
    templates: np.ndarray  # (K, H, W, 3) float64 in 0..255
    template_summary: pd.DataFrame  # SUMMARY_COLUMNS: members by kind, spread of the cell share
    noise: NoiseModel  # the storage noise every test was judged against, and why


# --------------------------------------------------------------------------------------------
# Coarse copies and all-pairs search


def _downsample(images: np.ndarray, side: int) -> np.ndarray:
    """(N, side*side*3) float32 box-downsampled copies of (N, S, S, 3) images (uint8 or float)."""
    n, size = len(images), images.shape[1]
    out = np.empty((n, side * side * 3), dtype=np.float32)
    for start in range(0, n, 1024):
        batch = np.asarray(images[start : start + 1024])
        m = len(batch)
        if size % side == 0:
            f = size // side
            # Sum rows, then columns; integer sums of uint8 are exact and several times faster.
            dtype = (np.uint16, np.uint32) if batch.dtype == np.uint8 else (np.float64, np.float64)
            rows = batch.reshape(m, side, f, size * 3).sum(axis=2, dtype=dtype[0])
            small = rows.reshape(m, side, side, f, 3).sum(axis=3, dtype=dtype[1]) / np.float32(f * f)
        else:  # PIL's box filter per channel, in float
            batch = batch.astype(np.float32)
            small = np.stack([
                np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize((side, side), Image.Resampling.BOX))
                          for c in range(3)], axis=-1)
                for image in batch
            ])  # fmt: skip
        out[start : start + m] = small.reshape(m, -1)
    return out


def _whitening(coarse: np.ndarray, ridge: float) -> np.ndarray:
    """(d, d) map that decorrelates the (mean-removed) coarse images of this file.

    Cells are alike (pale background, one stained blob in the middle), so in raw pixels a cell's
    near-twins correlate almost as well with any image containing it as the cell itself does, and
    searches for a blend's base drown in look-alikes. Whitened, images share little but what they
    really have in common, and the exact linear relations of blends survive any linear map.
    ``ridge`` (a share of the largest variance) keeps directions of almost no variance, where
    only rounding lives, from being blown up.
    """
    centred = coarse - coarse.mean(axis=1, keepdims=True)
    covariance = np.cov(centred.T.astype(np.float64)) if len(centred) > 1 else np.eye(coarse.shape[1])
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 0.0)
    return (vectors / np.sqrt(values + ridge * max(values.max(), 1e-9))).astype(np.float32)


def _top_matches(
    queries: np.ndarray, keys: np.ndarray, k: int, exclude: np.ndarray, block: int, lowest: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, the ``k`` key rows of highest and the ``lowest`` of lowest dot product.

    ``exclude[i]`` lists key rows never to return for query ``i`` (-1: none). Returns index arrays
    (m, k) and (m, lowest), best first. Repeated arg-max beats a partial sort for a few columns.
    """
    top = np.empty((len(queries), k), dtype=np.int64)
    bottom = np.empty((len(queries), lowest), dtype=np.int64)
    for start in range(0, len(queries), block):
        scores = queries[start : start + block] @ keys.T
        rows = np.arange(len(scores))
        stop = start + len(scores)
        masked = [(rows[column >= 0], column[column >= 0]) for column in exclude[start:stop].T]
        for r, c in masked:
            scores[r, c] = np.inf
        for j in range(lowest):
            bottom[start:stop, j] = found = scores.argmin(axis=1)
            scores[rows, found] = np.inf
            masked.append((rows, found))
        for r, c in masked:
            scores[r, c] = -np.inf
        for j in range(k):
            top[start:stop, j] = found = scores.argmax(axis=1)
            scores[rows, found] = -np.inf
    return top, bottom


class _Images:
    """The distinct images: full-size rows on demand, coarse copies and their unit vectors."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, settings: CorruptionSettings):
        self.images, self.rows = images, rows
        self.shape = images.shape[1:]
        self.coarse = _downsample(_Gather(images, rows), settings.coarse_side)
        self.whiten = _whitening(self.coarse, settings.whitening_ridge)
        self.unit = self.white_unit(self.coarse)
        self.set_noise(storage_noise.rounding(self.shape[0], settings.coarse_side))
        self.side = settings.coarse_side

    def set_noise(self, noise: NoiseModel) -> None:
        self.noise = noise
        self.full_noise, self.coarse_noise = noise.full_rms, noise.coarse_rms
        # Rounding enters once, when a blend is stored; lossy storage puts noise in its base too.
        self.full_base, self.coarse_base = (self.full_noise, self.coarse_noise) if noise.lossy else (0.0, 0.0)
        self.coarse_scale = self.coarse_noise / self.full_noise  # what averaging does to the noise

    def __len__(self) -> int:
        return len(self.rows)

    def full(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        return np.asarray(self.images[self.rows[positions]], np.float64).reshape(len(positions), int(np.prod(self.shape)))

    def white_unit(self, coarse: np.ndarray) -> np.ndarray:
        """Unit vectors of mean-removed, whitened coarse rows: the space every search runs in."""
        centred = coarse - coarse.mean(axis=1, keepdims=True)
        white = centred.astype(np.float32) @ self.whiten
        return (white / np.maximum(np.linalg.norm(white, axis=1, keepdims=True), 1e-9)).astype(np.float32)

    def coarse_of(self, flat: np.ndarray) -> np.ndarray:
        """Coarse copy of full-size flat float images (templates)."""
        return _downsample(np.asarray(flat, np.float32).reshape(-1, *self.shape), self.side).astype(np.float64)


class _Gather:
    """``images[rows]`` read lazily in slices, so no copy of all distinct images is made."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows
        self.shape = (len(rows), *images.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self.images[np.sort(self.rows[item])])[np.argsort(np.argsort(self.rows[item]))]


# --------------------------------------------------------------------------------------------
# Seeds: quadruples tied by the exact blend relation


@dataclass(frozen=True)
class _Seeds:
    """Passing quadruples (positions into the distinct images) and the first blend's weight."""

    x1: np.ndarray
    b1: np.ndarray
    x2: np.ndarray
    b2: np.ndarray
    copy2: np.ndarray  # x2 is the template itself (its weight is ~0)
    a1: np.ndarray


def _proposals(data: _Images, settings: CorruptionSettings) -> tuple[np.ndarray, ...]:
    """Candidate quadruples (x1, b1, x2, b2) from both neighbour patterns (module docstring, step 2)."""
    self_ = np.arange(len(data))[:, None]
    nearest = _top_matches(data.unit, data.unit, 2, self_, settings.block)[0]
    top1 = nearest[:, 0]
    # Cell-dominated blends: residuals after the nearest neighbour are parallel within a template.
    x = data.coarse - data.coarse.mean(axis=1, keepdims=True)
    y = x[top1]
    scale = (x * y).sum(axis=1) / np.maximum((y * y).sum(axis=1), 1e-9)
    residual = data.white_unit(x - scale[:, None] * y)
    partners = _top_matches(residual, residual, 2, np.concatenate([self_, top1[:, None]], axis=1), settings.block)[0]
    h1 = [(self_[:, 0], top1, p, top1[p]) for p in partners.T]
    # Template-dominated blends: the nearest neighbours are siblings; a difference is a(B1 - B2).
    # Two neighbours each, so that a pair whose bases are both in the file turns up even where
    # some bases are not.
    k = settings.shortlist
    h2 = []
    for neighbour in nearest.T:
        difference = data.white_unit(data.coarse - data.coarse[neighbour])
        exclude = np.concatenate([self_, neighbour[:, None]], axis=1)
        positive, negative = _top_matches(difference, data.unit, k, exclude, settings.block, lowest=k)
        h2 += [(self_[:, 0], positive[:, i], neighbour, negative[:, j]) for i in range(k) for j in range(k)]
    return tuple(np.concatenate(parts) for parts in zip(*(h1 + h2)))


def _quadruple_test(
    x1: np.ndarray, b1: np.ndarray, x2: np.ndarray, b2: np.ndarray, noise: float, base_noise: float,
    settings: CorruptionSettings, first_cut: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Rows passing ``x2 = a2 b2 + beta (x1 - a1 b1) + t`` to within noise; whether x2 is the template; a1.

    Inputs are (m, d) arrays of one resolution; blends carry ``noise`` per value, bases ``base_noise``.
    ``first_cut`` > 0 (the coarse copies): also ask that both blends carry a template part above the
    noise (``template_snr``), and let the residual reach ``first_cut`` times the usual limit.
    """
    coef, residual = ba.affine_fit(x2, [b2, x1, b1])
    a2, beta, gamma = coef[:, 0], coef[:, 1], coef[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        a1 = np.where(beta > 0, -gamma / beta, np.nan)
    copy = np.abs(a2) < settings.min_weight
    expected = np.sqrt(noise**2 * (1.0 + beta**2) + base_noise**2 * (a2**2 + gamma**2))
    ok = (beta > 0) & (a1 >= settings.min_weight) & (a1 <= settings.max_weight)
    ok &= copy | ((a2 >= settings.min_weight) & (a2 <= settings.max_weight))
    ok &= residual <= max(first_cut, 1.0) * settings.residual_factor * expected
    if not first_cut:
        return ok, copy, a1
    # Both blends must carry a real template part (else "a ~ 1": the image is its base).
    rows = np.flatnonzero(ok)
    floor = settings.template_snr * np.hypot(noise, base_noise)
    ok[rows] = ba.scale_fit(x1[rows], b1[rows]) >= floor
    rows = rows[ok[rows] & ~copy[rows]]
    ok[rows] = ba.scale_fit(x2[rows], b2[rows]) >= floor
    return ok, copy, a1


def _find_seeds(data: _Images, settings: CorruptionSettings) -> _Seeds:
    """Quadruples passing the blend relation on the coarse copies, template parts included, then at
    full size. The template part is asked of the coarse copies only: a template's broad shapes are
    what survives averaging, and compression noise (fine detail) is what does not, so a faint
    template that JPEG noise drowns at full size still stands well above it there."""
    x1, b1, x2, b2 = _proposals(data, settings)
    distinct = (x1 != b1) & (x1 != x2) & (x1 != b2) & (b1 != x2) & (b1 != b2) & (x2 != b2)
    x1, b1, x2, b2 = (v[distinct] for v in (x1, b1, x2, b2))
    # The rounding model of the coarse copies assumes the errors of 64 pixels average away
    # independently; they need not (at a share of exactly 1/2 every error is 0 or +-0.5, and the
    # half-integers follow the image): a true quadruple was seen at 3.6 times that model. So the
    # coarse test is a first cut at twice the limit there, and the full-size test decides. A
    # measured (JPEG) coarse noise already holds whatever correlation there is: no slack.
    slack = 1.0 if data.noise.lossy else 2.0
    keep = np.zeros(len(x1), bool)
    for start in range(0, len(x1), 8192):
        part = slice(start, start + 8192)
        c = [data.coarse[v[part]] for v in (x1, b1, x2, b2)]
        keep[part], _, _ = _quadruple_test(c[0], c[1], c[2], c[3], data.coarse_noise, data.coarse_base, settings, slack)
    x1, b1, x2, b2 = (v[keep] for v in (x1, b1, x2, b2))
    passed, copy, a1 = np.zeros(len(x1), bool), np.zeros(len(x1), bool), np.zeros(len(x1))
    for start in range(0, len(x1), 64):
        part = slice(start, start + 64)
        f = [data.full(v[part]) for v in (x1, b1, x2, b2)]
        passed[part], copy[part], a1[part] = _quadruple_test(f[0], f[1], f[2], f[3], data.full_noise, data.full_base,
                                                                     settings)  # fmt: skip
    return _Seeds(x1[passed], b1[passed], x2[passed], b2[passed], copy[passed], a1[passed])


def _seed_clusters(data: _Images, seeds: _Seeds, settings: CorruptionSettings) -> list[dict[int, int]]:
    """Seeds grouped by the template they imply: per group, blend position -> base (-1: a copy).

    Grouping by the template, not by shared images, matters: where a copy of the template is in
    the file, ``A = a B + (1 - a) C`` is also a blend of the copy with the *cell* as "template"
    (weight ``1 - a``). Such a false template is one cell, shared by no other blend, while the
    true one is shared by all blends of ``C``; groups are returned largest first.
    """
    if len(seeds.x1) == 0:
        return []
    a1 = seeds.a1[:, None]
    implied = (data.coarse[seeds.x1] - a1 * data.coarse[seeds.b1]) / (1.0 - a1)
    implied -= implied.mean(axis=1, keepdims=True)
    # Each implied template carries x1's rounding, amplified by 1 / (1 - a1).
    error = data.coarse_noise / (1.0 - seeds.a1)
    groups: list[list[int]] = []
    representatives: list[int] = []
    for i in np.argsort(error):
        for group, r in zip(groups, representatives):
            rms = np.sqrt(np.mean((implied[i] - implied[r]) ** 2))
            if rms <= settings.residual_factor * np.hypot(error[i], error[r]):
                group.append(int(i))
                break
        else:
            groups.append([int(i)])
            representatives.append(int(i))
    clusters = []
    for group in groups:
        members: dict[int, int] = {}
        for i in group:
            members.setdefault(int(seeds.x1[i]), int(seeds.b1[i]))
            members.setdefault(int(seeds.x2[i]), -1 if seeds.copy2[i] else int(seeds.b2[i]))
        clusters.append(members)
    return sorted(clusters, key=lambda m: sum(b >= 0 for b in m.values()), reverse=True)


# --------------------------------------------------------------------------------------------
# Templates: fit, scan for every member, verify


@dataclass
class _Template:
    blends: np.ndarray  # positions of member blends
    bases: np.ndarray  # their bases
    copies: np.ndarray  # positions of copies of the template
    template: np.ndarray  # flat float64, full size
    noise: float  # RMS error of the template estimate from rounding

    def members(self) -> np.ndarray:
        return np.concatenate([self.blends, self.copies])

    def arrays(self, data: _Images) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(positions, is_copy, member images, base images) at full size; a copy's base row is itself."""
        positions = self.members()
        is_copy = np.concatenate([np.zeros(len(self.blends), bool), np.ones(len(self.copies), bool)])
        return positions, is_copy, data.full(positions), data.full(np.concatenate([self.bases, self.copies]))


def _fit(data: _Images, blends: np.ndarray, bases: np.ndarray, copies: np.ndarray) -> _Template:
    fit = _Template(blends, bases, copies, np.zeros(0), 0.0)
    _, is_copy, a_images, b_images = fit.arrays(data)
    template, weights, _ = ba.fit_members(a_images, b_images, is_copy)
    return _Template(blends, bases, copies, template, ba.template_noise(weights, data.full_noise, data.full_base))


@dataclass(frozen=True)
class _Candidates:
    """What one search around a template proposes: possible copies, and (blend, base) pairs."""

    copies: np.ndarray
    blends: np.ndarray
    bases: np.ndarray


def _search(data: _Images, fit: _Template, taken: np.ndarray, settings: CorruptionSettings) -> _Candidates:
    """Around ``fit.template``: images that may be copies of it, and each other image's likeliest bases.

    A blend satisfies ``A - C = a (B - C) + t``: around the template, a blend points exactly the
    way its base does, so the base is the image most parallel to it (two kept per image). The
    direction is hardly changed by a small error in ``C``, so one search serves the refitted
    template too.
    """
    coarse_template = data.coarse_of(fit.template)[0]
    around = data.coarse - coarse_template
    free = np.flatnonzero(~taken)
    centred = around[free] - around[free].mean(axis=1, keepdims=True)
    copy_limit = 2 * settings.residual_factor * np.hypot(data.coarse_noise, data.coarse_scale * fit.noise)
    copies = free[np.sqrt((centred**2).mean(axis=1)) <= copy_limit + 1.0]
    candidates = free  # a possible copy may still be a blend (see _members)
    unit = data.white_unit(around)
    keys = unit.copy()
    keys[taken] = 0.0
    keys[copies] = 0.0
    k = min(settings.ray_candidates, max(len(candidates) - 1, 1))
    best = _top_matches(unit[candidates], keys, k, candidates[:, None], settings.block)[0]
    return _Candidates(copies, np.repeat(candidates, k), best.reshape(-1))


def _members(data: _Images, fit: _Template, found: _Candidates, settings: CorruptionSettings) -> _Template:
    """The candidates that are copies of ``fit.template`` or blends of it with their base, exactly."""
    copy_residual = ba.affine_fit(data.full(found.copies), [np.repeat(fit.template[None], len(found.copies), axis=0)])[1]
    copies = found.copies[copy_residual <= settings.residual_factor * np.hypot(data.full_noise, fit.noise)]
    x, b = found.blends, found.bases
    coarse_template = data.coarse_of(fit.template)[0]
    weight, _, residual = ba.blend_fit(data.coarse[x], data.coarse[b], coarse_template.astype(np.float32))
    expected = ba.expected_residual(weight, data.coarse_noise, data.coarse_scale * fit.noise, data.coarse_base)
    # A lenient first cut on the coarse copies; the exact test at full size decides.
    plausible = (residual <= 2 * settings.residual_factor * expected)
    plausible &= (weight >= settings.min_weight) & (weight <= settings.max_weight)
    x, b, weight = x[plausible], b[plausible], weight[plausible]
    # Per image the two plausible bases farthest along its ray (smallest share): no more exact
    # tests than with two candidates, and the cell itself among them when its blends crowd the list.
    order = np.lexsort((weight, x))
    x, b = x[order], b[order]
    rank = np.arange(len(x)) - np.searchsorted(x, x)
    x, b = x[rank < 2], b[rank < 2]
    ok, weight = np.zeros(len(x), bool), np.zeros(len(x))
    for start in range(0, len(x), 256):
        part = slice(start, start + 256)
        ok[part], weight[part] = _blend_test(data, x[part], b[part], fit, settings)
    x, b, weight = x[ok], b[ok], weight[ok]
    order = np.lexsort((weight, x))  # per blend, the base farthest along its ray first
    x, first = np.unique(x[order], return_index=True)
    # An image that is a blend of the template with a cell of the file is not a copy, however close:
    # under lossy storage a low-share blend of a faint template is within a copy's tolerance.
    return _Template(x, _root_bases(x, b[order][first]), np.setdiff1d(copies, x), fit.template, fit.noise)


def _extend_rays(data: _Images, fit: _Template, taken: np.ndarray, settings: CorruptionSettings) -> _Template:
    """Each member's base moved to the image furthest along its ray that lies exactly on it.

    Where a cell's blends have close shares, the seeds tie blends to siblings at almost their own
    share: lines so short that the template they imply is too rough for the exact test of the cell
    itself. Three images on one ray need no template to be recognised: the base lies on the line
    through a member and a candidate further out, to within rounding. Longer lines, sharper template.
    """
    roots, first = np.unique(fit.bases, return_index=True)
    if len(roots) == 0:
        return fit
    around = data.coarse - data.coarse_of(fit.template)[0]
    keys = data.white_unit(around)
    keys[taken] = 0.0
    keys[fit.members()] = 0.0
    candidates = _top_matches(data.white_unit(around[roots]), keys, settings.ray_candidates, roots[:, None], settings.block)[0]
    member, root = data.full(fit.blends[first]), data.full(roots)
    moved = dict()
    for j in range(candidates.shape[1]):
        further = data.full(candidates[:, j])
        coef, residual = ba.affine_fit(root, [member, further])
        on_line = (coef[:, 1] > 0.02) & (coef[:, 1] < 1.0)
        on_line &= residual <= settings.residual_factor * data.full_noise * np.sqrt(1.0 + (coef**2).sum(axis=1))
        for r, c in zip(roots[on_line], candidates[on_line, j]):
            moved.setdefault(int(r), int(c))
    if not moved:
        return fit
    bases = np.array([moved.get(int(b), int(b)) for b in fit.bases])
    return _fit(data, fit.blends, bases, fit.copies)


def _root_bases(blends: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """Each blend's base, followed through other member blends to the image at the end of the chain.

    A blend whose "base" is another blend of the same cell (``A_i = w A_j + (1 - w) C``) is a blend
    of that cell too (``a_i = w a_j``): the cell, further along the same ray, is its base. Each step
    raises the share, so chains end; the guard stops a cycle all the same.
    """
    base_of = dict(zip(blends.tolist(), bases.tolist()))
    roots = []
    for base in bases.tolist():
        seen = set()
        while base in base_of and base not in seen:
            seen.add(base)
            base = base_of[base]
        roots.append(base)
    return np.asarray(roots, dtype=np.int64)


def _blend_test(
    data: _Images, x: np.ndarray, b: np.ndarray, fit: _Template, settings: CorruptionSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Rows where ``A = a B + (1 - a) C + t`` holds to within noise, with a real template part; and ``a``."""
    blends, bases = data.full(x), data.full(b)
    weight, _, residual = ba.blend_fit(blends, bases, fit.template)
    expected = ba.expected_residual(weight, data.full_noise, fit.noise, data.full_base)
    ok = (weight >= settings.min_weight) & (weight <= settings.max_weight)
    ok &= residual <= settings.residual_factor * expected
    full = _full_evidence(blends, bases, residual, expected)
    evidence = _template_evidence(data, x, b, full, fit.template, fit.noise, settings)
    ok &= evidence >= settings.template_part
    return ok, weight


def _full_evidence(blends: np.ndarray, bases: np.ndarray, residual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """What the template explains in each blend beyond a scaled copy of its base, over the noise."""
    return ba.template_part(ba.scale_fit(blends, bases), residual) / expected


def _template_evidence(
    data: _Images, x: np.ndarray, b: np.ndarray, full: np.ndarray, template: np.ndarray,
    template_noise: float | np.ndarray, settings: CorruptionSettings,
) -> np.ndarray:  # fmt: skip
    """What the known template explains in each blend beyond a scaled copy of its base, in units of
    the noise the blend is judged by: at full size or on the coarse copies, whichever says more.

    Without it the image is as well described as a copy of its base (``a`` near 1, or a
    near-duplicate with another contrast). The coarse copies matter where storage was lossy: a
    faint template (dark, near-flat) is broad shapes, which averaging keeps, while JPEG noise is
    fine detail, which averaging removes (8 times less of it on 12x12 boxes, measured per file).
    The coarse copies count only where the blend holds on them too, to within *their* noise: a
    pair that a loose full-size tolerance lets pass as ``a`` near 1 (two blends of one cell at
    close shares, against another template) misses that by far. ``full``: the same at full size
    (:func:`_full_evidence`).
    """
    cx, cb = data.coarse[x].astype(np.float64), data.coarse[b].astype(np.float64)
    weight, _, coarse_residual = ba.blend_fit(cx, cb, data.coarse_of(np.atleast_2d(template)))
    coarse_expected = ba.expected_residual(weight, data.coarse_noise, data.coarse_scale * template_noise, data.coarse_base)
    coarse = ba.template_part(ba.scale_fit(cx, cb), coarse_residual) / coarse_expected
    holds = coarse_residual <= settings.residual_factor * coarse_expected
    return np.where(holds, np.maximum(full, coarse), full)


def _verify(data: _Images, fit: _Template, settings: CorruptionSettings) -> tuple[_Template, pd.DataFrame] | None:
    """Keep the members that fit a template estimated without them; None if too few remain."""
    for _ in range(4):
        # Blends of one cell lie on one line, and any point beyond them on it explains them all
        # (their lowest-share blend passes as a "copy"): only blends of distinct cells pin a template.
        if len(fit.blends) < settings.min_blends or not _on_two_rays(data, fit, settings):
            return None
        positions, is_copy, a_images, b_images = fit.arrays(data)
        b_images[is_copy] = 0.0
        template, weights, offsets = ba.fit_members(a_images, b_images, is_copy)
        held_out, rest = ba.leave_one_out_templates(a_images, b_images, weights, offsets)
        held_noise = np.hypot(data.full_noise, data.full_base) / np.sqrt(rest)
        weight, _, residual = ba.blend_fit(a_images, b_images, held_out)
        weight = np.where(is_copy, 0.0, weight)
        _, copy_residual = ba.affine_fit(a_images, [held_out])
        residual = np.where(is_copy, copy_residual, residual)
        expected = ba.expected_residual(weight, data.full_noise, held_noise, data.full_base)
        ok = residual <= settings.residual_factor * expected
        ok &= is_copy | ((weight >= settings.min_weight) & (weight <= settings.max_weight))
        full = _full_evidence(a_images, b_images, residual, expected)
        evidence = _template_evidence(data, positions, np.concatenate([fit.bases, fit.copies]), full, held_out,
                                      held_noise, settings)  # fmt: skip
        ok &= is_copy | (evidence >= settings.template_part)
        if ok.all():
            variance = a_images.var(axis=1)
            table = pd.DataFrame({
                "position": positions,
                "kind": np.where(is_copy, COPY, BLEND),
                "base": np.where(is_copy, -1, np.concatenate([fit.bases, fit.copies])),
                "weight": weight,
                "residual_rms": residual,
                "expected_rms": expected,
                "template_evidence": np.where(is_copy, np.nan, evidence),
                "template_distance": ba.scale_fit(a_images - held_out, np.ones_like(a_images)),
                "score": 1.0 - residual**2 / np.maximum(variance, 1e-9),
            })  # fmt: skip
            # Each member votes by the inverse of its own noise (its residual): robust to the images
            # that lossy storage left noisier than the rest, and to a member that barely passed.
            template, weights, _ = ba.fit_members(a_images, b_images, is_copy, noise=residual)
            final = _Template(fit.blends, fit.bases, fit.copies, template,
                              ba.template_noise(weights, data.full_noise, data.full_base))  # fmt: skip
            return final, table
        keep_blends, keep_copies = ok[: len(fit.blends)], ok[len(fit.blends) :]
        fit = _Template(fit.blends[keep_blends], fit.bases[keep_blends], fit.copies[keep_copies], fit.template, fit.noise)
    return None


def _grow(
    data: _Images, fit: _Template, taken: np.ndarray, found: list[tuple[_Template, pd.DataFrame]],
    lines: list[_Template], settings: CorruptionSettings,
) -> bool:  # fmt: skip
    """Every blend and copy of ``fit``'s template, verified; appended to ``found`` (or to ``lines``
    when its blends are one cell's). Whether a template was found."""
    found_here = _search(data, fit, taken, settings)
    for _ in range(2):  # the second pass tests the same candidates against the refitted template
        fit = _members(data, fit, found_here, settings)
        if len(fit.blends) == 0:
            return False
        fit = _fit(data, fit.blends, fit.bases, fit.copies)
    extended = _extend_rays(data, fit, taken, settings)
    if extended is not fit:
        fit = _members(data, extended, found_here, settings)
        if len(fit.blends) == 0:
            return False
        fit = _fit(data, fit.blends, fit.bases, fit.copies)
    for _ in range(3):
        # Cells blended several times (two members, one cell): a cell with more blends than the
        # search's list can miss itself among them. Searching again with the members set aside
        # leaves the cell and the blends not yet found.
        if len(np.unique(fit.bases)) == len(fit.bases):
            break
        more = _search(data, fit, taken | np.isin(np.arange(len(data)), fit.members()), settings)
        found_here = _Candidates(np.union1d(found_here.copies, more.copies), np.concatenate([found_here.blends, more.blends]),
                                 np.concatenate([found_here.bases, more.bases]))  # fmt: skip
        grown = _members(data, fit, found_here, settings)
        if len(grown.blends) <= len(fit.blends):
            break
        fit = _fit(data, grown.blends, grown.bases, grown.copies)
    if len(fit.blends) >= settings.min_blends and not _on_two_rays(data, fit, settings):
        lines.append(fit)
        return False
    verified = _verify(data, fit, settings)
    if verified is None:
        return False
    taken[verified[0].members()] = True
    found.append(verified)
    return True


def _cross_lines(
    data: _Images, lines: list[_Template], taken: np.ndarray, found: list[tuple[_Template, pd.DataFrame]],
    settings: CorruptionSettings,
) -> None:  # fmt: skip
    """Templates where the lines of two cells' blends cross.

    Where each cell of a template is blended many times, its nearest neighbours are its own blends,
    and the seeds they make imply a point on that cell's line only. Two cells' lines meet at their
    template (the least-squares fit of both families finds it); from there the search finds the rest.
    """
    for i, first in enumerate(lines):
        for second in lines[i + 1 :]:
            if taken[first.blends].any() or taken[second.blends].any():
                continue
            fit = _fit(data, np.concatenate([first.blends, second.blends]), np.concatenate([first.bases, second.bases]),
                       np.zeros(0, np.int64))  # fmt: skip
            if _grow(data, fit, taken, found, [], settings):
                break


def _reclaim(
    data: _Images, found: list[tuple[_Template, pd.DataFrame]], taken: np.ndarray, settings: CorruptionSettings
) -> list[tuple[_Template, pd.DataFrame]]:
    """Members of smaller templates that a larger one explains move to it; what is left of a smaller
    one is verified again, and dropped (its images freed) when it no longer holds.

    Templates are found one after another and each takes its images. A few blends of a template
    found late (few cells blended at many shares; or, where storage was lossy, a tolerance wide
    enough) can first pin a spurious one of their own, which the true template could then not
    claim. Larger templates, measured in blends (then cells), are the better supported. A second
    pass gives the images freed by a dropped template to whichever template explains them.
    """
    for _ in range(2):
        found, changed = _reclaim_pass(data, found, taken, settings)
        if not changed:
            break
    return found


def _reclaim_pass(
    data: _Images, found: list[tuple[_Template, pd.DataFrame]], taken: np.ndarray, settings: CorruptionSettings
) -> tuple[list[tuple[_Template, pd.DataFrame]], bool]:
    """One pass of :func:`_reclaim`, largest template first; whether any image moved."""
    order = sorted(found, key=lambda item: (len(item[0].blends), len(np.unique(item[0].bases))), reverse=True)
    kept: list[tuple[_Template, pd.DataFrame]] = []
    changed = False
    for i, (big, table) in enumerate(order):
        if big is None:
            continue
        rest = [item for item in order[i + 1 :] if item[0] is not None]
        pool = np.concatenate([item[0].members() for item in rest]) if rest else np.zeros(0, np.int64)
        blocked = taken.copy()
        blocked[pool] = False  # the smaller templates' images may be claimed, and any image not taken
        grown = _members(data, big, _search(data, big, blocked, settings), settings)
        if len(grown.blends) or len(grown.copies):
            merged = _fit(data, np.concatenate([big.blends, grown.blends]), np.concatenate([big.bases, grown.bases]),
                          np.concatenate([big.copies, grown.copies]))  # fmt: skip
            verified = _verify(data, merged, settings)
            if verified is not None and len(verified[0].members()) > len(big.members()):
                big, table = verified
                changed = True
                taken[big.members()] = True
                for j in range(i + 1, len(order)):
                    order[j] = _without(data, order[j], big.members(), taken, settings)
        kept.append((big, table))
    return kept, changed


def _without(
    data: _Images, item: tuple[_Template, pd.DataFrame], claimed: np.ndarray, taken: np.ndarray,
    settings: CorruptionSettings,
) -> tuple[_Template | None, pd.DataFrame | None]:  # fmt: skip
    """``item``'s template less the ``claimed`` images, verified again; (None, None) if it no longer holds."""
    fit, table = item
    if fit is None or not np.isin(fit.members(), claimed).any():
        return item
    keep_blends, keep_copies = ~np.isin(fit.blends, claimed), ~np.isin(fit.copies, claimed)
    rest = _Template(fit.blends[keep_blends], fit.bases[keep_blends], fit.copies[keep_copies], fit.template, fit.noise)
    verified = _verify(data, rest, settings) if len(rest.blends) else None
    if verified is None:
        taken[rest.members()] = False
        return None, None
    taken[np.setdiff1d(rest.members(), verified[0].members())] = False
    return verified


def _on_two_rays(data: _Images, fit: _Template, settings: CorruptionSettings) -> bool:
    """Whether the blends' bases leave the template in at least two directions.

    Bases on one ray (a cell and its own blends, as their chains may end) are scaled copies of one
    another around the template, to within rounding; two distinct cells miss that by grey levels.
    """
    bases = np.unique(fit.bases)
    if len(bases) < 2:
        return False
    around = data.full(bases) - fit.template
    farthest = np.argmax(np.linalg.norm(around - around.mean(axis=1, keepdims=True), axis=1))
    residual = ba.scale_fit(around, np.repeat(around[farthest][None], len(around), axis=0))
    return bool((residual > settings.residual_factor * np.hypot(data.full_noise, fit.noise) * np.sqrt(2)).any())


def find_corruptions(
    images: np.ndarray, distinct: np.ndarray, *, settings: CorruptionSettings = CorruptionSettings()
) -> CorruptionResult:
    """Find blends of a shared template with another image of the file, and copies of the templates.

    ``distinct`` are the rows of ``images`` to examine (one per exact-duplicate group). Returns
    one report row per corrupted distinct image, with row indices into ``images``. The search runs
    at rounding noise first (exact blends); where it finds nothing and the file carries a JPEG
    trace, once more at the noise that compression left (:mod:`bc_pipeline.quality.storage_noise`).
    """
    distinct = np.asarray(distinct, dtype=np.int64)
    shape = images.shape[1:]
    if len(distinct) < 4:
        return _empty(shape, storage_noise.rounding(shape[0], settings.coarse_side))
    data = _Images(images, distinct, settings)
    found = _search_file(data, settings)
    if found:
        data.set_noise(storage_noise.rounding(shape[0], settings.coarse_side, "integer rounding only: blends hold "
                                              "exactly to within it, so the file was stored without loss"))  # fmt: skip
    elif settings.lossy:
        data.set_noise(storage_noise.estimate(images, distinct, settings.coarse_side))
        if data.noise.lossy:
            found = _search_file(data, settings)
    if not found:
        return _empty(shape, data.noise)
    return _result(data, found)


def _search_file(data: _Images, settings: CorruptionSettings) -> list[tuple[_Template, pd.DataFrame]]:
    """Every verified template of the file at ``data``'s noise, with its members."""
    taken = np.zeros(len(data), bool)
    found: list[tuple[_Template, pd.DataFrame]] = []
    lines: list[_Template] = []  # fits whose blends all lie on one ray: one cell's blends, no template yet
    for cluster in _seed_clusters(data, _find_seeds(data, settings), settings):
        positions = np.array(list(cluster))
        bases = np.array([cluster[p] for p in positions])
        if taken[positions[bases >= 0]].mean() > 0.5:
            continue  # a template already found through another seed
        blends = positions[bases >= 0]
        fit = _fit(data, blends, _root_bases(blends, bases[bases >= 0]), positions[bases < 0])
        _grow(data, fit, taken, found, lines, settings)
    _cross_lines(data, lines, taken, found, settings)
    found = _reclaim(data, found, taken, settings)
    if found and settings.missing_bases:
        found = _closer_than_any_cell(data, found, taken, settings)
    return found


def _closer_than_any_cell(
    data: _Images, found: list[tuple[_Template, pd.DataFrame]], taken: np.ndarray, settings: CorruptionSettings
) -> list[tuple[_Template, pd.DataFrame]]:
    """Add blends of a found template whose base is not in the file, where that can be told at all.

    No exact test exists without the base, but the geometry remains: ``A - C = a (B - C)``, so a
    blend is ``a`` times as far from its template as its base, and cells are all about equally
    far from a picture that is not a cell. Relative to the median distance of the images not
    flagged, the exact members of the template sit at about ``a``. Unflagged images within the
    members' reach (1.25 times the farthest member, for weights that vary) are added, but only
    where no image at all lies between that reach and 1.5 times it (``missing_bases_gap``): the
    blends must stand apart from every cell. Cells are many and their distances continuous, so a
    cell inside the reach would have others just beyond it, and the gap would not be empty. So template-dominated blends
    (low ``a``) are found; cell-dominated ones, which sit among the cells, are not: that is the
    documented limit.
    """
    out = []
    for fit, table in found:
        coarse_template = data.coarse_of(fit.template)[0]
        deviation = data.coarse - coarse_template
        deviation -= deviation.mean(axis=1, keepdims=True)
        distance = np.sqrt((deviation**2).mean(axis=1))
        rest = ~taken
        if rest.sum() < 100:  # too few images to say what a cell's distance is
            out.append((fit, table))
            continue
        relative = distance / np.median(distance[rest])
        exact = table["kind"] == BLEND
        member_relative = relative[table.loc[exact, "position"].to_numpy()]
        scale = float(np.median(member_relative / table.loc[exact, "weight"].to_numpy()))
        reach = 1.25 * member_relative.max()
        beyond = relative[rest & (relative > reach)]
        # Only where nothing lies in the gap between the members' reach and what cells reach.
        if len(beyond) < 100 or beyond.min() < reach * settings.missing_bases_gap:
            out.append((fit, table))
            continue
        extra = np.flatnonzero(rest & (relative <= reach))
        taken[extra] = True
        rows = pd.DataFrame({"position": extra, "kind": NO_BASE, "base": -1, "weight": relative[extra] / scale,
                             "residual_rms": np.nan, "expected_rms": np.nan, "template_evidence": np.nan,
                             "template_distance": ba.scale_fit(data.full(extra) - fit.template, np.ones((len(extra), 1))),
                             "score": np.nan})  # fmt: skip
        out.append((fit, pd.concat([table, rows], ignore_index=True) if len(rows) else table))
    return out


def _result(data: _Images, found: list[tuple[_Template, pd.DataFrame]]) -> CorruptionResult:
    tables = [table.assign(template=template_id) for template_id, (_, table) in enumerate(found)]
    report = pd.concat(tables, ignore_index=True)
    report["index"] = data.rows[report["position"].to_numpy()]
    base = report["base"].to_numpy()
    report["base_index"] = np.where(base >= 0, data.rows[np.maximum(base, 0)], -1)
    report["reason"] = describe(report, "JPEG noise" if data.noise.lossy else "rounding")
    report = report[REPORT_COLUMNS].sort_values("index").reset_index(drop=True)
    templates = np.stack([np.clip(fit.template, 0.0, 255.0).reshape(data.shape) for fit, _ in found])
    return CorruptionResult(report=report, templates=templates, template_summary=template_summary(report), noise=data.noise)


def describe(report: pd.DataFrame, noise: str = "rounding") -> list[str]:
    """Why each row of a corruption report was flagged, in words (``noise``: what the residuals
    were judged against, e.g. "rounding" or "JPEG noise")."""
    reasons = []
    for row in report.itertuples():
        if row.kind == BLEND:
            reasons.append(f"blend of image {row.base_index} (cell share {row.weight:.3f}) with template {row.template}: "
                           f"residual {row.residual_rms:.2f} grey levels, {noise} leaves {row.expected_rms:.2f}; the "
                           f"template explains {row.template_evidence:.1f} times that noise beyond a copy of the "
                           f"cell; the image lies {row.template_distance:.1f} grey levels from it")  # fmt: skip
        elif row.kind == COPY:
            reasons.append(f"copy of template {row.template}: residual {row.residual_rms:.2f} grey levels, "
                           f"{noise} leaves {row.expected_rms:.2f}")  # fmt: skip
        else:
            reasons.append(f"blend of template {row.template} with a cell not in the file (cell share about "
                           f"{row.weight:.2f}): {row.template_distance:.1f} grey levels from the template, closer "
                           f"than any cell of the file")  # fmt: skip
    return reasons


def template_summary(report: pd.DataFrame) -> pd.DataFrame:
    """Per template: distinct members by kind, the distinct cells its blends are made of, and the
    spread of the cell share of its exact blends."""
    distinct = report.drop_duplicates("representative") if "representative" in report else report
    rows = []
    for template, group in distinct.groupby("template", sort=True):
        blends = group[group["kind"] == BLEND]
        weights = blends["weight"]
        rows.append((int(template), len(group), len(blends), blends["base_index"].nunique(), int((group["kind"] == COPY).sum()),
                     int((group["kind"] == NO_BASE).sum()), float(weights.min()), float(weights.median()),
                     float(weights.max()), float(blends["score"].median())))  # fmt: skip
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _empty(shape: tuple[int, ...], noise: NoiseModel) -> CorruptionResult:
    types = {"index": "int64", "kind": "object", "base_index": "int64", "template": "int64", "reason": "object"}
    report = pd.DataFrame({c: pd.Series(dtype=types.get(c, "float64")) for c in REPORT_COLUMNS})
    return CorruptionResult(report=report, templates=np.zeros((0, *shape)), template_summary=template_summary(report),
                            noise=noise)  # fmt: skip


def templates_from_report(images: np.ndarray, report: pd.DataFrame) -> np.ndarray:
    """Recover each template from the report's decompositions (distinct images only).

    This is the "average the per-image estimates C = (A - a B) / (1 - a)" step, done as the
    weighted least-squares fit of :func:`bc_pipeline.quality.blend_algebra.fit_members`, with the
    copies of the template as members of weight 0, each member voting by the inverse of its
    residual's square (as :func:`find_corruptions` does).
    """
    if report.empty:
        return np.zeros((0, *images.shape[1:]))
    distinct = report.drop_duplicates("representative") if "representative" in report else report
    distinct = distinct[distinct["kind"].isin([BLEND, COPY])]  # a blend without its base says nothing exact
    templates = []
    for _, rows in distinct.groupby("template", sort=True):
        is_copy = (rows["kind"] == COPY).to_numpy()
        a_images = np.asarray(images[rows["index"].to_numpy()], np.float64).reshape(len(rows), -1)
        base_rows = np.where(is_copy, rows["index"].to_numpy(), rows["base_index"].to_numpy())
        b_images = np.asarray(images[base_rows], np.float64).reshape(len(rows), -1)
        template, _, _ = ba.fit_members(a_images, b_images, is_copy, noise=rows["residual_rms"].to_numpy())
        templates.append(np.clip(template, 0.0, 255.0).reshape(images.shape[1:]))
    return np.stack(templates)
