"""An honest robustness benchmark: the test split under the ImageNet-C corruptions.

Robust accuracy measured with the same perturbations a model trained on measures the training
distribution, not robustness. This suite is the standard one of Hendrycks & Dietterich
("Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019):
15 corruptions in 4 families (noise, blur, weather, digital) at 5 severities, through the
maintained ``imagecorruptions-imaug`` package (a fork of bethgelab's ``imagecorruptions``, whose
last release, 1.1.2, uses ``np.float_``, ``pkg_resources`` and ``scipy.ndimage.interpolation``,
all gone from the numpy 2 / SciPy stack this project runs on). No training path of the pipeline
uses this code: it only ever makes evaluation sets.

Scores follow ImageNet-C:

- mean corruption accuracy (mCA): accuracy averaged over every corruption and severity;
- corruption error of a model ``f`` on corruption ``c``, relative to a baseline model ``b``:
  ``CE_c = sum_s E(f, c, s) / sum_s E(b, c, s)``, and mCE is the mean of ``CE_c`` over the
  corruptions (100 % is as bad as the baseline, lower is better). The relative mCE divides the
  *extra* error over the model's clean error the same way.

Some training presets apply ops of the same family as a corruption (``light``'s Gaussian noise and
brightness, say): :func:`seen_in_training` names them, and :func:`mean_accuracy` can leave them
out, so that a robust number counts only corruptions training never used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bc_pipeline.core.settings import declare

# The 15 ImageNet-C corruptions, by family (the validation four are left out, as in ImageNet-C).
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for names in FAMILIES.values() for name in names)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
FAMILY_OF: dict[str, str] = {name: family for family, names in FAMILIES.items() for name in names}
MANIFEST_COLUMNS = ["corruption", "severity", "family", "clean_index", "label"]


class CorruptionLibraryMissing(RuntimeError):
    """The corruption package (or OpenCV, which it needs) cannot be imported."""


def _corrupt_function() -> Callable[..., np.ndarray]:
    try:
        from imagecorruptions import corrupt
    except ImportError as error:  # opencv-python needs libGL on Linux; say how to get it
        raise CorruptionLibraryMissing(
            f"the ImageNet-C corruption suite needs the 'imagecorruptions-imaug' package and OpenCV ({error}); "
            "reinstall with `make install`, and on Debian/Ubuntu `apt-get install libgl1` if libGL is missing"
        ) from None
    return corrupt


def check_corruptions(names: Iterable[str], severities: Iterable[int]) -> None:
    """Refuse unknown corruption names and severities outside 1-5, before any work starts."""
    unknown = [name for name in names if name not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; the suite has {', '.join(CORRUPTIONS)}")
    wrong = [s for s in severities if s not in SEVERITIES]
    if wrong:
        raise ValueError(f"severities must be in 1-5, got {wrong}")


@dataclass(frozen=True)
class SuiteSettings:
    """Which corruptions and severities, on how many test images (the ``corruption_benchmark_set`` asset's config)."""

    corruptions: tuple[str, ...] = declare(CORRUPTIONS, "ImageNet-C corruptions (default: all 15).")
    severities: tuple[int, ...] = declare(SEVERITIES, "Severities 1-5.")
    max_images: int = declare(
        1000, "Test images, stratified by class (0: the whole split). 1,000 puts each cell's accuracy within about "
        "1.4 points (one standard error) at 75x the images in disk and prediction time.", ge=0,
    )  # fmt: skip
    workers: int = declare(0, "Processes (0: one per core).", ge=0)
    seed: int = declare(2)

    def __post_init__(self) -> None:
        check_corruptions(self.corruptions, self.severities)


def corrupt_images(images: np.ndarray, corruption: str, severity: int, *, seed: int) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8, each corrupted once; image ``i`` is drawn from ``seed + i``.

    The library draws from numpy's global generator (and takes a seed for glass blur and impulse
    noise), so seeding it per image makes the set reproducible whatever order it is made in.
    The global generator's state is restored afterwards.
    """
    check_corruptions([corruption], [severity])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"corruptions expect uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if min(images.shape[1:3], default=0) < 32:
        raise ValueError(f"the corruption suite needs images of at least 32x32 pixels, got {images.shape[1:3]}")
    corrupt = _corrupt_function()
    kwargs_of = {"glass_blur": "seed", "impulse_noise": "seed"}
    state = np.random.get_state()
    out = np.empty_like(images)
    try:
        for i, image in enumerate(images):
            np.random.seed((seed + i) % 2**32)
            kwargs = {kwargs_of[corruption]: (seed + i) % 2**32} if corruption in kwargs_of else {}
            out[i] = corrupt(np.ascontiguousarray(image), corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)
    return out


@dataclass(frozen=True)
class CorruptedSet:
    images: np.ndarray  # (len(manifest), H, W, 3) uint8
    manifest: pd.DataFrame  # MANIFEST_COLUMNS, row i describes image i


def subsample(labels: np.ndarray, max_images: int, *, seed: int) -> np.ndarray:
    """Positions of at most ``max_images`` items, stratified by label (0: all), in ascending order."""
    labels = np.asarray(labels)
    if max_images <= 0 or max_images >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and max_images >= np.count_nonzero(counts) else None
    chosen, _ = train_test_split(np.arange(len(labels)), train_size=max_images, stratify=stratify, random_state=seed)
    return np.sort(chosen)


def build_corrupted_set(
    images: np.ndarray,
    labels: np.ndarray,
    clean_index: np.ndarray,
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> CorruptedSet:
    """Every image under every corruption and severity; ``progress(corruption, severity, n, seconds)``.

    Each (corruption, severity) has its own seed stream, so the set is the same whatever
    ``workers`` is (processes, started fresh: the caller may hold TensorFlow threads that a fork
    would copy) and adding a corruption leaves the others' images alone.
    """
    check_corruptions(corruptions, severities)
    images = np.ascontiguousarray(images)
    n = len(images)
    jobs = [
        (images, corruption, severity, _task_seed(seed, c, severity))
        for c, corruption in enumerate(corruptions)
        for severity in severities
    ]
    out = np.empty((n * len(jobs), *images.shape[1:]), np.uint8)
    if n and jobs:
        _corrupt_function()  # fail here, with the clear message, rather than in a worker process
    frames = [
        pd.DataFrame({
            "corruption": corruption, "severity": severity, "family": FAMILY_OF[corruption],
            "clean_index": np.asarray(clean_index, np.int64), "label": np.asarray(labels, np.int64),
        })  # fmt: skip
        for _, corruption, severity, _ in jobs
    ]
    for position, (block, seconds) in enumerate(_run_tasks(jobs, workers if n else 1)):
        out[position * n : (position + 1) * n] = block
        if progress:
            progress(jobs[position][1], jobs[position][2], n, seconds)
    manifest = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=MANIFEST_COLUMNS)
    return CorruptedSet(out, manifest)


def _task_seed(seed: int, corruption_position: int, severity: int) -> int:
    return seed + 1_000_003 * (corruption_position + 1) + 10_007 * severity


def _timed_corruption(job: tuple[np.ndarray, str, int, int]) -> tuple[np.ndarray, float]:
    import time

    began = time.perf_counter()
    images, corruption, severity, seed = job
    return corrupt_images(images, corruption, severity, seed=seed), time.perf_counter() - began


def _run_tasks(jobs: list[tuple[np.ndarray, str, int, int]], workers: int) -> Iterable[tuple[np.ndarray, float]]:
    """Each job's corrupted block, in job order: in this process, or in ``workers`` spawned processes."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_timed_corruption, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_timed_corruption, jobs)


def corruption_scores(truth: np.ndarray, predicted: np.ndarray, manifest: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and error per (corruption, severity), in the manifest's order."""
    correct = np.asarray(truth) == np.asarray(predicted)
    frame = manifest[["corruption", "severity", "family"]].assign(correct=correct)
    table = frame.groupby(["corruption", "severity", "family"], sort=False).agg(images=("correct", "size"), accuracy=("correct", "mean"))
    table = table.reset_index()
    table["error"] = 1.0 - table["accuracy"]
    return table


def mean_accuracy(table: pd.DataFrame, *, exclude: Iterable[str] = ()) -> float | None:
    """Mean corruption accuracy over every (corruption, severity) cell, minus ``exclude``d corruptions."""
    kept = table[~table["corruption"].isin(set(exclude))]
    return float(kept["accuracy"].mean()) if len(kept) else None


def corruption_errors(
    table: pd.DataFrame, baseline: pd.DataFrame, *, clean_error: float, baseline_clean_error: float
) -> pd.DataFrame:
    """Per corruption: CE and relative CE of a model against a baseline model (ImageNet-C's formulas).

    Only corruptions and severities both tables scored are compared.
    """
    merged = table.merge(baseline, on=["corruption", "severity"], suffixes=("", "_baseline"))
    rows = []
    for corruption, cells in merged.groupby("corruption", sort=False):
        base_error = cells["error_baseline"].sum()
        base_extra = (cells["error_baseline"] - baseline_clean_error).sum()
        rows.append({
            "corruption": corruption,
            "family": FAMILY_OF.get(corruption, ""),
            "error": float(cells["error"].mean()),
            "baseline_error": float(cells["error_baseline"].mean()),
            "ce": float(cells["error"].sum() / base_error) if base_error > 0 else float("nan"),
            "relative_ce": float((cells["error"] - clean_error).sum() / base_extra) if base_extra > 0 else float("nan"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["corruption", "family", "error", "baseline_error", "ce", "relative_ce"])


def mean_corruption_error(errors: pd.DataFrame) -> tuple[float | None, float | None]:
    """(mCE, relative mCE): the means of :func:`corruption_errors`' columns; None if nothing compares."""
    if not len(errors):
        return None, None
    ce, relative = errors["ce"].dropna(), errors["relative_ce"].dropna()
    return (float(ce.mean()) if len(ce) else None, float(relative.mean()) if len(relative) else None)


# Corruptions of the suite that resemble an op of each training preset (augmentation.presets). A
# model trained on such a preset has seen that family; its score there is not a robust number.
PRESET_OVERLAPS: dict[str, tuple[str, ...]] = {
    "light": ("gaussian_noise", "defocus_blur", "brightness", "contrast"),
    "randaugment": ("brightness", "contrast"),
    "augmix": (),  # AugMix leaves out ImageNet-C's ops on purpose (Hendrycks et al., 2020)
    "gridmask": (),
    "strong": ("brightness", "contrast"),  # AugMix + RandAugment
    "categorical": ("defocus_blur", "brightness", "contrast"),
    "illumination": ("brightness", "contrast", "fog"),  # exposure, gamma, haze over a smooth field
    "focus": ("defocus_blur", "glass_blur"),  # glass blur is Gaussian blur around a pixel shuffle
    "noise": ("gaussian_noise", "shot_noise"),  # shot noise is Gaussian with a signal-dependent deviation
    "pixmix": ("brightness", "contrast", "fog"),  # mixes with smooth 1/f fields, multiplicative blends
    "stain": ("brightness", "contrast"),  # scaled dye densities darken, lighten and flatten the image
    "scale": (),  # zoom and translation: no corruption of the suite moves or resizes the cell
}


def seen_in_training(presets: Iterable[str]) -> list[str]:
    """Corruptions of the suite that the given training presets overlap, in suite order."""
    seen = {name for preset in presets for name in PRESET_OVERLAPS.get(preset, ())}
    return [name for name in CORRUPTIONS if name in seen]


def corruption_markdown(table: pd.DataFrame, *, seen: Sequence[str] = (), heatmap: str | None = None) -> list[str]:
    """Report lines: accuracy per corruption and severity, the mean of each row, unseen families marked."""
    grid = table.pivot_table(index="corruption", columns="severity", values="accuracy", sort=False)
    severities = list(grid.columns)
    lines = [
        "| corruption | family | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
        "|---|---|" + "---|" * (len(severities) + 1),
    ]
    for corruption, row in grid.iterrows():
        mark = " (seen in training)" if corruption in seen else ""
        cells = " | ".join(f"{value:.3f}" for value in row.to_numpy())
        lines.append(f"| {corruption}{mark} | {FAMILY_OF.get(corruption, '')} | {cells} | **{row.mean():.3f}** |")
    if heatmap:
        lines += ["", f"![accuracy per corruption and severity]({heatmap})"]
    return [*lines, ""]
