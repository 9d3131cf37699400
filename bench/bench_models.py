"""Benchmark every registered model: training and inference images/s at a given input size.

For each model of the zoo (``lib.zoo.REGISTRY``, weights ``none``), built as ``train_classifier``
builds it (Adam, categorical cross-entropy, all layers trainable), on random uint8 96x96 images:
  - build + first step: the seconds until the first training step returns (graph tracing);
  - training images/s: ``--steps`` further steps of ``train_on_batch`` (batch ``--batch-size``);
  - inference images/s: ``predict_on_batch`` on batches of 256, after one warm-up batch.
From these it estimates the seconds per epoch of pbc96's training split (about 11,500 images),
which is what decides whether a model can be trained on this machine at all.

Run: ``.venv/bin/python bench/bench_models.py [--image-size 32] [--models a b] [--steps 10]``
(or ``make bench``). On a GPU machine with Keras on the JAX backend it runs unchanged
(``KERAS_BACKEND=jax``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from _common import table, timed

EPOCH_IMAGES = 11_500  # pbc96's training split after cleaning


def measure(name: str, image_size: int, batch_size: int, steps: int) -> dict[str, float]:
    import keras

    from bc_pipeline.lib.training import make_loss, make_optimizer
    from bc_pipeline.lib.zoo import build_model, model_spec, set_trainable

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch_size, 96, 96, 3)).astype(np.float32)
    labels = keras.utils.to_categorical(rng.integers(0, 8, batch_size), 8)

    def build_and_step():
        model = build_model(model_spec(name, image_size=image_size), num_classes=8)
        set_trainable(model, "all")
        model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"))
        model.train_on_batch(images, labels)
        return model

    first, _, model = timed(build_and_step)
    train_wall, train_cpu, _ = timed(lambda: [model.train_on_batch(images, labels) for _ in range(steps)])
    batch = rng.integers(0, 256, size=(256, 96, 96, 3)).astype(np.float32)
    model.predict_on_batch(batch)
    infer_wall, _, _ = timed(lambda: [model.predict_on_batch(batch) for _ in range(max(2, steps // 2))])
    train_rate = steps * batch_size / train_wall
    return {
        "parameters": model.count_params(),
        "first": first,
        "train": train_rate,
        "cpu_per_wall": train_cpu / train_wall,
        "infer": max(2, steps // 2) * 256 / infer_wall,
        "epoch": EPOCH_IMAGES / train_rate,
    }


def main() -> None:
    from bc_pipeline.lib.zoo import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(REGISTRY))
    args = parser.parse_args()
    import keras

    print(f"{platform.node()}: {os.cpu_count()} cores, Keras {keras.__version__} on {keras.backend.backend()}, "
          f"input {args.image_size}px, batch {args.batch_size}, {args.steps} timed steps")  # fmt: skip
    rows = []
    for name in args.models:
        started = time.perf_counter()
        r = measure(name, args.image_size, args.batch_size, args.steps)
        print(f"  {name}: done in {time.perf_counter() - started:.0f}s", flush=True)
        rows.append([name, f"{r['parameters'] / 1e6:.1f}M", f"{r['first']:.0f}", f"{r['train']:.0f}",
                     f"{r['cpu_per_wall']:.2f}", f"{r['infer']:.0f}", f"{r['epoch']:.0f}"])  # fmt: skip
    table(["model", "params", "build+1st step s", "train img/s", "cpu/wall", "infer img/s", "s/epoch (11.5k)"], rows)


if __name__ == "__main__":
    main()
