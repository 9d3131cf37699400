"""Device check: train zoo models at 96 px on the GPU through the worker's own code, and report speeds.

Runs where the GPU is, with Keras on JAX (the GPU machine has JAX and PyTorch, no TensorFlow);
``scripts/device_check.sh`` prepares it here and runs it there. No Dagster, no TensorFlow: only
``bc_pipeline.training.worker`` (backend, input pipeline, the model zoo) and Keras.

For each model (default ``custom_cnn``, ``efficientnetv2b0``, ``convnext_tiny``) at 96 px, built as
the worker builds it (mixed precision and XLA as ``auto`` chooses on that device), trained with
``model.fit`` on the worker's ``PyDataset`` over real pbc96 images:
  - images/s and step time of the timed epochs (the first epoch, which compiles, is left out);
  - peak accelerator memory (JAX ``memory_stats``), where the backend reports it;
  - achieved TFLOP/s: 3 x the forward FLOPs counted from the layers (convolutions and dense
    layers; the backward pass costs about twice the forward), times images/s, against the peak;
  - validation accuracy after the first epoch (``steps`` batches);
then the input pipeline alone: images/s of ``make_batch`` at 96 px built by 1 and by N threads,
with and without MixUp/CutMix, and its ratio to each model's training images/s (target: 3x).

Run: ``KERAS_BACKEND=jax python bench/bench_gpu.py --data <pbc96 folder> [--steps 40] [--batch-size 256]``.
On a CPU it runs too (``--quick``: a few steps per model), which is how it is tested before use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when not installed

PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0}  # dense bf16 tensor-core peaks
MODELS = ("custom_cnn", "efficientnetv2b0", "convnext_tiny")


def forward_flops(model) -> float:
    """Forward FLOPs per image: 2 x multiply-adds of every Conv2D, DepthwiseConv2D and Dense layer."""
    total = 0.0
    for layer in _layers(model):
        kind = layer.__class__.__name__
        if kind not in ("Conv2D", "DepthwiseConv2D", "Dense"):
            continue
        out = layer.output.shape
        spatial = float(np.prod([d for d in out[1:-1] if d is not None])) if len(out) > 2 else 1.0
        kernel = layer.kernel.shape
        if kind == "Dense":
            total += 2.0 * spatial * kernel[0] * kernel[1]
        elif kind == "Conv2D":
            total += 2.0 * spatial * kernel[0] * kernel[1] * kernel[2] * kernel[3] / max(1, getattr(layer, "groups", 1))
        else:  # depthwise: one k x k filter per input channel (times the depth multiplier)
            total += 2.0 * spatial * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    return total


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _layers(layer)
        else:
            yield layer


def peak_memory_gib() -> float | None:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return None


def load_split(folder: Path, seed: int = 0):
    from bc_pipeline.ingest.loaders import load_folder

    loaded = load_folder(folder, image_size=96)
    labels = loaded.manifest["label"].to_numpy(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.8 * len(order))
    train, val = np.sort(order[:cut]), np.sort(order[cut:])
    return loaded.images[train], labels[train], loaded.images[val], labels[val]


def train_model(name: str, data, device, *, batch_size: int, steps: int, epochs: int) -> dict:
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec, set_trainable
    from bc_pipeline.training.worker.backend import precision_policy, use_jit
    from bc_pipeline.training.worker.data import BatchRecipe, ImagePool, evaluation_batches, training_batches
    from bc_pipeline.training.worker.fit import make_loss, make_optimizer
    from bc_pipeline.training.worker.run import input_threads

    train_x, train_y, val_x, val_y = data
    policy = precision_policy("auto", device)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_model(model_spec(name, image_size=96), 8)
    set_trainable(model, "all")
    model.compile(optimizer=make_optimizer("adam", 1e-3), loss=make_loss("categorical_crossentropy"),
                  metrics=["accuracy"], jit_compile=use_jit("auto", device))  # fmt: skip
    batches = training_batches(ImagePool([(train_x, train_y)]), BatchRecipe(num_classes=8, batch_size=batch_size, seed=0),
                               workers=input_threads(0))  # fmt: skip
    val = evaluation_batches(val_x, val_y, num_classes=8, batch_size=batch_size)

    class Clock(keras.callbacks.Callback):
        """Seconds per epoch; reading the epoch's loss waits for the device's queued steps to finish."""

        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float((logs or {}).get("loss", 0.0))
            self.seconds.append(time.perf_counter() - self._start)

    clock = Clock()
    started = time.perf_counter()
    fit = dict(steps_per_epoch=steps, callbacks=[clock], verbose=0, shuffle=False)
    model.fit(batches, epochs=1, **fit)  # compiles: timed apart
    val_accuracy = float(model.evaluate(val, verbose=0, return_dict=True)["accuracy"])
    model.fit(batches, initial_epoch=1, epochs=epochs, **fit)
    timed = clock.seconds[1:] or clock.seconds
    per_epoch = float(np.median(timed))
    images_per_second = steps * batch_size / per_epoch
    flops = forward_flops(model)
    return {
        "model": name, "policy": policy, "jit": use_jit("auto", device), "parameters": int(model.count_params()),
        "first_epoch_s": round(clock.seconds[0], 1), "images_per_s": round(images_per_second),
        "step_ms": round(1000 * per_epoch / steps, 2), "peak_memory_gib": peak_memory_gib(),
        "forward_gflops_per_image": round(flops / 1e9, 3),
        "achieved_tflops": round(3 * flops * images_per_second / 1e12, 1),
        "val_accuracy_epoch1": round(val_accuracy, 4), "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def input_rate(pool, *, batch_size: int, threads: int, batch_augment: str, batches: int) -> tuple[float, float]:
    """(images/s, CPU/wall) of the worker's batches, ``threads`` building them at once as Keras' enqueuer does."""
    from bc_pipeline.training.worker.data import BatchRecipe, _Schedule, make_batch

    schedule = _Schedule(len(pool), batch_size, 0)
    recipe = BatchRecipe(num_classes=8, batch_size=batch_size, seed=0, batch_augment=batch_augment, batch_augment_probability=0.5)

    def one(index: int):
        return make_batch(pool, schedule.rows(index), np.random.default_rng(index), recipe)

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(one, range(threads)))  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        list(executor.map(one, range(batches)))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return batches * batch_size / wall, cpu / wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a pbc96-style folder (one sub-folder per class)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs; the first (compiling) is not timed")
    parser.add_argument("--quick", action="store_true", help="a few small steps: check that it runs (CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.epochs = 32, 3, 2

    from bc_pipeline.training.worker.backend import configure_device, select_backend

    backend = os.environ.get("KERAS_BACKEND", "jax")
    select_backend(backend)
    device = configure_device(backend)
    import keras

    gpu_name = device.description.split(": ", 1)[-1]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu_name), None)
    started = time.perf_counter()
    data = load_split(args.data)
    print(f"Keras {keras.__version__} on {backend}, {device.description}; {os.cpu_count()} cores; "
          f"{len(data[0])} train / {len(data[2])} val images at 96 px loaded in {time.perf_counter() - started:.1f}s",
          flush=True)  # fmt: skip
    results = []
    for name in args.models:
        r = train_model(name, data, device, batch_size=args.batch_size, steps=args.steps, epochs=args.epochs)
        r["share_of_peak"] = round(r["achieved_tflops"] / peak, 4) if peak else None
        results.append(r)
        print(json.dumps(r), flush=True)
    from bc_pipeline.training.worker.data import ImagePool

    threads = max(1, min(16, os.cpu_count() or 1))
    pool = ImagePool([(data[0], data[1])])
    pipeline = {
        f"{mix}_threads{n}": round(input_rate(pool, batch_size=args.batch_size, threads=n, batch_augment=mix,
                                              batches=8 if args.quick else 64)[0])
        for mix in ("none", "mixup+cutmix") for n in sorted({1, threads})
    }  # fmt: skip
    print("input pipeline images/s:", json.dumps(pipeline), flush=True)
    best_input = max(v for k, v in pipeline.items() if k.startswith("mixup+cutmix"))
    for r in results:
        r["input_over_training"] = round(best_input / r["images_per_s"], 2)
    print(f"\n{'model':18} {'policy':15} {'img/s':>9} {'step ms':>8} {'peak GiB':>8} {'TFLOP/s':>8} "
          f"{'of peak':>7} {'val acc':>7} {'input/train':>11}")  # fmt: skip
    for r in results:
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        share = f"{100 * r['share_of_peak']:.1f}%" if r["share_of_peak"] is not None else "n/a"
        print(f"{r['model']:18} {r['policy']:15} {r['images_per_s']:>9} {r['step_ms']:>8} {memory:>8} "
              f"{r['achieved_tflops']:>8} {share:>7} {r['val_accuracy_epoch1']:>7} {r['input_over_training']:>11}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": device.description, "results": results, "input": pipeline}, indent=2))
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
