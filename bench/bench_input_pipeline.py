"""Benchmark the worker's numpy input pipeline against training: does the model ever wait for data?

On a pool of pbc96 images (all of them, or ``--images N``), for the default model (``custom_cnn``)
at 32 px (the CPU default; the pool resized once by the model's own layer, as the worker does)
and at 96 px (the GPU setting), for each batch augmentation (none, mixup, cutmix, mixup+cutmix,
applied to half of the batches as by default), in images per second:
  - pipeline, 1 thread: ``make_batch`` (gather, flips and turns, mixing) batch after batch;
  - pipeline, N threads: the same batches built by N threads at once, as Keras' enqueuer does
    with ``PyDataset(workers=N)`` (``--threads``, default: all cores);
  - training: ``model.fit`` on batches made beforehand (the model's own speed on this machine,
    on the backend of ``KERAS_BACKEND``, default TensorFlow), the first epoch (tracing) left out;
  - ratio: pipeline (N threads) / training; above 3 the pipeline outruns training threefold.
Then, for a GPU the numbers here cannot show, the training FLOPs of ``custom_cnn`` at 96 px and
the images/s an H100/H200 would need from the pipeline at the effective throughput of published
convnet training (see bench/README.md). Every figure is the best of ``--repeats`` runs.

Run: ``.venv/bin/python bench/bench_input_pipeline.py [--images N] [--repeats R]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from _common import load_pbc96, table
from bench_gpu import forward_flops, input_rate

BATCH_AUGMENTS = ("none", "mixup", "cutmix", "mixup+cutmix")
# MLPerf Training v3.0 (2023): ResNet-50 (8.2 GFLOPs forward at 224 px, about 24.6 per trained
# image) on 8 H100 in about 13.5 minutes for about 35 epochs of ImageNet's 1.28M images, so about
# 6,900 images/s, or 170 TFLOP/s, per GPU. A convnet that used an H100/H200 as well would train at
# this effective rate; small 96 px convolutions use it less well, so this is an upper bound.
PUBLISHED_EFFECTIVE_TFLOPS = 170.0


def training_rate(model, pool, batch_size: int, steps: int, repeats: int) -> float:
    import keras

    from bc_pipeline.training.worker.data import BatchRecipe, feed, training_batches

    made = training_batches(pool, BatchRecipe(num_classes=8, batch_size=batch_size, seed=0))
    cached = [made[i] for i in range(steps)]

    class Cached(keras.utils.PyDataset):
        num_batches = property(lambda self: steps)

        def __getitem__(self, index):
            return cached[index]

    class Clock(keras.callbacks.Callback):
        seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            Clock.seconds.append(time.perf_counter() - self._start)

    Clock.seconds = []
    model.fit(feed(Cached(), keras.backend.backend()), epochs=1 + repeats, callbacks=[Clock()], verbose=0, shuffle=False)
    return steps * batch_size / min(Clock.seconds[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None, help="pool of N random pbc96 images (default: all)")
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches timed per figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--train-steps", type=int, default=40, help="training steps timed (32 px; 96 px: a quarter)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from bc_pipeline.training.worker.backend import configure_device, select_backend

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    select_backend(backend)
    device = configure_device(backend)
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec, set_trainable
    from bc_pipeline.training.worker.backend import use_jit
    from bc_pipeline.training.worker.fit import TrainingSettings, _training_pool, make_loss, make_optimizer

    pbc96 = load_pbc96()
    if pbc96 is None:
        return 1
    loaded, load_s, root = pbc96
    images, labels = loaded.images, loaded.manifest["label"].to_numpy(np.int64)
    if args.images is not None and args.images < len(images):
        pick = np.sort(np.random.default_rng(0).choice(len(images), size=args.images, replace=False))
        images, labels = images[pick], labels[pick]
    settings = TrainingSettings()
    print(f"pbc96: {len(images)} images ({load_s:.1f} s to load from {root}); python {platform.python_version()}, "
          f"Keras {keras.__version__} on {backend}, {device.description}, {os.cpu_count()} cores, "
          f"batch {settings.batch_size}, best of {args.repeats}")  # fmt: skip
    rows = []
    for size in (32, 96):
        model = build_model(model_spec("custom_cnn", image_size=size), 8)
        set_trainable(model, "all")
        model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"),
                      metrics=["accuracy"], jit_compile=use_jit("auto", device))  # fmt: skip
        pool = _training_pool(model, images, labels, (), True)
        steps = args.train_steps if size == 32 else max(4, args.train_steps // 4)
        train = training_rate(model, pool, settings.batch_size, steps, args.repeats)
        for mix in BATCH_AUGMENTS:
            rate = dict(batch_size=settings.batch_size, batch_augment=mix, batches=args.batches)
            one = max(input_rate(pool, threads=1, **rate)[0] for _ in range(args.repeats))
            many, cpu = max(input_rate(pool, threads=args.threads, **rate) for _ in range(args.repeats))
            rows.append([f"{size} px", mix, f"{one:.0f}", f"{many:.0f}", f"{cpu:.2f}", f"{train:.0f}", f"{many / train:.1f}"])
            print(f"  {size} px {mix}: {one:.0f} / {many:.0f} img/s, training {train:.0f}", flush=True)
        if size == 96:
            flops = 3 * forward_flops(model)
    table(["size", "batch_augment", "pipeline 1 thread", f"{args.threads} threads", "cpu/wall", "training img/s",
           "ratio"], rows)  # fmt: skip
    gpu = PUBLISHED_EFFECTIVE_TFLOPS * 1e12 / flops
    worst96 = min(float(r[2]) for r in rows if r[0] == "96 px")
    print(f"\ncustom_cnn at 96 px: {flops / 1e9:.2f} GFLOPs per trained image; at the {PUBLISHED_EFFECTIVE_TFLOPS:.0f} "
          f"TFLOP/s of published H100 convnet training that is {gpu:,.0f} images/s, so 3x needs {3 * gpu:,.0f} "
          f"images/s of input: {3 * gpu / worst96:.0f} threads at this machine's slowest 1-thread 96 px rate "
          f"({worst96:.0f} images/s), if threads scaled perfectly")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
