"""The outlier / corruption stage on the challenge-style file and on clean data.

For ``an2dl_style/training_set.npz`` (whose README says: clean cells first, then the injected
images) it prints precision and recall of the flagged images against that split, the blend
weights found, each recovered template's PSNR against the file's outlier photographs (which an
exact decomposition shows to be the templates), and the stage's time. For pbc96 and, when
``data/raw/bloodmnist.npz`` is there, BloodMNIST (both clean) it prints how many images are
flagged (should be none) and the time.

Run: ``.venv/bin/python bench/bench_anomalies.py`` (or ``make bench``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bc_pipeline.lib import corruption, outliers
from bc_pipeline.lib.dedup import find_duplicates
from bc_pipeline.lib.hashing import compute_hashes
from bc_pipeline.lib.loaders import LoadedImages, load_bloodmnist, load_folder, load_npz
from bc_pipeline.settings import data_dir, shared_datasets_dir


def run_stage(loaded: LoadedImages):
    manifest = loaded.manifest
    phash, dhash = compute_hashes(loaded.images)
    duplicates = find_duplicates(manifest["image_id"], manifest["label"], phash, dhash)
    start = time.perf_counter()
    stats = outliers.colour_stats(loaded.images, duplicates)
    candidates, pool = outliers.candidates_and_pool(stats, outliers.CANDIDATE_ATYPICALITY)
    result = corruption.find_corruptions(loaded.images, candidates, pool)
    report = outliers.expand_to_copies(result.report, stats)
    found = outliers.find_outliers(stats, corrupted=report["index"].to_numpy())
    templates = corruption.templates_from_report(loaded.images, report)
    return report, found, templates, time.perf_counter() - start


def main() -> None:
    path = shared_datasets_dir() / "an2dl_style" / "training_set.npz"
    loaded = load_npz(path)
    report, found, templates, seconds = run_stage(loaded)
    position = loaded.manifest["source"].str.extract(r"\[(\d+)\]")[0].astype(int).to_numpy()
    injected = set(np.flatnonzero(position >= 2400))
    flagged = set(report["index"]) | set(found["index"])
    hits = len(flagged & injected)
    print(f"an2dl_style: {len(loaded.manifest)} images, {len(injected)} injected (position >= 2400)")
    print(f"  flagged {len(flagged)}: {len(report)} corrupted, {len(found)} outliers; stage {seconds:.1f} s")
    print(f"  precision {hits / max(len(flagged), 1):.4f}  recall {hits / max(len(injected), 1):.4f}")
    if len(report):
        print(f"  blend weights: min {report['weight'].min():.4f} median {report['weight'].median():.4f} max {report['weight'].max():.4f}")
    photos = loaded.images[found.drop_duplicates("image_id")["index"].to_numpy()]
    for k, template in enumerate(templates):
        best = max((corruption.psnr(template, photo), i) for i, photo in enumerate(photos)) if len(photos) else (0, -1)
        members = int((report.drop_duplicates("representative")["template"] == k).sum())
        print(f"  template {k}: {members} distinct blends, PSNR vs outlier photo #{best[1]} = {best[0]:.1f} dB")

    clean_sets = [("pbc96", lambda: load_folder(shared_datasets_dir() / "pbc96"))]
    bloodmnist = data_dir() / "raw" / "bloodmnist.npz"
    if bloodmnist.is_file():
        clean_sets.append(("bloodmnist", lambda: load_bloodmnist(Path(bloodmnist))))
    for name, load in clean_sets:
        loaded = load()
        report, found, templates, seconds = run_stage(loaded)
        print(f"{name}: {len(loaded.manifest)} clean images: {len(report)} flagged corrupted, "
              f"{len(found)} outliers, {len(templates)} templates; stage {seconds:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
