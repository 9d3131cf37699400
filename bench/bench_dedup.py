"""Duplicate search on all of pbc96: groups found, label conflicts, and the time it takes.

Prints, for several Hamming thresholds, the number of exact-duplicate groups, near-duplicate
groups (groups of more than one distinct image), label conflicts and the all-pairs search time,
then lists the exact groups and the near groups at the default threshold with their files.

Run: ``.venv/bin/python bench/bench_dedup.py`` (or ``make bench``).
"""

from __future__ import annotations

import time

from bc_pipeline.defs.assets.dedup import DuplicateConfig
from bc_pipeline.lib.dedup import duplicate_counts, find_duplicates, summarize_groups
from bc_pipeline.lib.hashing import compute_hashes
from bc_pipeline.lib.loaders import load_folder
from bc_pipeline.defs.resources import shared_datasets_dir


def main() -> None:
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
