"""Benchmark perceptual hashing of the PBC images (phash + dhash per image).

Measures images per second for
  (a) the plain per-image loop ``imagehash.phash(Image.fromarray(x)); imagehash.dhash(...)``,
  (b) ``compute_hashes(workers=1)`` (batched DCT, one process),
  (c) ``compute_hashes()`` with the default workers (all cores, process pool),
  (d) ``hash_with_cache`` on a warm cache where 1% of the images are new,
  (e) ``compute_hashes`` at 1 and at all cores on the same images stored as a memory-mapped
      ``.npy`` (what the pipeline's stored image sets are: the workers map the file themselves),
      with the scaling ratio, and the peak memory of this process per 100k images,
each repeated ``--repeats`` times (best time reported), and checks that (b) and (c) equal (a)
bit for bit.

Run: ``.venv/bin/python bench/bench_hashing.py [--limit N]`` (or ``make bench``). The images come
from ``$BC_SHARED_DATASETS/pbc96`` (default ``../shared/datasets/pbc96``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
from _common import load_pbc96
from PIL import Image

from bc_pipeline.quality.hashing import compute_hashes, hash_hex, hash_with_cache


def imagehash_loop(images: np.ndarray) -> tuple[list[str], list[str]]:
    phash, dhash = [], []
    for x in images:
        image = Image.fromarray(x)
        phash.append(str(imagehash.phash(image)))
        dhash.append(str(imagehash.dhash(image)))
    return phash, dhash


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Best wall time over ``repeats`` runs, and the result of the last run."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def mismatches(reference: tuple[list[str], list[str]], hashes: tuple[np.ndarray, np.ndarray]) -> int:
    """Images whose phash or dhash differs from the imagehash strings."""
    ref_p, ref_d = reference
    phash, dhash = hashes
    return sum(
        hash_hex(p) != rp or hash_hex(d) != rd for p, d, rp, rd in zip(phash, dhash, ref_p, ref_d, strict=True)
    )


def _mapped_rows(images: np.ndarray, n: int, cores: int, repeats: int) -> tuple[list, tuple, tuple, float]:
    """(e): the same images from a memory-mapped .npy, 1 and ``cores`` workers; rows, both results, the ratio."""
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "images.npy", images)
        mapped = np.load(Path(folder) / "images.npy", mmap_mode="r")
        t_e1, mapped_serial = best_of(repeats, lambda: compute_hashes(mapped, workers=1))
        tracemalloc.start()
        t_e2, mapped_pooled = best_of(repeats, lambda: compute_hashes(mapped, workers=cores))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    ratio = t_e1 / t_e2
    rows = [("(e) memory-mapped .npy, workers=1", n, t_e1, ""),
            (f"(e) memory-mapped .npy, workers={cores}", n, t_e2,
             f"{ratio:.2f}x workers=1; peak {peak / 1e6 / n * 1e5:.0f} MB per 100k images here")]  # fmt: skip
    return rows, mapped_serial, mapped_pooled, ratio


def _print_rows(rows: list, baseline_seconds: float) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'method':<{width}}  {'images':>7}  {'best s':>8}  {'images/s':>10}  {'vs (a)':>7}  note")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 8}  {'-' * 10}  {'-' * 7}  ----")
    for name, count, seconds, note in rows:
        print(f"{name:<{width}}  {count:>7}  {seconds:>8.3f}  {count / seconds:>10.0f}  {baseline_seconds / seconds:>6.1f}x  {note}")
    print()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="benchmark only the first N images")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is reported)")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="share of new images for (d)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    pbc96 = load_pbc96()
    if pbc96 is None:
        return 1
    loaded, load_s, root = pbc96
    images, ids = loaded.images, loaded.manifest["image_id"].astype(str).to_numpy()
    if args.limit is not None:
        images, ids = images[: args.limit], ids[: args.limit]
    n, cores = len(images), os.cpu_count() or 1
    print(f"pbc96: {len(loaded.images)} images loaded in {load_s:.1f} s from {root}; benchmarking {n}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, imagehash {imagehash.__version__}, "
          f"{cores} cores, best of {args.repeats}")  # fmt: skip

    t_a, reference = best_of(args.repeats, lambda: imagehash_loop(images))
    t_b, serial = best_of(args.repeats, lambda: compute_hashes(images, workers=1))
    t_c, pooled = best_of(args.repeats, lambda: compute_hashes(images))
    rows = [("(a) imagehash per-image loop", n, t_a, ""), ("(b) compute_hashes(workers=1)", n, t_b, ""),
            (f"(c) compute_hashes(workers={cores})", n, t_c, "")]  # fmt: skip
    mapped_rows, mapped_serial, mapped_pooled, ratio = _mapped_rows(images, n, cores, args.repeats)
    rows += mapped_rows

    # (d): a cache holding every image except a random 1%, as after a previous run on older data.
    rng = np.random.default_rng(0)
    new = rng.choice(n, size=max(1, round(n * args.new_fraction)), replace=False)
    old = np.setdiff1d(np.arange(n), new)
    cache = pd.DataFrame(
        {"image_id": pd.Series(ids[old], dtype="string"), "phash": serial[0][old], "dhash": serial[1][old]}
    ).drop_duplicates("image_id")
    t_d, (cached_hashes, _, hashed) = best_of(args.repeats, lambda: hash_with_cache(images, ids, cache))
    expected_new = len(set(ids[new]) - set(ids[old]))
    rows.append((f"(d) hash_with_cache, warm, {len(new)} new", n, t_d, f"hashed {hashed}"))
    _print_rows(rows, t_a)

    bad_b, bad_c = mismatches(reference, serial), mismatches(reference, pooled)
    bad_d = mismatches(reference, (cached_hashes["phash"].to_numpy(), cached_hashes["dhash"].to_numpy()))
    bad_e = mismatches(reference, mapped_serial) + mismatches(reference, mapped_pooled)
    print(f"(b) equals (a) bit for bit: {bad_b == 0} ({bad_b} of {n} images differ)")
    print(f"(c) equals (a) bit for bit: {bad_c == 0} ({bad_c} of {n} images differ)")
    print(f"(d) equals (a) bit for bit: {bad_d == 0}; hashed {hashed} (expected {expected_new} new unique ids)")
    print(f"(e) equals (a) bit for bit: {bad_e == 0}; scaling 1 -> {cores} processes: {ratio:.2f}x (target 1.8x on 2)")
    return 0 if bad_b == bad_c == bad_d == bad_e == 0 and hashed == expected_new else 1


if __name__ == "__main__":  # required: compute_hashes starts "spawn" worker processes
    raise SystemExit(main())
