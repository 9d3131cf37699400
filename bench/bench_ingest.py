"""Benchmark ingest and colour statistics at 1 and at all cores, and ingest's memory per 100k images.

  (a) folder ingest of pbc96 (decode each JPEG, convert, id; 14,416 files, or ``--limit``, each
      linked ``--repeat`` times: 7 gives 100,912 files) streamed
      to an ``images.npy`` as ``raw_images`` does: images/s at 1 process and at all cores, the ratio,
      and a check that both give the same images and manifest;
  (b) colour statistics (``outliers.colour_stats``: two passes over the distinct images of the
      memory-mapped ``images.npy`` that (a) wrote): images/s at 1 process and at all cores, the
      ratio, and a check that both give the same table;
  (c) at scale: generated uncompressed ``.npz`` files (the challenge layout) of ``--sizes`` images
      (default 20,000 and 100,000; pbc96 images repeated, each made distinct by one corner pixel) ingested into a streamed ``images.npy``,
      then their colour statistics, each at 1 process and at all cores in a fresh child process:
      images/s and ratios, the peak resident memory above the child's baseline (``VmHWM``, reset
      through ``/proc/self/clear_refs``) and of its largest worker (sampled every 50 ms from
      ``/proc``: workers are forked by a fork server, not by the child), and how much the peak grows per
      100k images between the sizes. Memory that does not grow with the count is what lets a
      million images in.

Run: ``.venv/bin/python bench/bench_ingest.py [--limit N] [--sizes 20000 100000 1000000]`` (or
``make bench``). Needs about 3x the generated file's size free under the temporary folder
(``--tmp``): 100k images are 2.8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import table

# Only the light module at the top: "spawn" workers import this script again as their __main__
# (the pipeline's step processes run as ``python -m dagster``, whose __main__ workers skip), so
# heavy imports here would count in the workers' start-up and not in the pipeline's.
from bc_pipeline.core import chunks


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:
        return []


def _descendants_peak_kb(stop: threading.Event, peak: list[int]) -> None:
    """Largest ``VmHWM`` of any descendant (workers fork from a fork server, a child of ours)."""
    while not stop.wait(0.1):
        found, frontier = [], _children(os.getpid())
        while frontier:
            found += frontier
            frontier = [grandchild for child in frontier for grandchild in _children(child)]
        for pid in found:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]))


def ingest_child(path: str, workers: int) -> None:
    """(c) in this (child) process: ingest, then colour statistics; print seconds and peak memories as JSON."""
    import pandas as pd

    from bc_pipeline.ingest.loaders import load_source
    from bc_pipeline.quality import outliers

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    baseline = _status_kb("VmRSS")
    stop, worker_peak_kb = threading.Event(), [0]
    watcher = threading.Thread(target=_descendants_peak_kb, args=(stop, worker_peak_kb), daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as out:
        start = time.perf_counter()
        loaded = load_source("npz", path, out_dir=Path(out), workers=workers)
        ingest_seconds = time.perf_counter() - start
        manifest = loaded.manifest
        groups = pd.DataFrame({"index": np.arange(len(manifest)), "image_id": manifest["image_id"],
                               "exact_group": pd.factorize(manifest["image_id"])[0]})  # fmt: skip
        start = time.perf_counter()
        outliers.colour_stats(loaded.images, groups, workers=workers)
        colour_seconds = time.perf_counter() - start
        del loaded
    stop.set()
    watcher.join()
    print(json.dumps({"images": len(manifest), "ingest": ingest_seconds, "colour": colour_seconds,
                      "peak_mb": (_status_kb("VmHWM") - baseline) / 1024, "worker_peak_mb": worker_peak_kb[0] / 1024}))  # fmt: skip


def folder_ingest(root: Path, tmp: Path, limit: int | None, repeat: int, workers: int) -> tuple[list[list[str]], object, bool]:
    """(a): table rows, the result of the run at all cores, and whether both runs agree."""
    from bc_pipeline.ingest.loaders import load_source

    if limit or repeat > 1:  # every k-th file, or each file ``repeat`` times, as links in a folder of the same layout
        source = tmp / "subset"
        files = sorted(root.rglob("*.jpg"))
        files = files[:: max(1, len(files) // limit)][:limit] if limit else files
        for file in files:
            (source / file.parent.name).mkdir(parents=True, exist_ok=True)
            for copy in range(repeat):
                (source / file.parent.name / f"{copy}-{file.name}").symlink_to(file)
        root = source
    for file in root.rglob("*.jpg"):  # read once untimed: both runs then find the files in the page cache
        file.read_bytes()
    rows, results = [], {}
    for count in (1, workers):
        out = tmp / f"ingest-{count}"
        out.mkdir(exist_ok=True)
        start = time.perf_counter()
        results[count] = load_source("folder", root, out_dir=out, workers=count)
        seconds = time.perf_counter() - start
        rows.append([f"(a) folder ingest, {count} process(es)", f"{len(results[count].manifest)}", f"{seconds:.1f}",
                     f"{len(results[count].manifest) / seconds:,.0f}"])  # fmt: skip
    one, many = results[1], results[workers]
    same = np.array_equal(one.images, many.images) and one.manifest.equals(many.manifest)
    ratio = float(rows[0][2]) / float(rows[1][2])
    rows[1].append(f"{ratio:.2f}x; identical: {'yes' if same else 'NO'}")
    rows[0].append("")
    return rows, many, same


def colour_scaling(loaded, workers: int) -> tuple[list[list[str]], bool]:
    import pandas as pd

    from bc_pipeline.quality import outliers

    manifest = loaded.manifest
    groups = pd.DataFrame({"index": np.arange(len(manifest)), "image_id": manifest["image_id"],
                           "exact_group": pd.factorize(manifest["image_id"])[0]})  # fmt: skip
    rows, tables = [], {}
    for count in (1, workers):
        start = time.perf_counter()
        tables[count] = outliers.colour_stats(loaded.images, groups, workers=count)
        seconds = time.perf_counter() - start
        rows.append([f"(b) colour statistics, {count} process(es)", f"{len(manifest)}", f"{seconds:.1f}",
                     f"{len(manifest) / seconds:,.0f}", ""])  # fmt: skip
    same = tables[1].equals(tables[workers])
    rows[1][4] = f"{float(rows[0][2]) / float(rows[1][2]):.2f}x; identical: {'yes' if same else 'NO'}"
    return rows, same


def at_scale(images: np.ndarray, sizes: list[int], tmp: Path, workers: int) -> list[list[str]]:
    """(c): per size, a generated uncompressed .npz ingested, then its colour statistics, at 1 and ``workers``."""
    rows, peaks = [], []
    for size in sizes:
        source = tmp / f"gen-{size}.npy"
        writer = chunks.NpyWriter(source, images.shape[1:], np.uint8, size)
        for start in range(0, size, 4096):
            numbers = np.arange(start, min(size, start + 4096))
            batch = images[numbers % len(images)]
            batch[:, 0, 0, :] = (numbers[:, None] >> np.array([0, 8, 16])) & 255  # one corner pixel: every image distinct
            writer.append(batch)
        generated = writer.finish()
        npz = tmp / f"gen-{size}.npz"
        np.savez(npz, images=generated, labels=np.arange(size) % 8)
        del generated
        source.unlink()
        runs = {}
        for count in (1, workers):
            command = [sys.executable, __file__, "--ingest-child", str(npz), "--workers", str(count)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[count] = json.loads(output.strip().splitlines()[-1])
        npz.unlink()
        one, many = runs[1], runs[workers]
        peaks.append((size, many["peak_mb"]))
        rows.append([f"{size:,}", f"{size / one['ingest']:,.0f} / {size / many['ingest']:,.0f}", f"{one['ingest'] / many['ingest']:.2f}x",
                     f"{size / one['colour']:,.0f} / {size / many['colour']:,.0f}", f"{one['colour'] / many['colour']:.2f}x",
                     f"{many['peak_mb']:.0f}", f"{many['worker_peak_mb']:.0f}"])  # fmt: skip
    if len(peaks) > 1:
        (n0, m0), (n1, m1) = peaks[0], peaks[-1]
        print(f"peak memory here grows by {(m1 - m0) / (n1 - n0) * 1e5:.0f} MB per 100k images ({n0:,} -> {n1:,}): the manifest")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="ingest only N pbc96 files in (a)")
    parser.add_argument("--repeat", type=int, default=1, help="in (a), link each file this many times (7: 100,912 files)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 100_000], help="image counts for (c)")
    parser.add_argument("--workers", type=int, default=chunks.default_workers())
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--ingest-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest_child:
        ingest_child(args.ingest_child, args.workers)
        return 0
    from bc_pipeline.defs.resources import shared_datasets_dir

    root = Path(shared_datasets_dir()) / "pbc96"
    if not root.is_dir():
        print(f"error: {root} not found (set BC_SHARED_DATASETS)", file=sys.stderr)
        return 1
    print(f"{args.workers} cores; pbc96 at {root}")
    with tempfile.TemporaryDirectory(dir=args.tmp) as folder:
        tmp = Path(folder)
        ingest, loaded, same_ingest = folder_ingest(root, tmp, args.limit, args.repeat, args.workers)
        colour, same_colour = colour_scaling(loaded, args.workers)
        table(["measure", "images", "seconds", "images/s", "note"], [*ingest, *colour])
        print()
        scale = at_scale(np.asarray(loaded.images[:4096]), args.sizes, tmp, args.workers)
    table([f"(c) .npz images", f"ingest img/s 1 / {args.workers}", "ratio", f"colour img/s 1 / {args.workers}", "ratio",
           "peak MB here", "worker MB"], scale)  # fmt: skip
    return 0 if same_ingest and same_colour else 1


if __name__ == "__main__":
    sys.exit(main())
