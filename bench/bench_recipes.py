"""Each shipped recipe from scratch, one run each, printed side by side against its targets.

    python bench/bench_recipes.py                      # quick on BloodMNIST, robust-cpu on pbc96
    python bench/bench_recipes.py --recipes robust-cpu # one of them
    python bench/bench_recipes.py --recipes transfer-cpu   # the pretrained backbone, on pbc96
    python bench/bench_recipes.py --recipes lab-cpu        # the same, trained for other labs' cells
    python bench/bench_recipes.py --recipes gpu --source pbc96   # on a GPU machine

Every run gets a fresh data directory and Dagster home under bench/results/recipes/<recipe>/, so
nothing is reused; the wall time covers the whole graph (ingest to submission), the way `make run
RECIPE=<name>` does it. The robust number is the mean accuracy over the ImageNet-C corruption suite,
which no recipe trains on. Runs take up to an hour each on 2 cores: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from _common import table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bc_pipeline.defs.resources import shared_datasets_dir  # noqa: E402

# (minutes, clean accuracy, mean corruption accuracy, ECE after scaling at most), from the issues
# that asked for the recipes (robust-cpu's raised to 98.5 % / 92 % with the pretrained backbone).
# lab-cpu: issue 29's ">= 98 % on pbc96" in the hour, with no corruption target (its other-lab numbers
# come from bench_domain_shift.py).
TARGETS = {"quick": (15, 0.94, 0.75, 1.0), "robust-cpu": (60, 0.985, 0.92, 1.0), "transfer-cpu": (60, 0.99, 0.93, 0.015),
           "lab-cpu": (60, 0.98, 0.0, 1.0)}  # fmt: skip
DEFAULT_SOURCE = {"quick": "bloodmnist", "robust-cpu": "pbc96", "transfer-cpu": "pbc96", "lab-cpu": "pbc96", "gpu": "pbc96"}


def run_recipe(recipe: str, source: str, results: Path) -> dict:
    """One fresh `python -m bc_pipeline.run --recipe` run; its leaderboard's best row plus the wall time."""
    folder = results / recipe
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    (folder / "dagster_home").mkdir(parents=True)
    (folder / "dagster_home" / "dagster.yaml").write_text((ROOT / "bc_pipeline" / "instance" / "dagster.yaml").read_text())
    env = {**os.environ, "BC_DATA_DIR": str(folder), "DAGSTER_HOME": str(folder / "dagster_home"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if source == "pbc96":
        env.update(BC_SOURCE="folder", BC_SOURCE_PATH=str(shared_datasets_dir() / "pbc96"))
    else:
        env.update(BC_SOURCE="bloodmnist")
        subprocess.run([sys.executable, "-m", "bc_pipeline.ingest.bloodmnist"], env=env, cwd=ROOT, check=True)
    began = time.perf_counter()
    with open(folder / "run.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "bc_pipeline.run", "--recipe", recipe], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    minutes = (time.perf_counter() - began) / 60
    if code != 0:
        return {"recipe": recipe, "source": source, "minutes": minutes, "error": f"exit {code}, see {folder / 'run.log'}"}
    board = pd.read_parquet(folder / "reports" / "model_leaderboard" / "leaderboard.parquet")
    return {"recipe": recipe, "source": source, "minutes": minutes, **board.iloc[0].to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["quick", "robust-cpu"])
    parser.add_argument("--source", choices=["bloodmnist", "pbc96"], default=None, help="default: per recipe")
    args = parser.parse_args()
    results = ROOT / "bench" / "results" / "recipes"
    rows = [run_recipe(name, args.source or DEFAULT_SOURCE.get(name, "pbc96"), results) for name in args.recipes]
    header = ["recipe", "data", "minutes", "model", "clean", "mCA", "mCA unseen", "ECE scaled", "target (min/clean/mCA)", "met"]
    lines = []
    for row in rows:
        if "error" in row:
            lines.append([row["recipe"], row["source"], f"{row['minutes']:.1f}", row["error"], *[""] * 6])
            continue
        target = TARGETS.get(row["recipe"])
        met = "-" if target is None else "yes" if (
            row["minutes"] <= target[0] and row["accuracy"] >= target[1] and (row["corruption_accuracy"] or 0) >= target[2]
            and row["ece_scaled"] <= target[3]
        ) else "no"  # fmt: skip
        lines.append([
            row["recipe"], row["source"], f"{row['minutes']:.1f}", str(row["model"]), f"{row['accuracy']:.4f}",
            f"{row['corruption_accuracy']:.4f}", f"{row['corruption_accuracy_unseen']:.4f}", f"{100 * row['ece_scaled']:.2f} %",
            "-" if target is None else f"{target[0]} / {target[1]} / {target[2]}" + (f" / ECE {target[3]}" if target[3] < 1 else ""), met,
        ])  # fmt: skip
    table(header, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
