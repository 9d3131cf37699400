"""Shared fixtures: real images from ../shared/datasets (BC_SHARED_DATASETS), small stratified subsets."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.defs.resources import shared_datasets_dir
from bc_pipeline.ingest.loaders import read_labelled_files, sample_class_files

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the machine's cores (pyproject: -n): one compute thread each, for
    # them and the runs and workers they start (inherited). Measured: TensorFlow's default pools, one
    # thread per core in every process, oversubscribe the cores and spin (28 min of CPU against 23).
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

# The modules whose tests take longest (minutes of real runs and trainings), longest first. The
# suite runs over worker processes, a module at a time (pyproject: -n, --dist loadfile), handed out
# in collection order: starting the longest first keeps one from running alone at the end.
LONGEST_FIRST = ("test_faults.py", "test_automation.py", "test_training.py", "test_worker.py", "test_assets.py",
                 "test_corruption.py", "test_anomaly_assets.py", "test_submission.py", "test_interpret.py",
                 "test_browser.py", "test_augmentation.py")  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first (:data:`LONGEST_FIRST`), the rest in their usual order after them."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order within a module


# The whole graph in seconds on a few hundred images: one augmented copy, tiny benchmarks, one epoch at 32 px.
TINY_RUN_CONFIG = {
    "ops": {
        "augmented_train_set": {"config": {"copies": 1, "shard_size": 64}},
        "robustness_eval_sets": {"config": {"policies": ["light"]}},
        "corruption_benchmark_set": {"config": {"corruptions": ["gaussian_noise", "pixelate"], "severities": [3], "max_images": 16, "workers": 1}},
        "domain_shift_set": {"config": {"shifts": ["lab"], "severities": [3], "max_images": 16}},
        "trained_model": {"config": {"epochs": 1, "image_size": 32, "batch_size": 32}},
        "evaluation_report": {"config": {"robust_policy": "light", "tta": False, "gradcam_per_class": 0}},
    }
}


def _pbc96_dir() -> Path:
    path = shared_datasets_dir() / "pbc96"
    if not path.is_dir():
        pytest.skip(f"shared dataset not found at {path} (set BC_SHARED_DATASETS)")
    return path


@pytest.fixture(scope="session")
def pbc96_dir() -> Path:
    """The full PBC folder (14,416 JPEGs in 8 class folders)."""
    return _pbc96_dir()


def pbc96_files(per_class: int, seed: int = 0) -> list[tuple[Path, int]]:
    """A stratified random subset: ``per_class`` files of each class, with their labels."""
    return sample_class_files(_pbc96_dir(), per_class, seed=seed)


def load_pbc96_arrays(per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset read straight into arrays: (images (N, 96, 96, 3) uint8, labels (N,))."""
    return read_labelled_files(pbc96_files(per_class, seed))


@pytest.fixture(scope="session")
def pbc_subset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-folder copy of 40 real images per class (320 images), made once per session."""
    root = tmp_path_factory.mktemp("pbc_subset")
    for file, label in pbc96_files(per_class=40):
        target = root / CLASS_NAMES[label]
        target.mkdir(exist_ok=True)
        shutil.copy(file, target / file.name)
    return root


@pytest.fixture(scope="session")
def pbc_subset_arrays(pbc_subset_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The same subset as (images uint8 (N, 96, 96, 3), labels (N,))."""
    from bc_pipeline.ingest.loaders import load_folder

    loaded = load_folder(pbc_subset_dir, image_size=96)
    return loaded.images, loaded.manifest["label"].to_numpy()


def training_facts(spec, *, epochs_run: int = 1, train_seconds: float = 1.0, **changes):  # noqa: ANN001, ANN201
    """The facts a worker records for a training of ``spec`` on the CPU, for records made in tests."""
    from bc_pipeline.training.model_folder import TrainingFacts
    from bc_pipeline.training.settings import Phase

    facts = {"spec": spec, "phases": (Phase(),), "device": "cpu", "backend": "tensorflow", "keras_version": "3",
             "dtype_policy": "float32", "train_seconds": train_seconds, "epochs_run": epochs_run, "best_epoch": epochs_run}  # fmt: skip
    return TrainingFacts(**{**facts, **changes})


def tick_sensor(sensor, instance, cursor: str | None, resources: dict):
    """One sensor tick as the daemon runs it: (result, next cursor), its asset events recorded."""
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(context)
    if isinstance(result, dg.SensorResult):
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
        return result, result.cursor
    return result, context.cursor


# --- PostgreSQL (the team instance) ------------------------------------------------------------


class PostgresServer:
    """A throw-away PostgreSQL server on a free loopback port, from the Debian package's binaries."""

    def __init__(self, bin_dir: Path, root: Path):
        import socket

        self.bin_dir, self.data = bin_dir, root / "pgdata"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._as_owner: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: run the server as the package's postgres user
            self._as_owner = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        run = lambda *cmd: subprocess.run([*self._as_owner, *cmd], check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
        run(str(bin_dir / "initdb"), "-D", str(self.data), "-U", "bc", "--auth=trust", "--no-sync")
        run(str(bin_dir / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(root / "server.log"), "-o",
            f"-p {self.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")  # fmt: skip
        self._run = run

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://bc@127.0.0.1:{self.port}/{database}"

    def environment(self, database: str) -> dict[str, str]:
        """The variables the shipped PostgreSQL instance reads (instance/postgres.yaml)."""
        return {"DAGSTER_PG_USERNAME": "bc", "DAGSTER_PG_PASSWORD": "", "DAGSTER_PG_HOST": "127.0.0.1",
                "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": database}  # fmt: skip

    def new_database(self, name: str) -> dict[str, str]:
        """A fresh, empty database; the environment that points the shipped instance at it."""
        import psycopg2

        conn = psycopg2.connect(self.url())
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.environment(name)

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (skips, saying how to install it, when there is none)."""
    import importlib.util

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL is not installed: scripts/install_system_package.sh postgresql "
                    "'/usr/lib/postgresql/*/bin/initdb' (as .ci/run does)")  # fmt: skip
    if importlib.util.find_spec("dagster_postgres") is None:
        pytest.skip("dagster-postgres is not installed: pip install 'bc_pipeline[postgres]'")
    import tempfile

    # Not under pytest's temp dir: as root the server runs as `postgres`, which must reach its folder.
    root = Path(tempfile.mkdtemp(prefix="bc-postgres-"))
    try:
        server = PostgresServer(found[-1].parent, root)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"PostgreSQL did not start: {' '.join(error.cmd)}: {error.stderr or error.stdout}")
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def write_instance_home(home: Path, storage: str) -> Path:
    """A DAGSTER_HOME holding the shipped instance for ``storage`` (as ``bc-instance init`` writes it)."""
    from bc_pipeline.dagster_utils.instance import write_instance

    write_instance(home, storage)
    return home
