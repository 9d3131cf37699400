"""Benchmark the training input pipeline against training itself: does the model ever wait for data?

For the default training settings (``TrainingSettings()``, batches of 64) and the default model
(``custom_cnn`` at 32 px) it builds the model as ``train_classifier`` does (``build_model``, Adam,
categorical cross-entropy, accuracy), resizes
the pbc96 pool with ``resize_like_model`` and measures, in images per second:
  - pipeline: ``_dataset(pool, labels, 64, augment=True, repeat=True, batch_augment=...)`` (shuffle,
    flips / turns, batching, one-hot, and for mixup / cutmix the batch mixer on half of the
    batches, the training default) iterated for ``--steps`` batches (default: one epoch of the
    pool, so one shuffle-buffer refill is included) after a warm-up;
  - training: ``model.fit`` on ``--train-steps`` batches of that pipeline materialized in memory
    beforehand (``take(K).cache()``, filled before timing), timed per epoch of K steps after a
    first epoch that traces the train step;
  - ratio = pipeline / training: above 1, the pipeline alone outruns training;
  - fit on the live pipeline: ``model.fit`` straight on ``_dataset``, as ``train_classifier`` runs
    it (epochs of K steps, the first one dropped); on a CPU both share the same cores, so this is
    the speed training actually gets (``--no-live`` to skip; at 96 px only with ``--live-96``).
for batch_augment none, mixup, cutmix and mixup+cutmix; then the same at 96 px (the GPU setting,
where the pool stays uint8 at 96 px; ``--no-96`` to skip). Every figure is the best of
``--repeats`` runs.

Run: ``.venv/bin/python bench/bench_input_pipeline.py [--images N] [--repeats R]`` (or ``make bench``).
The images come from ``$BC_SHARED_DATASETS/pbc96`` (default ``../shared/datasets/pbc96``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bc_pipeline.lib.model import configure_devices
from bc_pipeline.lib.training import TrainingSettings, _dataset, make_loss, make_optimizer, resize_like_model
from bc_pipeline.lib.zoo import build_model, model_spec, set_trainable
from _common import best_of, load_pbc96, table

NUM_CLASSES = 8
BATCH_AUGMENTS = ("none", "mixup", "cutmix", "mixup+cutmix")


def compiled_model(settings: TrainingSettings, image_size: int) -> Any:
    """The model exactly as ``train_classifier`` builds and compiles it."""
    import keras

    keras.utils.set_random_seed(settings.seed)
    model = build_model(model_spec("custom_cnn", image_size=image_size), NUM_CLASSES)
    set_trainable(model, "all")
    model.compile(
        optimizer=make_optimizer(settings.optimizer, settings.learning_rate, settings.weight_decay),
        loss=make_loss(settings.loss, label_smoothing=settings.label_smoothing), metrics=["accuracy"],
    )
    return model


def fit_epochs(model: Any, data: Any, steps: int, repeats: int) -> tuple[float, float]:
    """Best (wall s, CPU s) of ``repeats`` epochs of ``steps`` batches, in one ``model.fit`` call.

    One extra epoch runs first and is dropped: it traces the train step (on the first call) and
    starts the iterator (filling the shuffle buffer). Later epochs continue the same iterator.
    """
    import keras

    class Clock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[tuple[float, float]] = []

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))

    clock = Clock()
    model.fit(data, steps_per_epoch=steps, epochs=1 + repeats, callbacks=[clock], verbose=0)
    return min(clock.epochs[1:])


def pipeline(pool: np.ndarray, labels: np.ndarray, settings: TrainingSettings, batch_augment: str) -> Any:
    """The training input pipeline as ``train_classifier`` makes it (no templates)."""
    return _dataset(
        pool, labels, settings.batch_size, num_classes=NUM_CLASSES, augment=settings.augment, seed=settings.seed,
        repeat=True, batch_augment=batch_augment, batch_augment_probability=settings.batch_augment_probability,
    )  # fmt: skip


def measure_size(
    images: np.ndarray, labels: np.ndarray, image_size: int, args: argparse.Namespace
) -> tuple[list[list[str]], list[str]]:
    settings = TrainingSettings()
    model = compiled_model(settings, image_size)
    start = time.perf_counter()
    pool = resize_like_model(model, images)
    resize_s = time.perf_counter() - start
    steps = args.steps or -(-len(pool) // settings.batch_size)
    train_steps = args.train_steps if image_size <= 32 else args.train_steps_96
    notes = [
        f"{image_size} px: pool {pool.shape} {pool.dtype} ({pool.nbytes / 2**20:.0f} MiB, "
        f"resized in {resize_s:.1f} s), "
        f"batch {settings.batch_size}, batch_augment_probability {settings.batch_augment_probability}, "
        f"pipeline {steps} batches, training {train_steps} steps"
    ]

    # Training on batches already in memory: the model's own speed.
    cached = pipeline(pool, labels, settings, "none").take(train_steps).cache()
    for _ in cached:  # fill the cache
        pass
    train_wall, train_cpu = fit_epochs(model, cached.repeat(), train_steps, args.repeats)
    train_rate = train_steps * settings.batch_size / train_wall
    print(f"  {image_size} px training: {train_rate:.0f} img/s", file=sys.stderr, flush=True)

    rows = []
    for batch_augment in BATCH_AUGMENTS:
        data = iter(pipeline(pool, labels, settings, batch_augment))
        for _ in range(args.warmup):
            next(data)

        def draw(data: Any = data) -> int:
            return sum(int(next(data)[0].shape[0]) for _ in range(steps))

        wall, cpu, made = best_of(args.repeats, draw)
        rate = made / wall
        row = [f"{image_size} px", batch_augment, f"{rate:.0f}", f"{cpu / wall:.2f}", f"{train_rate:.0f}",
               f"{train_cpu / train_wall:.2f}", f"{rate / train_rate:.1f}"]  # fmt: skip
        if args.no_live or (image_size > 32 and not args.live_96):
            row += ["-", "-"]
        else:
            live = pipeline(pool, labels, settings, batch_augment)
            live_wall, _ = fit_epochs(model, live, train_steps, args.repeats)
            live_rate = train_steps * settings.batch_size / live_wall
            row += [f"{live_rate:.0f}", f"{live_rate / train_rate:.2f}"]
        rows.append(row)
        print(f"  {image_size} px {batch_augment}: pipeline {rate:.0f} img/s", file=sys.stderr, flush=True)
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="pool of N random pbc96 images (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="pipeline batches timed (default: one epoch)")
    parser.add_argument("--warmup", type=int, default=20, help="pipeline batches drawn before timing")
    parser.add_argument("--train-steps", type=int, default=60, help="training steps timed at 32 px")
    parser.add_argument("--train-steps-96", type=int, default=10, help="training steps timed at 96 px")
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement (best is reported)")
    parser.add_argument("--no-live", action="store_true", help="skip model.fit on the live pipeline")
    parser.add_argument("--no-96", action="store_true", help="skip the 96 px (GPU setting) measurements")
    parser.add_argument("--live-96", action="store_true", help="also fit on the live pipeline at 96 px (slow on a CPU)")
    args = parser.parse_args(argv)

    pbc96 = load_pbc96()
    if pbc96 is None:
        return 1
    loaded, load_s, root = pbc96
    images, labels = loaded.images, loaded.manifest["label"].to_numpy().astype(np.int64)
    if args.images is not None and args.images < len(images):
        pick = np.random.default_rng(0).choice(len(images), size=args.images, replace=False)
        images, labels = images[pick], labels[pick]

    device = configure_devices()
    import keras
    import keras_cv
    import tensorflow as tf

    print(f"pbc96: {len(loaded.images)} images loaded in {load_s:.1f} s from {root}; pool of {len(images)}")
    print(
        f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, "
        f"keras-cv {keras_cv.__version__}, {os.cpu_count()} cores, {device}, "
        f"load average {os.getloadavg()[0]:.2f}, best of {args.repeats}"
    )

    rows, notes = [], []
    for size in (32,) if args.no_96 else (32, 96):
        size_rows, size_notes = measure_size(images, labels, size, args)
        rows += size_rows
        notes += size_notes
    for note in notes:
        print(f"  {note}")
    print()
    header = ["size", "batch_augment", "pipeline img/s", "cpu/wall", "training img/s", "cpu/wall", "ratio"]
    if args.no_live:
        rows = [row[:7] for row in rows]
    else:
        header += ["fit on live pipeline img/s", "live/cached"]
    table(header, rows)
    print()
    print("pipeline: _dataset alone; training: model.fit on batches cached in memory; ratio = pipeline / training")
    if not args.no_live:
        print("fit on live pipeline: model.fit on _dataset itself (pipeline and training share the cores);")
        print("not run at 96 px unless --live-96 (that setting is for a GPU, where the CPU only feeds it)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    low = [row for row in rows if float(row[6]) <= 1]
    for row in low:
        print(f"pipeline slower than training: {row[0]} {row[1]} (ratio {row[6]})")
    return 1 if low else 0


if __name__ == "__main__":
    raise SystemExit(main())
