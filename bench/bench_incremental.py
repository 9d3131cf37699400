"""Benchmark what adding 1% new images costs the first stages, against processing everything again.

On all of pbc96 (14,416 images), with ``--new-fraction`` (default 1%) of them held back as "new":

- what ``raw_data_sensor`` does every 30 s when nothing changed (a digest of file stamps), and an
  observation of the source folder (the content digest it computes when the stamps moved);
- ``image_hashes``: a full rehash (empty cache) against a warm cache that lacks only the new images;
- ``duplicate_groups``: the all-pairs search against a search that compares only the new images
  with all others, reusing the cached pairs of the rest;
- a no-op evaluation of every automation condition of the project (nothing changed since the
  previous tick), on an instance holding one materialization of every asset.

Run: ``.venv/bin/python bench/bench_incremental.py [--repeats 3] [--new-fraction 0.01]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
from _common import best_of, load_pbc96, table

from bc_pipeline.ingest.source_version import snapshot, stamp_digest
from bc_pipeline.quality.dedup import find_duplicates_cached
from bc_pipeline.quality.hashing import hash_with_cache


def noop_evaluation_seconds(repeats: int) -> float:
    """Best wall time of an automation tick that finds nothing to do, over the project's definitions."""
    import dagster as dg

    from bc_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    with tempfile.TemporaryDirectory() as home, dg.instance_for_test(temp_dir=home) as instance:
        for key in graph.materializable_asset_keys:
            partitions = graph.get(key).partitions_def
            for partition in partitions.get_partition_keys() if partitions else [None]:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(key, partition=partition, tags={"dagster/data_version": "v1"})
                )
        cursor = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=dg.AssetSelection.all()).cursor
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = dg.evaluate_automation_conditions(
                defs=defs, instance=instance, asset_selection=dg.AssetSelection.all(), cursor=cursor
            )
            best = min(best, time.perf_counter() - start)
            assert result.total_requested == 0, "a no-op tick requested work"
            cursor = result.cursor
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is reported)")
    parser.add_argument("--new-fraction", type=float, default=0.01, help="share of images that are new")
    args = parser.parse_args()

    loaded = load_pbc96()
    if loaded is None:
        raise SystemExit(1)
    images, seconds_loading, root = loaded[0].images, loaded[1], loaded[2]
    manifest = loaded[0].manifest
    ids, labels = manifest["image_id"], manifest["label"].to_numpy()
    n = len(images)
    rng = np.random.default_rng(0)
    new = np.zeros(n, dtype=bool)
    new[rng.choice(n, size=max(1, round(n * args.new_fraction)), replace=False)] = True
    print(f"pbc96: {n} images ({new.sum()} new = {new.mean():.1%}), loaded in {seconds_loading:.1f}s "
          "(raw_images decodes every file, not incremental); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")  # fmt: skip

    stamps = best_of(args.repeats, lambda: stamp_digest(root))
    observe = best_of(args.repeats, lambda: snapshot(root))
    full_hash = best_of(args.repeats, lambda: hash_with_cache(images, ids, None))
    _, cache_without_new, _ = hash_with_cache(images[~new], ids[~new], None)
    incremental_hash = best_of(args.repeats, lambda: hash_with_cache(images, ids, cache_without_new))
    assert incremental_hash[2][2] == len(set(ids[new]) - set(ids[~new])), "only the new images are hashed"
    assert incremental_hash[2][0].equals(full_hash[2][0]), "incremental hashes equal a full rehash"
    hashes = full_hash[2][0]
    phash, dhash = hashes["phash"].to_numpy(np.uint64), hashes["dhash"].to_numpy(np.uint64)
    full_search = best_of(args.repeats, lambda: find_duplicates_cached(ids, labels, phash, dhash, known=None))
    _, pairs_without_new, _ = find_duplicates_cached(ids[~new], labels[~new], phash[~new], dhash[~new], known=None)
    incremental_search = best_of(args.repeats, lambda: find_duplicates_cached(ids, labels, phash, dhash, known=pairs_without_new))
    assert incremental_search[2][0].equals(full_search[2][0]), "incremental groups equal a full search"
    noop = noop_evaluation_seconds(args.repeats)

    rows = [
        ["sensor tick, no change (stamp digest)", "", f"{stamps[0]:.2f}", f"{n} files"],
        ["observe source (content digest)", f"{observe[0]:.2f}", f"{observe[0]:.2f}", f"{snapshot(root).bytes / 1e6:.0f} MB"],
        ["image_hashes", f"{full_hash[0]:.2f}", f"{incremental_hash[0]:.2f}", f"{full_hash[0] / incremental_hash[0]:.0f}x faster"],
        ["duplicate_groups (search)", f"{full_search[0]:.2f}", f"{incremental_search[0]:.2f}", f"{full_search[0] / incremental_search[0]:.0f}x faster"],
        ["no-op automation tick (16 assets)", "", f"{noop:.2f}", "nothing requested"],
    ]
    table(["step", "everything s", f"{args.new_fraction:.0%} new s", "note"], rows)
    print(f"\nWith the caches, adding {args.new_fraction:.0%} new images costs these two stages "
          f"{incremental_hash[0] + incremental_search[0]:.2f}s instead of {full_hash[0] + full_search[0]:.2f}s.")  # fmt: skip


if __name__ == "__main__":
    main()
