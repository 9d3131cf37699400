"""Benchmark SMOTE on all of pbc96: the library's per-class SMOTE against a naive one-shot SMOTE.

Variants, each run in its own fresh subprocess on the same uint8 images (N, 96, 96, 3):
  (a) ``balance(strategy="smote")``: the library's ``smote()``, one class at a time on float32
      pixels (only one class's floats are held at a time), results rounded back to uint8;
  (b) naive: imbalanced-learn's ``SMOTE().fit_resample`` once on the whole flattened float32 matrix
      (N x 27,648), then rounded back to uint8 and appended to the images, the same output as (a);
  (c) naive on float64 (what ``astype(float)`` gives), to show why not (skip with ``--no-float64``).
All three raise every class to the majority count with k = 5 neighbours. For each: wall time, the
peak resident memory above the child's baseline (``ru_maxrss`` after importing everything and
loading the uint8 images), and the tracemalloc peak (numpy's own allocations; ``--no-tracemalloc``
to leave it off). Every variant is run ``--repeats`` times; the best time and the largest peaks
are reported.

Run: ``.venv/bin/python bench/bench_smote.py [--per-class-only] [--repeats R]`` (or ``make bench``).
The images come from ``$BC_SHARED_DATASETS/pbc96`` (default ``../shared/datasets/pbc96``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import table

from bc_pipeline.defs.resources import shared_datasets_dir
from bc_pipeline.preparation.balancing import target_counts

NUM_CLASSES = 8
NEIGHBORS = 5
GIB = 1024**3
VARIANTS = {
    "per-class": "(a) library: balance(strategy='smote'), per class, float32",
    "naive-float32": "(b) naive: one SMOTE().fit_resample on all, float32",
    "naive-float64": "(c) naive: one SMOTE().fit_resample on all, float64",
}


# --- child: one variant in a fresh process ------------------------------------------------------


def proc_status_bytes(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc/self/status, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> int:
    """Reset the peak-RSS mark to the current RSS where Linux allows it; the peak to measure from.

    ``ru_maxrss`` cannot be used as is: Linux carries the parent's peak over fork + exec, so a child
    of a process holding pbc96 starts with the parent's ~1 GB as its "peak". ``VmHWM`` belongs to
    the child's own address space, and writing 5 to ``/proc/self/clear_refs`` resets it.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    peak = proc_status_bytes("VmHWM")
    if peak is None:  # not Linux: fall back to ru_maxrss (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


def peak_bytes() -> int:
    peak = proc_status_bytes("VmHWM")
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak


def run_per_class(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from bc_pipeline.preparation.balancing import balance

    result = balance(images, labels, num_classes=NUM_CLASSES, strategy="smote", smote_neighbors=NEIGHBORS,
                     seed=0, log=lambda _: None)  # fmt: skip
    return result.labels


def run_naive(images: np.ndarray, labels: np.ndarray, dtype: type) -> np.ndarray:
    from imblearn.over_sampling import SMOTE

    x = images.reshape(len(images), -1).astype(dtype)
    resampled, resampled_labels = SMOTE(k_neighbors=NEIGHBORS, random_state=0).fit_resample(x, labels)
    del x
    synthetic = np.clip(np.rint(resampled[len(images) :]), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
    del resampled
    out = np.concatenate([images, synthetic])
    assert len(out) == len(resampled_labels)
    return np.asarray(resampled_labels)


def child(variant: str, data: Path, trace: bool) -> int:
    import tracemalloc

    import imblearn  # noqa: F401  (imported before the baseline, as its memory is not SMOTE's)
    import sklearn.neighbors  # noqa: F401

    import bc_pipeline.preparation.balancing  # noqa: F401

    images = np.load(data / "images.npy")
    labels = np.load(data / "labels.npy")
    baseline = reset_peak()
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    result: dict = {"variant": variant, "baseline_bytes": baseline}
    try:
        if variant == "per-class":
            out_labels = run_per_class(images, labels)
        else:
            out_labels = run_naive(images, labels, np.float32 if variant == "naive-float32" else np.float64)
        result["seconds"] = time.perf_counter() - start
        result["counts"] = np.bincount(out_labels, minlength=NUM_CLASSES).tolist()
    except MemoryError as error:
        result["error"] = f"MemoryError after {time.perf_counter() - start:.1f} s ({error})"
    result["peak_bytes"] = peak_bytes() - baseline
    if trace:
        result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps(result))
    return 0


# --- parent: load once, run each variant in a subprocess, print the table -----------------------


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_child(variant: str, data: Path, trace: bool, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--data", str(data)]
    if not trace:
        command.append("--no-tracemalloc")
    wall = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s (--child-timeout)"}
    wall = time.perf_counter() - wall
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:
            why = f"killed by {signal.Signals(-proc.returncode).name}"
            if proc.returncode == -signal.SIGKILL:
                why += " (most likely the kernel's out-of-memory killer)"
        else:
            why = f"exit status {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}"
        return {"variant": variant, "error": why, "process_seconds": wall}
    result = json.loads(lines[-1])
    result["process_seconds"] = wall
    return result


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class-only", action="store_true", help="run only the library's per-class SMOTE")
    parser.add_argument("--no-float64", action="store_true", help="skip the naive float64 variant")
    parser.add_argument("--repeats", type=int, default=1, help="subprocess runs per variant (best time is reported)")
    parser.add_argument("--limit", type=int, default=None, help="use a random N images instead of all")
    parser.add_argument("--no-tracemalloc", action="store_true", help="do not trace numpy allocations")
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds before a variant is given up")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _announce(loaded_count: int, load_s: float, root: Path, labels: np.ndarray, features: int, repeats: int) -> None:
    import imblearn
    import sklearn

    n, goal, before = len(labels), target_counts(labels, NUM_CLASSES), np.bincount(labels, minlength=NUM_CLASSES)
    print(f"pbc96: {loaded_count} images loaded in {load_s:.1f} s from {root}; SMOTE on {n}")
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, imbalanced-learn {imblearn.__version__}, "
        f"scikit-learn {sklearn.__version__}, {os.cpu_count()} cores, "
        f"{gib(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))} GiB RAM "
        f"({gib(mem_available_bytes())} GiB available), best of {repeats}"
    )
    print(f"class counts {before.tolist()} -> {goal.tolist()} ({int(goal.sum() - n)} synthetic), k={NEIGHBORS}")
    for name, itemsize in (("uint8", 1), ("float32", 4), ("float64", 8)):
        print(
            f"  {n} x {features} {name}: {gib(n * features * itemsize)} GiB; "
            f"after balancing ({int(goal.sum())} rows): {gib(goal.sum() * features * itemsize)} GiB"
        )
    print()


def _runs_of(variant: str, data: Path, labels: np.ndarray, features: int, args: argparse.Namespace) -> dict:
    """The best of ``args.repeats`` child runs of ``variant`` (peaks over all of them), or the failed run."""
    n, goal, before = len(labels), target_counts(labels, NUM_CLASSES), np.bincount(labels, minlength=NUM_CLASSES)
    runs = []
    for _ in range(args.repeats):
        if variant.startswith("naive"):
            # Input copy + the stacked resampled matrix + one class's float64 temporaries.
            itemsize = 8 if variant.endswith("64") else 4
            need = (n + goal.sum()) * features * itemsize + (goal - before).max() * features * 16
            available = mem_available_bytes()
            if available is not None and need > available:
                runs.append({"variant": variant, "error": f"not run: needs ~{gib(need)} GiB, {gib(available)} GiB available"})
                break
        run = run_child(variant, data, not args.no_tracemalloc, args.child_timeout)
        runs.append(run)
        done = f"{run['seconds']:.1f} s" if "seconds" in run else run.get("error")
        print(f"  {variant}: {done}", file=sys.stderr, flush=True)
        if "error" in run:
            break
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    best = min(good, key=lambda r: r["seconds"])
    best["peak_bytes"] = max(r["peak_bytes"] for r in good)
    if all("traced_peak_bytes" in r for r in good):
        best["traced_peak_bytes"] = max(r["traced_peak_bytes"] for r in good)
    return best


def _report(results: dict, variants: list[str], goal: np.ndarray) -> list[str]:
    """The results table, printed; the problems found."""
    rows, problems = [], []
    base = results.get("per-class")
    for variant in variants:
        r = results[variant]
        if "error" in r:
            rows.append([VARIANTS[variant], "-", "-", "-", "-", "-", "failed"])
            problems.append(f"{variant}: {r['error']}")
            continue
        ok = r["counts"] == goal.tolist()
        if not ok:
            problems.append(f"{variant}: class counts {r['counts']}, expected {goal.tolist()}")
        vs = "-" if base is None or "error" in base else f"{r['seconds'] / base['seconds']:.2f}x"
        rows.append([
            VARIANTS[variant], f"{r['seconds']:.1f}", vs, gib(r["peak_bytes"]),
            gib(r.get("traced_peak_bytes")), gib(r["baseline_bytes"]), "ok" if ok else "WRONG",
        ])  # fmt: skip
    table(["variant", "time s", "vs (a)", "peak RSS GiB", "tracemalloc GiB", "baseline GiB", "counts"], rows)
    print()
    print("peak RSS: the child's peak resident memory (VmHWM, reset once the uint8 images are loaded) minus")
    print("its resident memory at that point (baseline: interpreter, imports, uint8 images); ru_maxrss is not")
    print("used as Linux carries the parent's peak into the child. tracemalloc: peak of the allocations")
    print("Python and numpy report (not BLAS's or scikit-learn's native buffers).")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.child:
        return child(args.child, args.data, not args.no_tracemalloc)
    root = shared_datasets_dir() / "pbc96"
    if not root.is_dir():
        print(f"error: {root} not found (set BC_SHARED_DATASETS)", file=sys.stderr)
        return 1
    from bc_pipeline.ingest.loaders import load_folder

    start = time.perf_counter()
    loaded = load_folder(root)
    load_s = time.perf_counter() - start
    images, labels = loaded.images, loaded.manifest["label"].to_numpy().astype(np.int64)
    if args.limit is not None and args.limit < len(images):
        pick = np.sort(np.random.default_rng(0).choice(len(images), size=args.limit, replace=False))
        images, labels = images[pick], labels[pick]
    features = int(np.prod(images.shape[1:]))
    _announce(len(loaded.images), load_s, root, labels, features, args.repeats)
    variants = ["per-class"] if args.per_class_only else [v for v in VARIANTS if not (args.no_float64 and v == "naive-float64")]
    with tempfile.TemporaryDirectory(prefix="bench_smote_") as tmp:
        np.save(Path(tmp) / "images.npy", images)
        np.save(Path(tmp) / "labels.npy", labels)
        results = {variant: _runs_of(variant, Path(tmp), labels, features, args) for variant in variants}
    problems = _report(results, variants, target_counts(labels, NUM_CLASSES))
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
