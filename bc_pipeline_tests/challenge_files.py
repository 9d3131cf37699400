"""Challenge-style files with known truth, for tests and benchmarks of the anomaly stage.

A file is built the way the course's training file was (see ``../shared/datasets/README.md``):
clean cells, then for each of a few fixed *templates* ``C`` some distinct base cells ``B`` blended
pixel by pixel, ``A = a * B + (1 - a) * C`` (``a`` is the cell's share), each blend repeated with
labels that conflict or agree, optionally copies of the template picture itself, everything
shuffled. What varies is exactly what the judging files vary: the pictures, the weights (fixed
per template, or varying per image), the counts, the order, and whether the bases also occur
clean in the file.

Templates are made here, never taken from the shared challenge file: random crops of the photos
that installed packages ship (scikit-learn's and Matplotlib's sample images), procedural textures
and drawings, and versions of them made dark, bright, greyscale, or recoloured with the colours of
the real cells of the file (``stain``), so that colour alone cannot tell them from a smear.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from bc_pipeline.quality.storage_noise import jpeg_round_trip

TemplateKind = Literal["photo", "texture", "drawing", "dark", "bright", "grey", "stain"]
TEMPLATE_KINDS: tuple[str, ...] = ("photo", "texture", "drawing", "dark", "bright", "grey", "stain")
LabelMode = Literal["conflict", "agree"]
Rounding = Literal["round", "floor"]
TRUTH_COLUMNS = ["kind", "template", "base", "weight", "source"]


@dataclass(frozen=True)
class TemplateSpec:
    """One template and the images made from it."""

    kind: str = "photo"
    weight: float = 0.6  # the cell's share a in A = a*B + (1-a)*C
    jitter: float = 0.0  # per-image weights uniform in weight +- jitter (0: fixed per template)
    shares: tuple[float, ...] = ()  # a mixture: each blend's share one of these (overrides weight, jitter)
    bases: int = 9  # distinct base cells
    blends_per_base: tuple[int, int] = (1, 1)  # each base blended this many times, each with its own share
    repeats: tuple[int, int] = (1, 4)  # each blend occurs this many times (inclusive range)
    copies: int = 0  # copies of the template picture itself (outliers)
    labels: LabelMode = "conflict"  # conflict: a random label per copy; agree: one label per blend


@dataclass(frozen=True)
class FileSpec:
    templates: tuple[TemplateSpec, ...] = (TemplateSpec(),)
    clean: int = 1000  # clean cells in the file
    #: Share of each template's bases that do *not* occur clean in the file (the course file: 0).
    missing_bases: float = 0.0
    rounding: Rounding = "round"  # how blends become uint8
    seed: int = 0


@dataclass(frozen=True)
class PlantedFile:
    """The file's arrays and, row by row, what each image truly is."""

    images: np.ndarray  # (N, 96, 96, 3) uint8
    labels: np.ndarray  # (N,) uint8
    truth: pd.DataFrame  # TRUTH_COLUMNS; kind clean/corrupted/outlier, base = row of the base (-1: not in file)
    templates: np.ndarray  # (K, 96, 96, 3) uint8, the true templates
    spec: FileSpec = field(repr=False, default_factory=FileSpec)

    def save(self, path: str | Path) -> Path:
        """Write ``images`` and ``labels`` as the challenge layout (no truth in the file)."""
        path = Path(path)
        np.savez(path, images=self.images, labels=self.labels)
        return path


# --------------------------------------------------------------------------------------------
# Template pictures


def _sample_data(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


@lru_cache(maxsize=1)
def shipped_photos() -> tuple[np.ndarray, ...]:
    """RGB uint8 photographs that installed packages ship (scikit-learn, Matplotlib)."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    paths = [folder / "china.jpg", folder / "flower.jpg", _sample_data("grace_hopper.jpg"),
             _sample_data("Minduka_Present_Blue_Pack.png")]  # fmt: skip
    photos = []
    for path in paths:
        if path.is_file():
            photos.append(np.asarray(Image.open(path).convert("RGB")))
    mri = _sample_data("s1045.ima.gz")
    if mri.is_file():  # a 256x256 16-bit MRI slice
        slice_ = np.frombuffer(gzip.open(mri).read(), dtype=">u2").reshape(256, 256).astype(np.float64)
        grey = (255 * slice_ / max(slice_.max(), 1)).astype(np.uint8)
        photos.append(np.repeat(grey[..., None], 3, axis=2))
    if not photos:
        raise RuntimeError("no sample photographs found in scikit-learn or Matplotlib")
    return tuple(photos)


def _crop(picture: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop (a third to all of the shorter side), flipped or turned, resized."""
    h, w = picture.shape[:2]
    side = int(rng.uniform(0.33, 1.0) * min(h, w))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = picture[top : top + side, left : left + side]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.LANCZOS))


def photo(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    photos = shipped_photos()
    return _crop(photos[int(rng.integers(0, len(photos)))], rng, size)


def texture(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Fractal noise plus gratings, through a random Matplotlib colour map."""
    import matplotlib

    field_ = np.zeros((size, size))
    for octave in range(1, 6):
        cells = 2**octave
        noise = rng.normal(size=(cells, cells))
        up = Image.fromarray(noise.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BICUBIC)
        field_ += np.asarray(up) / octave ** rng.uniform(0.5, 1.5)
    y, x = np.mgrid[0:size, 0:size] / size
    for _ in range(int(rng.integers(0, 3))):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 12)
        field_ += rng.uniform(0.3, 1.5) * np.sin(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)))
    field_ = (field_ - field_.min()) / max(np.ptp(field_), 1e-9)
    names = ["viridis", "plasma", "inferno", "magma", "cividis", "twilight", "terrain", "ocean", "jet",
             "cubehelix", "Spectral", "coolwarm", "YlGnBu", "copper", "hsv", "tab20b"]  # fmt: skip
    cmap = matplotlib.colormaps[names[int(rng.integers(0, len(names)))]]
    return (255 * cmap(field_)[..., :3]).astype(np.uint8)


def drawing(rng: np.random.Generator, size: int = 96) -> np.ndarray:
    """Random shapes, lines and letters on a plain or graded background."""
    background = tuple(int(v) for v in rng.integers(0, 256, size=3))
    picture = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(picture)
    for _ in range(int(rng.integers(4, 14))):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0, x1, y1 = sorted(rng.integers(-10, size + 10, size=2)) + sorted(rng.integers(-10, size + 10, size=2))
        box = (int(x0), int(y0), int(max(x1, x0 + 4)), int(max(y1, y0 + 4)))
        shape = int(rng.integers(0, 5))
        if shape == 0:
            pen.ellipse(box, fill=colour)
        elif shape == 1:
            pen.rectangle(box, outline=colour, width=int(rng.integers(1, 6)))
        elif shape == 2:
            pen.line([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(4)], fill=colour,
                     width=int(rng.integers(1, 8)))  # fmt: skip
        elif shape == 3:
            pen.polygon([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)], fill=colour)
        else:
            pen.text(tuple(int(v) for v in rng.integers(0, size - 20, 2)), "ABCXYZ"[int(rng.integers(0, 6)) :],
                     fill=colour)  # fmt: skip
    if rng.random() < 0.5:
        picture = picture.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    return np.asarray(picture)


def _luminance(picture: np.ndarray) -> np.ndarray:
    return np.asarray(picture, np.float64) @ np.array([0.299, 0.587, 0.114])


def stain_palette(cells: np.ndarray, rng: np.random.Generator, levels: int = 16) -> np.ndarray:
    """(levels, 3) colours of real cells from dark to light: nucleus purple to pale background."""
    chosen = cells[rng.choice(len(cells), size=min(len(cells), 32), replace=False)].reshape(-1, 3)
    order = np.argsort(_luminance(chosen))
    return np.stack([part.mean(axis=0) for part in np.array_split(chosen[order], levels)])


def _recolour(picture: np.ndarray, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    luminance = _luminance(picture)
    low, high = np.percentile(luminance, [1, 99])
    t = np.clip((luminance - low) / max(high - low, 1e-9), 0, 1) ** rng.uniform(0.6, 1.6)
    position = t * (len(palette) - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, len(palette) - 1)
    frac = (position - lower)[..., None]
    return np.clip(np.rint((1 - frac) * palette[lower] + frac * palette[upper]), 0, 255).astype(np.uint8)


def make_template(kind: str, rng: np.random.Generator, cells: np.ndarray, size: int = 96) -> np.ndarray:
    """One template picture of ``kind`` (see ``TEMPLATE_KINDS``); ``cells`` give the stain colours."""
    source = [photo, texture, drawing][int(rng.integers(0, 3))]
    if kind == "photo":
        return photo(rng, size)
    if kind == "texture":
        return texture(rng, size)
    if kind == "drawing":
        return drawing(rng, size)
    picture = source(rng, size).astype(np.float64)
    if kind == "dark":  # mostly below a third of the range
        return np.rint(picture * rng.uniform(0.15, 0.35)).astype(np.uint8)
    if kind == "bright":
        low = rng.uniform(150, 200)
        return np.rint(low + picture * (255 - low) / 255).astype(np.uint8)
    if kind == "grey":
        return np.repeat(np.rint(_luminance(picture))[..., None], 3, axis=2).astype(np.uint8)
    if kind == "stain":
        return _recolour(picture, stain_palette(cells, rng), rng)
    raise ValueError(f"unknown template kind {kind!r}; expected one of {', '.join(TEMPLATE_KINDS)}")


# --------------------------------------------------------------------------------------------
# Files


def blend(base: np.ndarray, template: np.ndarray, weight: float, rounding: Rounding = "round") -> np.ndarray:
    """``weight * base + (1 - weight) * template`` as uint8 (a convex blend never leaves 0..255)."""
    value = weight * np.asarray(base, np.float64) + (1 - weight) * np.asarray(template, np.float64)
    return (np.rint(value) if rounding == "round" else np.floor(value)).astype(np.uint8)


def _share(spec: TemplateSpec, rng: np.random.Generator) -> float:
    """One blend's cell share: one of ``shares``, else uniform in ``weight +- jitter``, else ``weight``."""
    if spec.shares:
        return float(spec.shares[int(rng.integers(0, len(spec.shares)))])
    if spec.jitter:
        return float(rng.uniform(spec.weight - spec.jitter, spec.weight + spec.jitter))
    return spec.weight


def build_file(cells: np.ndarray, cell_labels: np.ndarray, spec: FileSpec) -> PlantedFile:
    """A shuffled challenge-style file from real ``cells`` (uint8 (M, S, S, 3)) and ``spec``.

    ``spec.clean`` cells go in clean. Each template's bases are drawn from those, except a share
    ``spec.missing_bases`` drawn from the remaining cells, which then do not occur in the file.
    Needs enough distinct cells for both.
    """
    rng = np.random.default_rng(spec.seed)
    size = cells.shape[1]
    missing = [int(round(spec.missing_bases * t.bases)) for t in spec.templates]
    present = [t.bases - m for t, m in zip(spec.templates, missing)]
    needed = spec.clean + sum(missing)
    if needed > len(cells):
        raise ValueError(f"the spec needs {needed} distinct cells, only {len(cells)} given")
    if sum(present) > spec.clean:
        raise ValueError(f"the spec needs {sum(present)} base cells, the file has {spec.clean} clean ones")
    order = rng.permutation(len(cells))
    clean_rows = order[: spec.clean]
    outside = iter(order[spec.clean : needed])
    inside = iter(rng.choice(clean_rows, size=sum(present), replace=False))
    base_rows = np.array([next(source) for p, m in zip(present, missing)
                          for source in [inside] * p + [outside] * m], dtype=np.int64)  # fmt: skip

    images: list[np.ndarray] = [cells[r] for r in clean_rows]
    labels: list[int] = [int(cell_labels[r]) for r in clean_rows]
    truth: list[tuple] = [("clean", -1, int(r), np.nan, f"cell {int(r)}") for r in clean_rows]
    templates = []
    start = 0
    for t, template_spec in enumerate(spec.templates):
        template = make_template(template_spec.kind, rng, cells[clean_rows], size)
        templates.append(template)
        low, high = template_spec.blends_per_base
        for base in base_rows[start : start + template_spec.bases]:
            for _ in range(int(rng.integers(low, high + 1))):
                weight = _share(template_spec, rng)
                picture = blend(cells[base], template, weight, spec.rounding)
                label = int(rng.integers(0, 8))
                for _ in range(int(rng.integers(template_spec.repeats[0], template_spec.repeats[1] + 1))):
                    images.append(picture)
                    labels.append(int(rng.integers(0, 8)) if template_spec.labels == "conflict" else label)
                    truth.append(("corrupted", t, int(base), weight, f"cell {int(base)} + template {t}"))
        start += template_spec.bases
        for _ in range(template_spec.copies):
            images.append(template)
            labels.append(int(rng.integers(0, 8)))
            truth.append(("outlier", t, -1, 0.0, f"template {t}"))

    shuffle = rng.permutation(len(images))
    table = pd.DataFrame(truth, columns=["kind", "template", "cell", "weight", "source"]).iloc[shuffle]
    table = table.reset_index(drop=True)
    # Bases are named by cell; point them at the row where that cell sits clean in the file.
    row_of_cell = {int(c): row for row, c in enumerate(table["cell"]) if table["kind"].iat[row] == "clean"}
    table["base"] = [row_of_cell.get(int(c), -1) if k == "corrupted" else -1 for k, c in zip(table["kind"], table["cell"])]
    return PlantedFile(
        images=np.stack(images)[shuffle],
        labels=np.asarray(labels, dtype=np.uint8)[shuffle],
        truth=table[TRUTH_COLUMNS],
        templates=np.stack(templates) if templates else np.zeros((0, size, size, 3), np.uint8),
        spec=spec,
    )


SHARE_RANGE = (0.2, 0.85)  # the cell shares the stage must hold on, per image


def draw_shares(rng: np.random.Generator) -> tuple[float, float, tuple[float, ...]]:
    """(weight, jitter, shares) of one template: a fixed share, a narrow spread, any share in
    ``SHARE_RANGE`` per image, or a mixture of 2-4 values in it (a quarter each)."""
    low, high = SHARE_RANGE
    mode = rng.random()
    if mode < 0.25:
        return float(rng.uniform(low, high)), 0.0, ()
    if mode < 0.5:
        jitter = float(rng.uniform(0.01, 0.1))
        return float(rng.uniform(low + jitter, high - jitter)), jitter, ()
    if mode < 0.75:
        return (low + high) / 2, (high - low) / 2, ()
    return (low + high) / 2, 0.0, tuple(float(v) for v in rng.uniform(low, high, int(rng.integers(2, 5))))


def random_spec(rng: np.random.Generator, clean: int = 600, kinds: Sequence[str] = TEMPLATE_KINDS) -> FileSpec:
    """A file spec drawn from the ranges the anomaly stage must hold on (issues 12 and 30).

    Half the templates blend each base once (repeated 1-50 times as exact copies), half blend it
    2-15 times, each time with its own share (repeated 1-3 times, so files stay a few thousand images).
    """
    templates = []
    for _ in range(int(rng.integers(1, 7))):
        weight, jitter, shares = draw_shares(rng)
        low = int(rng.integers(1, 51))
        once = rng.random() < 0.5
        repeats = (low, int(rng.integers(low, 51))) if rng.random() < 0.2 else (1, int(rng.integers(1, 6)))
        templates.append(
            TemplateSpec(
                kind=str(rng.choice(list(kinds))),
                weight=weight,
                jitter=jitter,
                shares=shares,
                bases=int(rng.integers(2, 41)),
                blends_per_base=(1, 1) if once else (1, int(rng.integers(2, 16))),
                repeats=repeats if once else (1, int(rng.integers(1, 4))),
                copies=int(rng.integers(1, 30)) if rng.random() < 0.5 else 0,
                labels="conflict" if rng.random() < 0.5 else "agree",
            )
        )
    return FileSpec(
        templates=tuple(templates),
        clean=clean,
        rounding="round" if rng.random() < 0.7 else "floor",
        seed=int(rng.integers(0, 2**31)),
    )


#: How a finished file may have been stored: as built, every image saved as JPEG at a quality, or
#: resized (bicubic, stored at the new side). The anomaly stage must hold on all of them (issue 30).
STORAGES: tuple[str, ...] = ("lossless", "jpeg95", "jpeg92", "jpeg85", "resize88", "resize104", "jpeg80")


def stored(images: np.ndarray, storage: str) -> np.ndarray:
    """uint8 ``images`` after ``storage``: "lossless" (as they are), "jpegQ" (saved as JPEG at
    quality Q and read back) or "resizeS" (bicubic to S x S)."""
    match = re.fullmatch(r"(lossless|jpeg|resize)(\d*)", storage)
    if match is None or (match.group(1) != "lossless" and not match.group(2)):
        raise ValueError(f"unknown storage {storage!r}; expected lossless, jpeg<quality> or resize<side>")
    kind, number = match.group(1), int(match.group(2) or 0)
    if kind == "lossless" or len(images) == 0:
        return images
    if kind == "jpeg":
        return np.stack([jpeg_round_trip(x, number) for x in images])
    return np.stack([np.asarray(Image.fromarray(x).resize((number, number), Image.Resampling.BICUBIC)) for x in images])


def store(planted: PlantedFile, storage: str) -> PlantedFile:
    """``planted`` after every image went through ``storage`` (see :func:`stored`).

    A resize applies to the true templates too (the truth is then at the stored size); JPEG
    leaves them as made, since what the stage should recover is the template before compression.
    """
    templates = stored(planted.templates, storage) if storage.startswith("resize") else planted.templates
    return replace(planted, images=stored(planted.images, storage), templates=templates)


# --------------------------------------------------------------------------------------------
# Scoring a detection against the truth


@dataclass(frozen=True)
class DetectionScore:
    precision: float
    recall: float  # over corrupted and outlier images
    corrupted_recall: float
    outlier_recall: float
    clean_flagged: int
    template_psnr: tuple[float, ...]  # per true template: best recovered template's PSNR (0: none)
    weight_error: float  # max |estimated - true| over the corrupted images found (nan: none found)
    templates_found: int = 0  # templates the stage reported (the truth has len(template_psnr))


def score_detection(
    planted: PlantedFile, flagged: Sequence[int], report: pd.DataFrame, recovered: np.ndarray
) -> DetectionScore:
    """Precision/recall of ``flagged`` rows, template PSNR and the weight error of ``report``."""
    from bc_pipeline.quality.blends import psnr

    truth = planted.truth
    flagged_set = set(int(i) for i in flagged)
    bad = set(np.flatnonzero(truth["kind"] != "clean").tolist())
    corrupted = set(np.flatnonzero(truth["kind"] == "corrupted").tolist())
    outlier = bad - corrupted
    hits = len(flagged_set & bad)
    psnrs = []
    for template in planted.templates:
        psnrs.append(max((psnr(r, template) for r in recovered), default=0.0))
    exact = report[report["kind"] == "blend"] if len(report) else report  # weights of exact decompositions
    found = exact[exact["index"].isin(corrupted)]
    weight_error = (
        float(np.abs(found["weight"].to_numpy() - truth["weight"].to_numpy()[found["index"].to_numpy()]).max())
        if len(found)
        else float("nan")
    )
    return DetectionScore(
        precision=hits / len(flagged_set) if flagged_set else 1.0,
        recall=hits / len(bad) if bad else 1.0,
        corrupted_recall=len(flagged_set & corrupted) / len(corrupted) if corrupted else 1.0,
        outlier_recall=len(flagged_set & outlier) / len(outlier) if outlier else 1.0,
        clean_flagged=len(flagged_set - bad),
        template_psnr=tuple(psnrs),
        weight_error=weight_error,
        templates_found=len(recovered),
    )
