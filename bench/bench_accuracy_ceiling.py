"""Where clean accuracy stops: ensembles of finished recipe runs, the test errors they share, a clean finish.

    python bench/bench_accuracy_ceiling.py bench/results/recipes/transfer-cpu bench/results/recipes/robust-cpu
    python bench/bench_accuracy_ceiling.py bench/results/recipes/transfer-cpu --clean-finish 2

Each argument is the folder of a finished ``bench/bench_recipes.py`` run (its ``assets/`` hold the
data splits, the trained model and the ImageNet-C benchmark set); all must share one split. For
each model and each combination of them (temperature-scaled probabilities averaged) it prints the
clean test accuracy and errors, and the mCA on ``--per-cell`` images of every (corruption, severity)
cell. Then the test images that every model gets wrong: a clean accuracy above
``1 - shared / test`` needs a model that fixes errors no run of the family fixes.

``--clean-finish N`` instead fine-tunes the first model for N more epochs on the training originals
alone (flips and turns, label smoothing 0.1, AdamW on a cosine from ``--rate``) and scores it after
each: does a last phase without the corrupted copies lift clean accuracy, and what does it cost in mCA?
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "trained_model/efficientnet_lite0"


def load_run(folder: Path) -> tuple[object, float]:
    """(the run's trained model, its temperature)."""
    import keras

    import bc_pipeline.models.zoo  # noqa: F401 - registers the zoo's layers for loading

    assets = folder / "assets"
    model = keras.saving.load_model(assets / MODEL / "model.keras", compile=False)
    return model, float(json.loads((assets / MODEL / "info.json").read_text())["temperature"])


class Judge:
    """The first run's test split and an even subsample of its ImageNet-C benchmark set."""

    def __init__(self, assets: Path, per_cell: int) -> None:
        self.splits = pd.read_parquet(assets / "data_splits.parquet")
        test = self.splits[self.splits["split"] == "test"]
        self.test_rows = test["index"].to_numpy()
        self.x_test = np.asarray(np.load(assets / "clean_images/images.npy", mmap_mode="r")[self.test_rows])
        self.y_test = test["label"].to_numpy()
        bench = pd.read_parquet(assets / "corruption_benchmark_set/manifest.parquet")
        cells = bench.groupby(["corruption", "severity"])
        picked = np.sort(np.concatenate([g.sample(min(per_cell, len(g)), random_state=0).index.to_numpy() for _, g in cells]))
        self.bench = bench.loc[picked]
        self.x_bench = np.asarray(np.load(assets / "corruption_benchmark_set/images.npy", mmap_mode="r")[picked])

    def probabilities(self, model: object, temperature: float) -> tuple[np.ndarray, np.ndarray]:
        """Temperature-scaled probabilities on the test split and on the benchmark subsample."""
        from bc_pipeline.models.inference import predict_proba

        def scaled(p: np.ndarray) -> np.ndarray:
            z = np.exp(np.log(np.clip(p, 1e-12, 1)) / temperature)
            return z / z.sum(1, keepdims=True)

        return scaled(predict_proba(model, self.x_test)), scaled(predict_proba(model, self.x_bench))

    def row(self, name: str, test: np.ndarray, bench: np.ndarray) -> list[str]:
        wrong = int(np.sum(test.argmax(1) != self.y_test))
        right = pd.Series(bench.argmax(1) == self.bench["label"].to_numpy(), index=self.bench.index)
        mca = right.groupby(self.bench["corruption"]).mean().mean()
        return [name, f"{1 - wrong / len(self.y_test):.4f}", str(wrong), f"{mca:.4f}"]


def ensembles(folders: list[Path], judge: Judge) -> None:
    names = [f.name for f in folders]
    for folder in folders[1:]:
        if not pd.read_parquet(folder / "assets/data_splits.parquet").equals(judge.splits):
            raise SystemExit(f"error: {folder} has another data split than {folders[0]}: their test sets differ")
    probs = [judge.probabilities(*load_run(f)) for f in folders]
    rows = [judge.row(n, *p) for n, p in zip(names, probs)]
    for size in range(2, len(probs) + 1):
        for combo in itertools.combinations(range(len(probs)), size):
            rows.append(judge.row(" + ".join(names[i] for i in combo),
                                  sum(probs[i][0] for i in combo), sum(probs[i][1] for i in combo)))  # fmt: skip
    table(["model(s)", "clean", "errors", "mCA (subsample)"], rows)
    shared = np.logical_and.reduce([p[0].argmax(1) != judge.y_test for p in probs])
    classes = json.loads((folders[0] / "assets/clean_images/class_names.json").read_text())
    pairs = pd.Series([f"{classes[t]} -> {classes[p]}" for t, p in
                       zip(judge.y_test[shared], sum(p[0] for p in probs).argmax(1)[shared])]).value_counts()  # fmt: skip
    print(f"\n{int(shared.sum())} of {len(judge.y_test)} test images wrong in every run (ceiling for the family: "
          f"{1 - shared.sum() / len(judge.y_test):.4f}); clean_images rows {judge.test_rows[shared].tolist()}")  # fmt: skip
    print("\n".join(f"  {pair}: {count}" for pair, count in pairs.items()))


def clean_finish(folder: Path, judge: Judge, epochs: int, rate: float) -> None:
    import keras

    from bc_pipeline.models.zoo import set_trainable
    from bc_pipeline.training.worker.data import flip_and_turn

    model, temperature = load_run(folder)
    assets = folder / "assets"
    info = json.loads((assets / MODEL / "info.json").read_text())
    weight = {int(k): v for k, v in info["training"]["class_weight"].items()}
    images = np.asarray(np.load(assets / "balanced_train_set/images.npy", mmap_mode="r"))
    labels = pd.read_parquet(assets / "balanced_train_set/manifest.parquet")["label"].to_numpy()
    batch, steps = 32, -(-len(labels) // 32)

    class Originals(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.rng = np.random.default_rng(1)

        def __len__(self) -> int:
            return steps

        def __getitem__(self, _: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows = self.rng.integers(0, len(labels), batch)
            x = flip_and_turn(images[rows], self.rng).astype(np.float32)
            y = labels[rows]
            return x, keras.utils.to_categorical(y, 8), np.array([weight[int(k)] for k in y], np.float32)

    rows = [judge.row("before", *judge.probabilities(model, temperature))]
    set_trainable(model, "all")
    model.compile(optimizer=keras.optimizers.AdamW(keras.optimizers.schedules.CosineDecay(rate, steps * epochs), weight_decay=1e-4),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"])  # fmt: skip
    for epoch in range(epochs):
        start = time.perf_counter()
        history = model.fit(Originals(), epochs=1, verbose=0).history
        print(f"epoch {epoch + 1}: training accuracy {history['accuracy'][-1]:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(judge.row(f"+{epoch + 1} epoch(s) on originals", *judge.probabilities(model, temperature)))
    table(["model", "clean", "errors", "mCA (subsample)"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished bench_recipes.py run folders")
    parser.add_argument("--per-cell", type=int, default=200, help="benchmark images per (corruption, severity)")
    parser.add_argument("--clean-finish", type=int, default=0, help="epochs of fine-tuning on the originals (first run)")
    parser.add_argument("--rate", type=float, default=1e-4)
    args = parser.parse_args()
    missing = [f for f in args.runs if not (f / "assets" / MODEL / "model.keras").is_file()]
    if missing:
        print(f"error: no trained efficientnet_lite0 under {missing[0]}/assets: run bench/bench_recipes.py first", file=sys.stderr)
        return 2
    judge = Judge(args.runs[0] / "assets", args.per_cell)
    if args.clean_finish:
        clean_finish(args.runs[0], judge, args.clean_finish, args.rate)
    else:
        ensembles(args.runs, judge)
    return 0


if __name__ == "__main__":
    sys.exit(main())
