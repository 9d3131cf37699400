"""What each part of transfer-cpu buys: an ablation of the pretrained EfficientNet-Lite0 recipe.

    python bench/bench_transfer_ablation.py                           # every variant below
    python bench/bench_transfer_ablation.py --variants shipped scratch --per-class 300 --epochs 6

Every variant fine-tunes ``efficientnet_lite0`` on the same stratified pbc96 subset (``--per-class``
cells of each class) and is scored on the same test cells, clean and under all 15 ImageNet-C
corruptions at ``--severities``. ``shipped`` is the recipe (ImageNet weights, a frozen phase then
all layers, 96 px, the robust-cpu stored copies, CutMix, label smoothing, cosine rate); each other
variant changes one thing:

- ``scratch``: random weights (what every model of this pipeline started from before).
- ``no-frozen``: all layers from the first epoch (the new head's random gradients reach the backbone).
- ``frozen-only``: the head alone on ImageNet features (a linear probe, plus the dense layer).
- ``no-copies``: the balanced set only, no stored copies.
- ``128px``: the same at 128 px (the pretrained features see objects nearer their ImageNet scale).
- ``image-norm``: each image standardised before the backbone (``input_norm: image``, robust-cpu's one
  difference from transfer-cpu): blind to brightness and contrast.
- ``frozen-stem``: the backbone's 64x64 stage (stem, blocks 0-1) frozen in every phase: 1.4x faster.

It prints seconds, clean accuracy, the mCA, and the mCA over the corruptions the stored copies do
not resemble. At these sizes one run moves by about +-0.02 with the seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _common import table
from bench_robust_ablation import load_subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COPIES = ["augmix", "categorical", "illumination", "focus", "noise"]  # robust-cpu's and transfer-cpu's


@dataclass(frozen=True)
class Variant:
    weights: str = "imagenet"
    phases: str = "frozen,all"  # the trainable setting of each phase
    size: int = 96
    copies: bool = True
    input_norm: str = "none"  # robust-cpu's difference: "image"
    frozen_layers: int = 0  # 17: the 64x64 stage (stem, blocks 0-1)


VARIANTS = {
    "shipped": Variant(),
    "scratch": Variant(weights="none", phases="all"),
    "no-frozen": Variant(phases="all"),
    "frozen-only": Variant(phases="frozen"),
    "no-copies": Variant(copies=False),
    "128px": Variant(size=128),
    "image-norm": Variant(input_norm="image"),
    "frozen-stem": Variant(frozen_layers=17),
}


def subset_splits(per_class: int, seed: int, *, test: int, val: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``per_class`` pbc96 cells of each class, shuffled once (seed 0) into test, val and train."""
    x, y = load_subset(per_class, seed)
    order = np.random.default_rng(0).permutation(len(y))
    te, va, tr = order[:test], order[test : test + val], order[test + val :]
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}


def phases_of(variant: Variant, epochs: int) -> tuple:
    """The recipe's schedule scaled to ``epochs``: one frozen epoch in eight (at least one), the rest on all layers."""
    from bc_pipeline.training.settings import Phase

    frozen = max(1, epochs // 8)
    kinds = variant.phases.split(",")
    if kinds == ["frozen", "all"]:
        return (Phase("frozen", 1e-3, frozen, frozen), Phase("all", 5e-4, epochs - frozen, epochs))
    rate = 1e-3 if kinds == ["frozen"] else 5e-4
    return (Phase(kinds[0], rate, epochs, epochs),)


def run_variant(name: str, data: dict, suite: dict, epochs: int) -> list[str]:
    from bc_pipeline.augmentation.presets import make_augmenter
    from bc_pipeline.evaluation.imagenet_c import seen_in_training
    from bc_pipeline.models.inference import predict_proba
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, TrainingSettings, train_classifier

    variant, start = VARIANTS[name], time.perf_counter()
    x, y = data["train"]
    copies = [(make_augmenter(p, seed=i)(x), y) for i, p in enumerate(COPIES)] if variant.copies else []
    settings = TrainingSettings(
        phases=phases_of(variant, epochs), batch_size=32, lr_schedule="cosine", optimizer="adamw",
        weight_decay=1e-4, label_smoothing=0.1, batch_augment="cutmix", batch_augment_probability=0.3,
    )  # fmt: skip
    spec = model_spec("efficientnet_lite0", image_size=variant.size, weights=variant.weights,
                      input_norm=variant.input_norm, frozen_layers=variant.frozen_layers)
    training = TrainingData(x, y, *data["val"], num_classes=8, augmented=copies)
    model = train_classifier(training, spec, settings, RunOptions(log=lambda _: None)).model
    test_y = data["test"][1]

    def accuracy(images: np.ndarray) -> float:
        return float((predict_proba(model, images).argmax(1) == test_y).mean())

    scores = {key: accuracy(images) for key, images in suite.items()}
    seen = set(seen_in_training(COPIES)) if variant.copies else set()
    unseen = [v for (c, _), v in scores.items() if c not in seen]
    return [name, f"{time.perf_counter() - start:.0f}", f"{accuracy(data['test'][0]):.3f}",
            f"{np.mean(list(scores.values())):.3f}", f"{np.mean(unseen):.3f}"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--per-class", type=int, default=300, help="pbc96 cells per class (default 300)")
    parser.add_argument("--test", type=int, default=320, help="test cells, taken first (default 320)")
    parser.add_argument("--val", type=int, default=200, help="validation cells (default 200)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--severities", type=int, nargs="+", default=[3])
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    from bc_pipeline.evaluation.imagenet_c import CORRUPTIONS, corrupt_images

    data = subset_splits(args.per_class, args.seed, test=args.test, val=args.val)
    suite = {(c, s): corrupt_images(data["test"][0], c, s, seed=1) for c in CORRUPTIONS for s in args.severities}
    print(f"{len(data['train'][1])} train / {len(data['val'][1])} val / {len(data['test'][1])} test cells, {len(suite)} corrupted sets", flush=True)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, data, suite, args.epochs))
        print(" ".join(rows[-1]), flush=True)
    print(f"\nefficientnet_lite0, {args.epochs} epochs, severities {args.severities}")
    table(["variant", "s", "clean", "mCA", "mCA unseen by the copies"], rows)


if __name__ == "__main__":
    main()
