"""The outlier / corruption stage on files it was not developed on, and on clean data.

Default run (``make bench``):

- ``an2dl_style/training_set.npz`` (its README: clean cells first, injected images after row
  2400): precision and recall of the flagged images, the templates' members and weights;
- clean pbc96 and, when ``data/raw/bloodmnist.npz`` is there, BloodMNIST: images flagged (should
  be none) and the stage's time;
- the stage's time on all of pbc96 plus six templates of 40 bases (about 17,000 images, the
  most templates and bases of the issue's ranges): target 30 s on 2 cores.

``--sweep``: one generated file per cell of cell shares (fixed 0.3/0.5/0.6/0.7/0.8, any share per
image in 0.2-0.85, a mixture of three values; the last two blend each base 1-8 times) x templates
1/2/4 x bases 3/9/30 x template kind (photo, stain-coloured, dark, greyscale), ``--clean`` pbc96
cells each (default 3000), every other template with copies of its picture; precision, recall,
templates reported / true, the worst template PSNR against the truth, the largest share error,
seconds. Targets: precision and recall >= 0.995, as many templates as planted, PSNR >= 30 dB and
shares within 0.02 in every cell.

``--lossy``: the same kinds of file after storage that is not lossless (every image saved as JPEG
at quality 95/92/85/80, or resized bicubic to 88 or 104 px): per storage and template kind (two
templates of the kind, or ``mixed``: one of each kind), any share per image in 0.2-0.85, 15 bases
blended 1-8 times; and ``--clean`` pbc96 cells alone stored the same way. Prints the noise level
the stage assumed. Targets (issue 30; quality 80 is shown, not targeted): precision >= 0.99,
recall >= 0.95, every template >= 25 dB, clean files 0 flagged.

``--missing``: what is found when a share of each template's bases is not in the file.

Run: ``.venv/bin/python bench/bench_anomalies.py [--sweep] [--missing] [--clean N]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import load_pbc96, table

from bc_pipeline.defs.resources import default_data_dir as data_dir
from bc_pipeline.defs.resources import shared_datasets_dir
from bc_pipeline.ingest.loaders import image_id, load_bloodmnist, load_npz
from bc_pipeline.quality import outliers
from bc_pipeline.quality.dedup import find_duplicates
from bc_pipeline.quality.hashing import compute_hashes
from bc_pipeline_tests import challenge_files as cf

# A fixed share per template, any share per image in 0.2-0.85, or a mixture of three values in it;
# the last two blend each base 1-8 times, each blend with its own share.
WEIGHTS = ("0.3", "0.5", "0.6", "0.7", "0.8", "0.2-0.85", "mixture")
TEMPLATE_COUNTS = (1, 2, 4)
BASES = (3, 9, 30)
KINDS = ("photo", "stain", "dark", "grey")


def run_stage(images: np.ndarray, labels: np.ndarray) -> tuple[outliers.AnomalyResult, float]:
    """The stage as the assets run it (hashes and duplicates first, untimed); (result, seconds)."""
    ids = [image_id(x) for x in images]
    phash, dhash = compute_hashes(images)
    duplicates = find_duplicates(pd.Series(ids), labels, phash, dhash)
    start = time.perf_counter()
    result = outliers.detect(images, duplicates)
    return result, time.perf_counter() - start


def score(planted: cf.PlantedFile) -> tuple[cf.DetectionScore, float]:
    detection, seconds, _ = score_with_noise(planted)
    return detection, seconds


def score_with_noise(planted: cf.PlantedFile) -> tuple[cf.DetectionScore, float, str]:
    """(score, seconds, the storage noise the stage assumed and why)."""
    result, seconds = run_stage(planted.images, planted.labels)
    detection = cf.score_detection(planted, result.flagged(), result.report, result.templates)
    return detection, seconds, result.corruption.noise.why


def challenge_file() -> None:
    path = shared_datasets_dir() / "an2dl_style" / "training_set.npz"
    if not path.is_file():
        print(f"{path} not found: skipped")
        return
    loaded = load_npz(path)
    result, seconds = run_stage(loaded.images, loaded.manifest["label"].to_numpy())
    position = loaded.manifest["source"].str.extract(r"\[(\d+)\]")[0].astype(int).to_numpy()
    injected = set(np.flatnonzero(position >= 2400).tolist())
    flagged = set(result.flagged().tolist())
    hits = len(flagged & injected)
    print(f"an2dl_style: {len(position)} images, {len(injected)} injected (position >= 2400); stage {seconds:.1f} s")
    print(f"  flagged {len(flagged)}: precision {hits / max(len(flagged), 1):.4f}  recall {hits / max(len(injected), 1):.4f}")
    print(result.corruption.template_summary.round(4).to_string(index=False))


def clean_sets(cells: np.ndarray, cell_labels: np.ndarray) -> None:
    sets = [("pbc96", lambda: (cells, cell_labels))]
    bloodmnist = data_dir() / "raw" / "bloodmnist.npz"
    if bloodmnist.is_file():
        sets.append(("bloodmnist", lambda: _arrays(load_bloodmnist(Path(bloodmnist)))))
    for name, load in sets:
        images, labels = load()
        result, seconds = run_stage(images, labels)
        print(f"{name}: {len(images)} clean images: {len(result.report)} flagged corrupted, "
              f"{len(result.outliers)} outliers, {len(result.templates)} templates; stage {seconds:.1f} s")  # fmt: skip


def _arrays(loaded) -> tuple[np.ndarray, np.ndarray]:
    return loaded.images, loaded.manifest["label"].to_numpy()


def timing(cells: np.ndarray, cell_labels: np.ndarray) -> None:
    kinds, weights = ("photo", "stain", "dark", "grey", "texture", "drawing"), (0.3, 0.5, 0.6, 0.7, 0.8, 0.85)
    spec = cf.FileSpec(
        templates=tuple(cf.TemplateSpec(kind=k, weight=w, bases=40, repeats=(1, 20), copies=10)
                        for k, w in zip(kinds, weights)),  # fmt: skip
        clean=len(cells),
        seed=1,
    )
    planted = cf.build_file(cells, cell_labels, spec)
    result, seconds = score(planted)
    print(f"all of pbc96 + 6 templates x 40 bases: {len(planted.images)} images ({len(np.unique([image_id(x) for x in planted.images]))} "
          f"distinct): stage {seconds:.1f} s (target 30 s); precision {result.precision:.4f} recall {result.recall:.4f}, "
          f"worst template {min(result.template_psnr):.1f} dB")  # fmt: skip


def sweep(cells: np.ndarray, cell_labels: np.ndarray, clean: int, shares: list[str]) -> None:
    rows, short = [], []
    cells_list = list(itertools.product(KINDS, TEMPLATE_COUNTS, BASES, WEIGHTS))
    for number, (kind, count, bases, weight) in enumerate(cells_list):
        if weight not in shares:
            continue  # a cell's file depends on its number only, so a subset gives the same files
        rng = np.random.default_rng(number)
        spec = cf.FileSpec(
            templates=tuple(_template_spec(kind, weight, bases, 5 * (t % 2 == 0), rng) for t in range(count)),
            clean=clean,
            seed=number,
        )
        result, seconds = score(cf.build_file(cells, cell_labels, spec))
        psnr = min(result.template_psnr)
        row = [kind, str(count), str(bases), weight, f"{result.precision:.4f}", f"{result.recall:.4f}",
               f"{result.templates_found}/{count}", f"{psnr:.1f}", f"{result.weight_error:.4f}", f"{seconds:.1f}"]  # fmt: skip
        rows.append(row)
        if (result.precision < 0.995 or result.recall < 0.995 or psnr < 30 or result.templates_found != count
                or result.weight_error > 0.02):  # fmt: skip
            short.append(row)
        print(" ".join(row), file=sys.stderr, flush=True)
    header = ["kind", "templates", "bases", "share", "precision", "recall", "templates found", "min PSNR dB",
              "max |share err|", "s"]  # fmt: skip
    table(header, rows)
    print(f"\n{len(rows) - len(short)} of {len(rows)} cells meet every target; short of a target:")
    table(header, short) if short else print("  none")


def _template_spec(kind: str, weight: str, bases: int, copies: int, rng: np.random.Generator) -> cf.TemplateSpec:
    low, high = cf.SHARE_RANGE
    if weight == "0.2-0.85":
        return cf.TemplateSpec(kind=kind, weight=(low + high) / 2, jitter=(high - low) / 2, bases=bases,
                               blends_per_base=(1, 8), copies=copies)  # fmt: skip
    if weight == "mixture":
        shares = tuple(float(v) for v in rng.uniform(low, high, 3))
        return cf.TemplateSpec(kind=kind, shares=shares, bases=bases, blends_per_base=(1, 8), copies=copies)
    return cf.TemplateSpec(kind=kind, weight=float(weight), bases=bases, copies=copies)


def lossy(cells: np.ndarray, cell_labels: np.ndarray, clean: int) -> None:
    rows, short, notes = [], [], {}
    kinds = (*KINDS, "mixed", "clean")
    for number, (storage, kind) in enumerate(itertools.product(cf.STORAGES[1:], kinds)):
        rng = np.random.default_rng(10_000 + number)
        members = KINDS if kind == "mixed" else () if kind == "clean" else (kind, kind)
        templates = tuple(_template_spec(k, "0.2-0.85", 15, 3 * (t % 2 == 0), rng) for t, k in enumerate(members))
        spec = cf.FileSpec(templates=templates, clean=clean, seed=10_000 + number)
        result, seconds, why = score_with_noise(cf.store(cf.build_file(cells, cell_labels, spec), storage))
        notes.setdefault(storage, why)
        psnr = min(result.template_psnr, default=float("inf"))
        row = [storage, kind, f"{result.precision:.4f}", f"{result.recall:.4f}", str(result.clean_flagged),
               f"{result.templates_found}/{len(members)}", f"{psnr:.1f}", f"{seconds:.1f}"]  # fmt: skip
        rows.append(row)
        if storage != "jpeg80" and (result.precision < 0.99 or result.recall < 0.95 or psnr < 25
                                    or result.clean_flagged or result.templates_found != len(members)):  # fmt: skip
            short.append(row)
        print(" ".join(row), file=sys.stderr, flush=True)
    header = ["storage", "kind", "precision", "recall", "clean flagged", "templates found", "min PSNR dB", "s"]
    table(header, rows)
    print("\nnoise assumed (first file of each storage):")
    for storage, why in notes.items():
        print(f"  {storage}: {why}")
    print(f"\n{len(rows) - len(short)} of {len(rows)} cells meet every target; short of a target:")
    table(header, short) if short else print("  none")


def missing(cells: np.ndarray, cell_labels: np.ndarray, clean: int) -> None:
    rows = []
    for share, kind, weight in itertools.product((0.5, 1.0), KINDS, (0.3, 0.5, 0.8)):
        spec = cf.FileSpec(templates=(cf.TemplateSpec(kind=kind, weight=weight, bases=10, copies=3),
                                      cf.TemplateSpec(kind=kind, weight=weight, bases=10)),
                           clean=clean, missing_bases=share, seed=int(weight * 10))  # fmt: skip
        result, seconds = score(cf.build_file(cells, cell_labels, spec))
        rows.append([f"{share:.0%}", kind, f"{weight:.1f}", f"{result.precision:.4f}", f"{result.corrupted_recall:.4f}",
                     f"{result.outlier_recall:.4f}", f"{min(result.template_psnr):.1f}", f"{seconds:.1f}"])  # fmt: skip
    table(["bases missing", "kind", "weight", "precision", "blend recall", "copy recall", "min PSNR dB", "s"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="the share x templates x bases x kind table")
    parser.add_argument("--shares", nargs="+", default=list(WEIGHTS), choices=WEIGHTS, help="the sweep's share columns")
    parser.add_argument("--missing", action="store_true", help="files whose bases are partly or wholly absent")
    parser.add_argument("--lossy", action="store_true", help="files stored as JPEG or resized")
    parser.add_argument("--clean", type=int, default=3000, help="clean pbc96 cells per generated file")
    args = parser.parse_args()
    loaded = load_pbc96()
    if loaded is None:
        return 1
    pbc, _, _ = loaded
    cells, cell_labels = pbc.images, pbc.manifest["label"].to_numpy()
    if args.sweep or args.missing or args.lossy:
        if args.sweep:
            sweep(cells, cell_labels, args.clean, args.shares)
        if args.lossy:
            lossy(cells, cell_labels, args.clean)
        if args.missing:
            missing(cells, cell_labels, args.clean)
        return 0
    challenge_file()
    clean_sets(cells, cell_labels)
    timing(cells, cell_labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
