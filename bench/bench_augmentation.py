"""Benchmark the augmentation presets on real PBC images: images per second on this machine.

For every image preset (``IMAGE_PRESETS``) on ``--images`` pbc96 images (a fixed random sample):
  (a) batched: the library's ``augment_images`` (tf.data map over batches of 64, AUTOTUNE), timed as
      the whole call (it builds fresh layers and traces them on every call, as the pipeline does);
      its very first call, on 64 images, is reported separately as the warm-up / tracing time;
  (b) per-image: the same ``build_preset`` function mapped over single (96, 96, 3) images
      (AUTOTUNE, deterministic, then rounded to uint8 and batched by 64), timed the same way;
and for each the process CPU time over wall time (about 2 on 2 cores when both are busy).
Then the batch-level mixers of the training worker (``bc_pipeline.training.worker.data.mix_batch``: mixup,
cutmix, mixup+cutmix; numpy, uint8) on batches of 64 with one-hot labels, against the same loop
without a mixer. Every time is the best of
``--repeats`` runs (``--mixer-repeats`` for the mixers, which take about a second each).

Run: ``.venv/bin/python bench/bench_augmentation.py [--images N] [--repeats R]`` (or ``make bench``).
The images come from ``$BC_SHARED_DATASETS/pbc96`` (default ``../shared/datasets/pbc96``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from _common import best_of, load_pbc96, table, timed

from bc_pipeline.augmentation.presets import IMAGE_PRESETS, augment_images, build_preset
from bc_pipeline.training.worker.data import mix_batch, one_hot

BATCH = 64
NUM_CLASSES = 8
MIXERS = ("none", "mixup", "cutmix", "mixup+cutmix")


def per_image_augment(images: np.ndarray, preset: str, *, seed: int = 0, batch_size: int = BATCH) -> np.ndarray:
    """``augment_images`` with the preset mapped over single images instead of batches."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    apply = build_preset(preset, seed=seed)
    data = (
        tf.data.Dataset.from_tensor_slices(images)
        .map(lambda image: apply(tf.cast(image, tf.float32)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .map(lambda image: tf.cast(tf.round(image), tf.uint8))
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    return np.concatenate([batch.numpy() for batch in data])


def mixed_batches(images: np.ndarray, labels: np.ndarray, name: str, *, seed: int = 0) -> int:
    """Batches of 64 (uint8 images, one-hot labels), mixed by ``mix_batch(name)``; images made."""
    rng = np.random.default_rng(seed)
    made = 0
    for start in range(0, len(images) - BATCH + 1, BATCH):
        x, y = images[start : start + BATCH], one_hot(labels[start : start + BATCH], NUM_CLASSES)
        if name != "none":
            x, y = mix_batch(name, x, y, rng)
        made += len(x)
    return made


def check(name: str, images: np.ndarray, out: np.ndarray) -> str:
    """'' if ``out`` is a plausible augmentation of ``images``, else what is wrong."""
    if out.shape != images.shape or out.dtype != np.uint8:
        return f"{name}: got {out.dtype} {out.shape}, expected uint8 {images.shape}"
    changed = np.mean(np.any(out != images, axis=(1, 2, 3)))
    if changed < 0.5:
        return f"{name}: only {changed:.0%} of the images were changed"
    return ""


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="pbc96 images to augment (random sample)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (best is reported)")
    parser.add_argument("--mixer-repeats", type=int, default=5, help="runs per mixer measurement (they are short)")
    parser.add_argument("--presets", default=",".join(IMAGE_PRESETS), help="comma-separated image presets")
    parser.add_argument("--no-per-image", action="store_true", help="skip the per-image variant (b)")
    parser.add_argument("--no-mixers", action="store_true", help="skip mixup / cutmix")
    return parser.parse_args(argv)


def _announce(loaded_count: int, load_s: float, root: object, n: int, images: np.ndarray, repeats: int) -> None:
    """Warm TensorFlow up and print what is measured, on what."""
    import keras
    import keras_cv
    import tensorflow as tf

    # Start TensorFlow's runtime and tf.data once, so the first preset's warm-up holds only its own
    # layer building and tracing.
    for _ in tf.data.Dataset.from_tensor_slices(images[:BATCH]).batch(BATCH).map(lambda b: tf.cast(b, tf.float32) + 1):
        pass
    print(f"pbc96: {loaded_count} images loaded in {load_s:.1f} s from {root}; benchmarking a random {n}")
    print(
        f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"keras-cv {keras_cv.__version__}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, "
        f"best of {repeats}"
    )
    print("  1st call: augment_images on 64 images, the first time this preset runs (layer building + tracing)")
    print("  batched: augment_images on all images; per-image: the preset mapped over single images")
    print("  cpu/wall: process CPU time (all threads) / wall time of the reported run")
    print()


def _presets_table(images: np.ndarray, presets: list[str], args: argparse.Namespace) -> list[str]:
    """(a) batched and (b) per-image rates of each preset, printed; the checks that failed."""
    rows, problems, n = [], [], len(images)
    for preset in presets:
        first_s, _, _ = timed(lambda: augment_images(images[:BATCH], preset))
        wall_b, cpu_b, out = best_of(args.repeats, lambda: augment_images(images, preset))
        problems.append(check(f"{preset} batched", images, out))
        if args.no_per_image:
            wall_p, cpu_p = float("nan"), float("nan")
        else:
            per_image_augment(images[:BATCH], preset)  # warm-up, as for the batched call
            wall_p, cpu_p, out = best_of(args.repeats, lambda: per_image_augment(images, preset))
            problems.append(check(f"{preset} per-image", images, out))
        rows.append((preset, first_s, n / wall_b, cpu_b / wall_b, n / wall_p, cpu_p / wall_p))
        print(f"  done: {preset}", file=sys.stderr, flush=True)
    print(f"image presets, {n} images of 96x96, batches of {BATCH}")
    table(
        ["preset", "1st call s", "batched img/s", "cpu/wall", "per-image img/s", "cpu/wall", "per-image/batched"],
        [
            [preset, f"{first_s:.2f}", f"{rate_b:.0f}", f"{load_b:.2f}"]
            + (["-", "-", "-"] if np.isnan(rate_p) else [f"{rate_p:.0f}", f"{load_p:.2f}", f"{rate_p / rate_b:.2f}x"])
            for preset, first_s, rate_b, load_b, rate_p, load_p in rows
        ],
    )
    print()
    return [problem for problem in problems if problem]


def _mixers_table(images: np.ndarray, labels: np.ndarray, repeats: int) -> None:
    """The batch mixers' rates, printed."""
    mix_rows = []
    for name in MIXERS:
        first_s, _, _ = timed(lambda: mixed_batches(images[: 2 * BATCH], labels[: 2 * BATCH], name))
        wall, cpu, made = best_of(repeats, lambda: mixed_batches(images, labels, name))
        mix_rows.append((name, first_s, made, made / wall, cpu / wall))
        print(f"  done: {name}", file=sys.stderr, flush=True)
    print(
        f"batch mixers (training.worker.data.mix_batch), uint8 batches of {BATCH} with one-hot labels, every batch mixed, "
        f"best of {repeats}"
    )
    table(
        ["mixer", "1st call s", "images", "img/s", "cpu/wall"],
        [
            ["none (no mix)" if name == "none" else name, f"{first_s:.2f}", str(made), f"{rate:.0f}", f"{load:.2f}"]
            for name, first_s, made, rate, load in mix_rows
        ],
    )
    print()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    pbc96 = load_pbc96()
    if pbc96 is None:
        return 1
    loaded, load_s, root = pbc96
    rng = np.random.default_rng(0)
    pick = rng.choice(len(loaded.images), size=min(args.images, len(loaded.images)), replace=False)
    images = np.ascontiguousarray(loaded.images[pick])
    labels = loaded.manifest["label"].to_numpy()[pick]
    _announce(len(loaded.images), load_s, root, len(images), images, args.repeats)
    problems = _presets_table(images, [p for p in args.presets.split(",") if p], args)
    if not args.no_mixers:
        _mixers_table(images, labels, args.mixer_repeats)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    for problem in problems:
        print(f"check failed: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
