"""Benchmark every registered model on each Keras backend: training and inference images/s, side by side.

Each backend (``--backends``, default TensorFlow and JAX, those installed) runs in its own
subprocess, since Keras picks its backend once per process. For each model of the zoo
(``models.zoo.REGISTRY``, weights ``none``), built and compiled as the training worker does (Adam,
categorical cross-entropy, all layers trainable but the backbone's first ``--frozen-layers``, as
the zoo's ``frozen_layers`` does: no gradient is computed below the lowest trainable layer, so
freezing the high-resolution stem saves much of the backward pass; XLA as ``jit_compile=auto``
chooses: on for JAX, off for TensorFlow), on random uint8 96x96 images:
  - build + first step: the seconds until the first training step returns (graph tracing);
  - training images/s: ``--steps`` further steps of ``train_on_batch`` (batch ``--batch-size``);
  - inference images/s: ``predict_on_batch`` on batches of 256, after one warm-up batch.
From these it estimates the seconds per epoch of pbc96's training split (about 11,500 images),
which is what decides whether a model can be trained on this machine at all.

Run: ``.venv/bin/python bench/bench_models.py [--image-size 32] [--models a b] [--steps 10]
[--backends tensorflow jax] [--frozen-layers 17]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from _common import table, timed

EPOCH_IMAGES = 11_500  # pbc96's training split after cleaning


def measure(name: str, image_size: int, batch_size: int, steps: int, frozen_layers: int = 0) -> dict[str, float]:
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec, set_trainable
    from bc_pipeline.training.worker.fit import make_loss, make_optimizer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch_size, 96, 96, 3)).astype(np.float32)
    labels = keras.utils.to_categorical(rng.integers(0, 8, batch_size), 8)

    from bc_pipeline.training.worker.backend import configure_device, use_jit

    jit = use_jit("auto", configure_device(keras.backend.backend()))

    def build_and_step():
        model = build_model(model_spec(name, image_size=image_size), num_classes=8)
        set_trainable(model, "all", frozen_layers)
        model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"), jit_compile=jit)
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


def run_backend(backend: str, args: argparse.Namespace) -> list[dict]:
    """All models on one backend, in a subprocess with ``KERAS_BACKEND`` set; one JSON line per model."""
    command = [sys.executable, __file__, "--child", "--image-size", str(args.image_size), "--batch-size",
               str(args.batch_size), "--steps", str(args.steps), "--frozen-layers", str(args.frozen_layers), "--models", *args.models]  # fmt: skip
    env = os.environ | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{backend}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    from bc_pipeline.models.zoo import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(REGISTRY))
    parser.add_argument("--frozen-layers", type=int, default=0, help="backbone layers, from the input, kept frozen in every model")
    parser.add_argument("--backends", nargs="+", default=[b for b in ("tensorflow", "jax") if importlib.util.find_spec(b)])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import keras

        for name in args.models:
            print(json.dumps({"model": name, "backend": keras.backend.backend(),
                              **measure(name, args.image_size, args.batch_size, args.steps, args.frozen_layers)}), flush=True)  # fmt: skip
        return
    import keras

    print(f"{platform.node()}: {os.cpu_count()} cores, Keras {keras.__version__}, backends {', '.join(args.backends)}, "
          f"input {args.image_size}px, batch {args.batch_size}, {args.steps} timed steps, {args.frozen_layers} frozen backbone layers")  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    for backend in args.backends:
        started = time.perf_counter()
        for r in run_backend(backend, args):
            results[(r["model"], backend)] = r
        print(f"  {backend}: done in {time.perf_counter() - started:.0f}s", flush=True)
    header = ["model", "params"]
    for backend in args.backends:
        header += [f"{backend} build+1st s", f"{backend} train img/s", f"{backend} infer img/s", f"{backend} s/epoch"]
    rows = []
    for name in args.models:
        found = [results.get((name, b)) for b in args.backends]
        any_result = next((r for r in found if r), None)
        row = [name, f"{any_result['parameters'] / 1e6:.1f}M" if any_result else "-"]
        for r in found:
            row += [f"{r['first']:.0f}", f"{r['train']:.0f}", f"{r['infer']:.0f}", f"{r['epoch']:.0f}"] if r else ["-"] * 4
        rows.append(row)
    table(header, rows)


if __name__ == "__main__":
    main()
