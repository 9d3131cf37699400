"""How long Dagster's tools wait for the code location: import, then load, in fresh processes.

    python bench/bench_definitions.py [--repeats 5]

The web UI, the daemon and every run process load ``bc_pipeline.definitions``. Importing it only
imports Dagster (the definitions are built lazily, by ``code_location`` / ``load()``); loading
builds them from ``defs/`` (``dg.load_from_defs_folder``). Prints the median of each over fresh
interpreters, the part of the load that is Dagster's own defs-folder loader, and the heavy modules
loading pulled in (none may be TensorFlow or Keras).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _common import table

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "keras_cv", "sklearn", "torch", "jax", "matplotlib")
PROBE = """
import json, sys, time
start = time.perf_counter()
import bc_pipeline.definitions as d
imported = time.perf_counter()
d.load()
loaded = time.perf_counter()
import dagster as dg
from pathlib import Path
again = time.perf_counter()
dg.load_from_defs_folder(path_within_project=Path(d.__file__).parent)  # modules cached: the loader alone
loader = time.perf_counter() - again
print(json.dumps({"import": imported - start, "load": loaded - imported, "loader": loader,
                  "heavy": sorted(m for m in %r if m in sys.modules)}))
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    runs = []
    for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", PROBE % (HEAVY,)], cwd=ROOT, capture_output=True,
                              text=True, check=True)  # fmt: skip
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = [[key, f"{statistics.median(r[key] for r in runs):.2f}"] for key in ("import", "load", "loader")]
    rows.append(["import + load", f"{statistics.median(r['import'] + r['load'] for r in runs):.2f}"])
    table(["bc_pipeline.definitions (median s)", f"{args.repeats} fresh processes"], rows)
    print(f"heavy modules after loading: {runs[-1]['heavy'] or 'none'}")


if __name__ == "__main__":
    main()
