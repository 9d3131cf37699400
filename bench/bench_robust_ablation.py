"""Which stored-copy presets make custom_cnn robust: a training ablation judged on the corruption suite.

    python bench/bench_robust_ablation.py                                  # the two mixes below
    python bench/bench_robust_ablation.py --variants light augmix,noise --size 32 --epochs 8

Each variant is a comma-separated list of image presets, one stored copy each (as
``augmented_train_set.mix``). Every variant trains ``custom_cnn`` from scratch on the same
stratified pbc96 subset (``--per-class`` cells of each class) with the robust-cpu settings (CutMix,
label smoothing, the input pipeline's flips and turns) and is scored on the same test cells, clean
and under all 15 ImageNet-C corruptions x 5 severities. It prints clean accuracy, the mCA, the mCA
over the corruptions that none of the variant's presets resembles (``PRESET_OVERLAPS``; the honest
number) and the mCA over the corruptions that no variant resembles (comparable across variants),
then each corruption's mean over the severities. One run of a variant moves by about +-0.03 with
the seed at these sizes: read differences smaller than that as noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bc_pipeline.defs.resources import shared_datasets_dir  # noqa: E402

DEFAULT_VARIANTS = ["augmix,categorical,light", "augmix,categorical,illumination,noise"]


def load_subset(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random cells of each pbc96 class folder, as (uint8 (N, 96, 96, 3), labels)."""
    from bc_pipeline.ingest.loaders import read_labelled_files, sample_class_files

    root = Path(shared_datasets_dir()) / "pbc96"
    if not root.is_dir():
        sys.exit(f"error: {root} not found (set BC_SHARED_DATASETS)")
    return read_labelled_files(sample_class_files(root, per_class, seed=seed), image_size=96)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="comma-separated preset lists")
    parser.add_argument("--per-class", type=int, default=700, help="pbc96 cells per class (default 700)")
    parser.add_argument("--test", type=int, default=240, help="test cells, taken first (default 240)")
    parser.add_argument("--val", type=int, default=200, help="validation cells (default 200)")
    parser.add_argument("--size", type=int, default=48, help="model input size (default 48)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    from bc_pipeline.augmentation.presets import make_augmenter
    from bc_pipeline.evaluation.imagenet_c import CORRUPTIONS, SEVERITIES, corrupt_images, seen_in_training
    from bc_pipeline.models.inference import predict_proba
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, TrainingSettings, train_classifier

    x, y = load_subset(args.per_class, args.seed)
    order = np.random.default_rng(0).permutation(len(y))
    te, va, tr = order[: args.test], order[args.test : args.test + args.val], order[args.test + args.val :]
    start = time.perf_counter()
    suite = {(c, s): corrupt_images(x[te], c, s, seed=1) for c in CORRUPTIONS for s in SEVERITIES}
    print(f"{len(tr)} train / {len(va)} val / {len(te)} test cells; suite of {len(suite)} sets made in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    variants = [v.split(",") for v in args.variants]
    seen_by_any = {c for presets in variants for c in seen_in_training(presets)}
    settings = TrainingSettings(
        epochs=args.epochs, patience=args.epochs, batch_size=64, learning_rate=0.002, label_smoothing=0.1,
        batch_augment="cutmix", batch_augment_probability=0.3,
    )  # fmt: skip
    rows, per_corruption = [], []
    for presets in variants:
        start = time.perf_counter()
        copies = [(make_augmenter(p, seed=i)(x[tr]), y[tr]) for i, p in enumerate(presets)]
        spec = model_spec("custom_cnn", image_size=args.size)
        data = TrainingData(x[tr], y[tr], x[va], y[va], num_classes=8, augmented=copies)
        result = train_classifier(data, spec, settings, RunOptions(log=lambda _: None))

        def accuracy(images: np.ndarray) -> float:
            return float((predict_proba(result.model, images).argmax(1) == y[te]).mean())

        clean = accuracy(x[te])
        scores = {c: float(np.mean([accuracy(suite[c, s]) for s in SEVERITIES])) for c in CORRUPTIONS}
        seen = set(seen_in_training(presets))
        unseen = [v for c, v in scores.items() if c not in seen]
        common = [v for c, v in scores.items() if c not in seen_by_any]
        name = "+".join(presets)
        rows.append([name, f"{time.perf_counter() - start:.0f}", f"{clean:.3f}", f"{np.mean(list(scores.values())):.3f}",
                     f"{np.mean(unseen):.3f}", f"{np.mean(common):.3f}"])  # fmt: skip
        per_corruption.append([name, *(f"{scores[c]:.2f}" for c in CORRUPTIONS)])
        print(" ".join(rows[-1]), flush=True)
    print(f"\ncustom_cnn at {args.size} px, {args.epochs} epochs, one stored copy per preset")
    table(["presets", "s", "clean", "mCA", "mCA unseen", "mCA unseen by all"], rows)
    print()
    table(["presets", *(c[:6] for c in CORRUPTIONS)], per_corruption)


if __name__ == "__main__":
    main()
