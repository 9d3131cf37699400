"""Duplicate search on all of pbc96: groups found, label conflicts, and the time it takes.

Prints, for several Hamming thresholds, the number of exact-duplicate groups, near-duplicate
groups (groups of more than one distinct image), label conflicts and the all-pairs search time,
then lists the exact groups and the near groups at the default threshold with their files.

Run: ``.venv/bin/python bench/bench_dedup.py`` (or ``make bench``).

``--scale N [N ...]``: the near-duplicate search alone on N synthetic hash pairs (random 64-bit
hashes, a tenth of them near copies of others with 0-8 bits flipped), with its seconds, peak
memory (numpy allocations, tracemalloc) and whether it is identical to the brute-force all-pairs
comparison, which runs up to ``--brute-max`` images (default 100,000).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from bc_pipeline.defs.assets.dedup import DuplicateConfig
from bc_pipeline.defs.resources import shared_datasets_dir
from bc_pipeline.ingest.loaders import load_folder
from bc_pipeline.quality.dedup import duplicate_counts, find_duplicates, summarize_groups
from bc_pipeline.quality.hashing import compute_hashes


def synthetic_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random phash/dhash pairs; a tenth are near copies of another image (0-8 bits flipped in each hash)."""
    rng = np.random.default_rng(seed)
    phash, dhash = rng.integers(0, 2**64, n, dtype=np.uint64), rng.integers(0, 2**64, n, dtype=np.uint64)
    source, target = rng.integers(0, n, n // 10), rng.integers(0, n, n // 10)
    for hashes in (phash, dhash):
        flips = np.zeros(len(target), np.uint64)
        for _ in range(8):  # up to 8 distinct-or-repeated bit flips (a repeat cancels: 0-8 bits)
            bit = rng.integers(0, 64, len(target)).astype(np.uint64)
            flips ^= np.where(rng.random(len(target)) < 0.5, np.uint64(1) << bit, np.uint64(0))
        hashes[target] = hashes[source] ^ flips
    return phash, dhash


def scale(sizes: list[int], threshold: int, brute_max: int) -> None:
    from bc_pipeline.quality.dedup import all_pairs, near_duplicate_pairs

    print(f"near-duplicate search at threshold {threshold}, synthetic hashes\n")
    print(f"{'images':>10}  {'pairs':>8}  {'seconds':>8}  {'peak MB':>8}  {'brute s':>8}  identical to brute force")
    for n in sizes:
        phash, dhash = synthetic_hashes(n)
        tracemalloc.start()
        start = time.perf_counter()
        left, right = near_duplicate_pairs(phash, dhash, threshold)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
        if n <= brute_max:
            start = time.perf_counter()
            expected = all_pairs(phash, dhash, threshold)
            brute = f"{time.perf_counter() - start:8.1f}"
            same = "yes" if np.array_equal(left, expected[0]) and np.array_equal(right, expected[1]) else "NO"
        else:
            brute, same = f"{'-':>8}", f"not run (over {brute_max:,})"
        print(f"{n:>10,}  {len(left):>8,}  {seconds:>8.2f}  {peak:>8.0f}  {brute}  {same}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, nargs="+", help="synthetic sizes, e.g. 10000 100000 1000000")
    parser.add_argument("--threshold", type=int, default=DuplicateConfig().threshold)
    parser.add_argument("--brute-max", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.scale:
        return scale(args.scale, args.threshold, args.brute_max)
    root = shared_datasets_dir() / "pbc96"
    start = time.perf_counter()
    loaded = load_folder(root)
    manifest = loaded.manifest
    print(f"pbc96: {len(manifest)} images loaded in {time.perf_counter() - start:.1f} s from {root}")
    start = time.perf_counter()
    phash, dhash = compute_hashes(loaded.images)
    print(f"hashed in {time.perf_counter() - start:.1f} s\n")

    default = DuplicateConfig().threshold
    print(f"{'threshold':>9}  {'exact groups':>12}  {'dup images':>10}  {'near groups':>11}  "
          f"{'label conflicts':>15}  {'mixed-label near':>16}  {'search s':>8}")  # fmt: skip
    for threshold in (0, 2, default, 6, 8, 10):
        start = time.perf_counter()
        table = find_duplicates(manifest["image_id"], manifest["label"], phash, dhash, threshold=threshold)
        seconds = time.perf_counter() - start
        c = duplicate_counts(table)
        print(f"{threshold:>9}  {c['exact_groups']:>12}  {c['exact_duplicate_images']:>10}  {c['near_groups']:>11}  "
              f"{c['label_conflict_groups']:>15}  {c['near_groups_with_mixed_labels']:>16}  {seconds:>8.2f}")  # fmt: skip

    table = find_duplicates(manifest["image_id"], manifest["label"], phash, dhash, threshold=default)
    for kind in ("exact", "near"):
        groups = summarize_groups(table, kind)
        print(f"\n{kind} groups at threshold {default}: {len(groups)}")
        for row in groups.itertuples():
            files = ", ".join(manifest["source"].iloc[row.members])
            print(f"  size {row.size} labels {row.labels}{' CONFLICT' if row.conflict else ''}: {files}")


if __name__ == "__main__":
    main()
