"""Cells from another lab: finished models scored on the lab-like shifts and on external labelled folders.

    python bench/bench_domain_shift.py bench/results/recipes/transfer-cpu bench/results/recipes/robust-cpu \\
        --external lisc=/work/external/lisc --external jtsc=/work/external/jtsc_tecom

Each run argument is the folder of a finished ``bench/bench_recipes.py`` run (its ``assets/`` hold the
data splits, the clean images and the trained model). For each model it prints the accuracy on its
own test split, the mean accuracy under the lab-like shifts of ``evaluation.lab_shift`` (test split,
``--max-images`` images, severities 1, 3 and 5, built here with the shipped settings), and per
external set (``name=folder``, one sub-folder per class, as ``BC_EXTERNAL_SETS`` takes them) the
accuracy and the balanced accuracy over the classes the set has, with its largest confusions, as
given and at the zoom its own unlabelled images point to (``evaluation.framing``).
Side by side with the issue's targets and the published numbers it quotes. Data from other labs
stays outside the repository (docs/domain_shift.md says where the development sets come from).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from _common import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL_FOLDER = "trained_model"
PUBLISHED = [
    "published (Tsutsui et al., ICASSP 2023): ImageNet CNNs/ViT across WBC labs, 12-53 % (ResNet50 23 %, ViT-B 41 %)",
    "targets: >= 98 % on pbc96's test split, >= 70 % accuracy and >= 60 % balanced accuracy on another lab",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished bench_recipes.py run folders")
    parser.add_argument("--external", action="append", default=[], help="name=folder of another lab's class folders")
    parser.add_argument("--max-images", type=int, default=1000, help="test images under each shift and severity")
    args = parser.parse_args()

    from bc_pipeline.core.artifacts import read_artifact
    from bc_pipeline.evaluation.external import confusions_in_words, load_external_sets, parse_external_sets, score_external
    from bc_pipeline.evaluation.framing import calibrate_framing
    from bc_pipeline.evaluation.imagenet_c import subsample
    from bc_pipeline.evaluation.lab_shift import ShiftSettings, build_shift_set, seen_shifts, shift_scores, shift_summary
    from bc_pipeline.models.inference import predict_proba
    from bc_pipeline.preparation.splits import split_arrays
    from bc_pipeline.training.model_folder import load_trained_model

    external_folders = parse_external_sets(";".join(args.external))
    rows, words = [], []
    for run in args.runs:
        assets = run / "assets"
        models = sorted(p for p in (assets / MODEL_FOLDER).glob("*") if (p / "model.keras").is_file())
        if not models:
            print(f"error: no trained model under {assets / MODEL_FOLDER}: run bench/bench_recipes.py first", file=sys.stderr)
            return 2
        clean = read_artifact(assets / "clean_images")
        splits = pd.read_parquet(assets / "data_splits.parquet")
        images, labels = split_arrays(clean, splits, "test")
        settings = ShiftSettings(max_images=args.max_images)
        chosen = subsample(labels, settings.max_images, seed=settings.seed)
        shifted, manifest = build_shift_set(images[chosen], labels[chosen], chosen, settings)
        external = load_external_sets(external_folders, class_names=clean.class_names, image_size=images.shape[1])
        for folder in models:
            trained = load_trained_model(folder)
            name = f"{run.name}/{folder.name}"
            clean_accuracy = float(np.mean(predict_proba(trained.model, images).argmax(1) == labels))
            scores = shift_scores(manifest["label"].to_numpy(), predict_proba(trained.model, shifted).argmax(1), manifest)
            summary = shift_summary(scores, seen_shifts(trained.record.augmentation_policies))
            per_shift = scores.groupby("shift", sort=False)["accuracy"].mean()
            row = [name, f"{clean_accuracy:.4f}", f"{summary['shift_accuracy']:.4f}",
                   *(f"{per_shift.get(s, float('nan')):.3f}" for s in settings.shifts)]  # fmt: skip
            for set_name, positions in external.manifest.groupby("set", sort=False).indices.items():
                truth, set_images = external.manifest["label"].to_numpy()[positions], external.images[positions]
                score = score_external(truth, predict_proba(trained.model, set_images).argmax(1), clean.class_names)
                framing, probabilities = calibrate_framing(lambda batch: predict_proba(trained.model, batch), set_images)
                framed = score_external(truth, probabilities.argmax(1), clean.class_names)
                row.append(f"{score['accuracy']:.3f} / {score['balanced_accuracy']:.3f}")
                row.append(f"{framing.zoom:g}x: {framed['accuracy']:.3f} / {framed['balanced_accuracy']:.3f}")
                words.append(f"{name} on {set_name}: " + "; ".join(confusions_in_words(score)))
                words.append(f"{name} on {set_name} at {framing.zoom:g}x ({framing.reason}): "
                             + "; ".join(confusions_in_words(framed)))
            rows.append(row)
    header = ["model", "own test", "lab shifts", *settings.shifts]
    header += [cell for n in external_folders for cell in (f"{n} acc / bal", f"{n} framed: zoom, acc / bal")]
    table(header, rows)
    counts = external.manifest.groupby(["set", "class_name"]).size().unstack(fill_value=0) if len(external.manifest) else None
    if counts is not None:
        print("\nexternal images per class:\n" + counts.to_string())
    print("\n" + "\n".join(words + [""] + PUBLISHED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
