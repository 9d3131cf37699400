"""Resources, and the one place the pipeline reads its environment.

Every setting that comes from the environment is listed in :data:`ENVIRONMENT` (variable -> what it
sets) and read by :func:`from_env`, once, when the definitions load; a resource field's default is
its only default. The variables:

- ``BC_DATA_DIR``: every artifact, report and cache (and, through the Makefile, the Dagster home)
  live below it; default ``data/`` in the project root.
- ``BC_SOURCE`` (bloodmnist | npz | folder), ``BC_SOURCE_PATH``, ``BC_IMAGE_SIZE``: the image source.
- ``BC_TRAINING_LAUNCHER`` (subprocess | docker | k8s), ``BC_KERAS_BACKEND`` (tensorflow | jax |
  torch), ``BC_TRAINING_DEVICE``, ``BC_WORKER_IMAGE``, ``BC_K8S_NAMESPACE``, ``BC_DATA_VOLUME_CLAIM``:
  where models train.
- ``BC_DAGSTER_STORAGE`` (sqlite | postgres): the storage ``bc-instance init`` writes into
  ``$DAGSTER_HOME/dagster.yaml`` (``dagster_utils/instance.py``); with postgres, Dagster itself reads
  its ``DAGSTER_PG_*`` variables when the instance loads (``instance/postgres.yaml``).
- ``BC_STEP_EXECUTOR`` (default | k8s): with ``k8s`` (the Helm deployment in ``deploy/``) each
  step of a launched run runs in its own pod through ``dagster_k8s.k8s_job_executor``.
- ``BC_SHARED_DATASETS``: the shared development datasets tests and benchmarks read (default
  ``../shared/datasets`` beside the project root).

The training worker runs in its own process or container and reads only ``BC_WORKER_DATA_DIR``
(``training/spec.py``): where the data directory is mounted there.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import dagster as dg

from bc_pipeline.core.artifacts import PartitionedArtifacts, read_artifact, write_artifact
from bc_pipeline.core.chunks import every_tenth
from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.core.processes import fresh_folder
from bc_pipeline.dagster_utils.metadata import ARTIFACT_PATH
from bc_pipeline.ingest.bloodmnist import BLOODMNIST_FILENAME, fetch_bloodmnist
from bc_pipeline.ingest.loaders import LoadedImages, load_source

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Environment variable -> (resource class name, field), or a path setting of this module.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "BC_DATA_DIR": ("PipelineStorage", "data_dir"),
    "BC_SHARED_DATASETS": ("paths", "shared_datasets"),
    "BC_DAGSTER_STORAGE": ("instance", "storage"),
    "BC_STEP_EXECUTOR": ("executor", "kind"),
    "BC_SOURCE": ("ImageSource", "kind"),
    "BC_SOURCE_PATH": ("ImageSource", "path"),
    "BC_IMAGE_SIZE": ("ImageSource", "image_size"),
    "BC_EXTERNAL_SETS": ("ExternalFolders", "sets"),
    "BC_TRAINING_LAUNCHER": ("TrainingWorker", "launcher"),
    "BC_KERAS_BACKEND": ("TrainingWorker", "keras_backend"),
    "BC_TRAINING_DEVICE": ("TrainingWorker", "device"),
    "BC_WORKER_IMAGE": ("TrainingWorker", "image"),
    "BC_K8S_NAMESPACE": ("TrainingWorker", "namespace"),
    "BC_DATA_VOLUME_CLAIM": ("TrainingWorker", "data_volume_claim"),
}

R = TypeVar("R", bound=dg.ConfigurableResource)


def _env(owner: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The fields of ``owner`` set in the environment (unset and empty variables are left out)."""
    environ = os.environ if environ is None else environ
    return {field: environ[var] for var, (name, field) in ENVIRONMENT.items() if name == owner and environ.get(var)}


def from_env(resource_class: type[R], environ: Mapping[str, str] | None = None, **fields: Any) -> R:
    """``resource_class`` with the fields its ``BC_*`` variables set, then ``fields``, over its defaults."""
    return resource_class(**{**_env(resource_class.__name__, environ), **fields})


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where artifacts, reports and caches live: ``BC_DATA_DIR`` or ``data/`` in the project root."""
    return Path(_env("PipelineStorage", environ).get("data_dir") or PROJECT_ROOT / "data").resolve()


def shared_datasets_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The shared development datasets (tests, benchmarks): ``BC_SHARED_DATASETS`` or ``../shared/datasets``."""
    default = PROJECT_ROOT.parent / "shared" / "datasets"
    return Path(_env("paths", environ).get("shared_datasets") or default).resolve()


def instance_storage(environ: Mapping[str, str] | None = None) -> str:
    """The Dagster storage a new instance gets: ``BC_DAGSTER_STORAGE`` or ``sqlite``."""
    return _env("instance", environ).get("storage") or "sqlite"


class PipelineStorage(dg.ConfigurableResource):
    """The data directory: reports (PNG, Markdown, JSON) and caches live below it."""

    data_dir: str

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def report_dir(self, name: str) -> Path:
        path = self.root / "reports" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def label_review_file(self) -> Path:
        """The label review a person edits (quality/label_review.py): written by label_issues, read by clean_images."""
        return self.root / "review" / "label_decisions.csv"

    def cache_dir(self) -> Path:
        path = self.root / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, name: str) -> Path:
        """An empty folder on the data directory's file system, for files an asset writes one by one.

        The IO manager then renames it into place, so the artifact appears complete or not at all.
        Each process gets its own folder below ``cache/staging/<name>/``, so two runs of one asset at
        once never write into each other's; left-overs of killed runs are removed here, the next time
        the same asset runs.
        """
        root = self.cache_dir() / "staging" / name
        return fresh_folder(root)


class ImageSource(dg.ConfigurableResource):
    """Which images the pipeline starts from.

    ``kind``: ``bloodmnist`` (default; fetched into ``<data_dir>/raw/`` if missing), ``npz`` (the
    course challenge layout) or ``folder`` (one sub-folder per class). ``path`` is the file or
    folder; empty means the default BloodMNIST file. ``class_names`` are the labels' names in label
    order; they travel with the images from ``raw_images`` on (downstream stages read them there).
    """

    kind: Literal["bloodmnist", "npz", "folder"] = "bloodmnist"
    path: str = ""
    image_size: int = 96
    class_names: list[str] = list(CLASS_NAMES)
    on_bad_item: Literal["skip", "fail"] = "skip"

    def resolve_path(self, data_dir: Path) -> Path:
        if self.path:
            return Path(self.path).expanduser()
        if self.kind != "bloodmnist":
            raise ValueError(f"image source kind {self.kind!r} needs a path (set BC_SOURCE_PATH)")
        return data_dir / "raw" / BLOODMNIST_FILENAME

    def load(self, data_dir: Path, log: Callable[[str], None], out_dir: Path | None = None) -> LoadedImages:
        """Load the source; with ``out_dir``, images stream to ``out_dir/images.npy`` (see loaders)."""
        path = self.resolve_path(data_dir)
        if self.kind == "bloodmnist" and not path.exists():
            log(f"{path} is missing: fetching BloodMNIST")
            fetch_bloodmnist(path, log=log)
        log(f"loading {self.kind} source {path} at {self.image_size}px")
        return load_source(
            self.kind,
            path,
            image_size=self.image_size,
            class_names=self.class_names,
            on_bad_item=self.on_bad_item,
            out_dir=out_dir,
            progress=every_tenth(lambda done, total: log(f"decoded {done}/{total} images")),
        )


class ExternalFolders(dg.ConfigurableResource):
    """Other labs' labelled cells to score every model on: ``name=folder;other=folder`` (``BC_EXTERNAL_SETS``).

    Each folder holds one sub-folder per class, named like the pipeline's classes; missing classes are
    allowed, unknown ones are recorded as skipped (evaluation.external). Empty: no external sets.
    """

    sets: str = ""

    def folders(self) -> dict[str, Path]:
        from bc_pipeline.evaluation.external import parse_external_sets

        return parse_external_sets(self.sets)


class TrainingWorker(dg.ConfigurableResource):
    """Where ``trained_model`` runs its training worker, launched through Dagster Pipes.

    ``launcher``: ``subprocess`` (default: a process on this machine, its CPU or GPU), ``docker``
    (a container of ``image``, the data directory bind-mounted at ``data_mount``) or ``k8s`` (a pod
    of ``image`` with ``gpus`` x ``nvidia.com/gpu``, the data directory from the PersistentVolumeClaim
    ``data_volume_claim`` mounted at ``data_mount``, placed by ``node_selector``).
    ``keras_backend``: tensorflow | jax | torch, for the worker only (the other assets stay on
    TensorFlow). ``device``: auto | gpu (fail fast without one) | cpu. Set from the environment
    (:data:`ENVIRONMENT`).
    """

    launcher: Literal["subprocess", "docker", "k8s"] = "subprocess"
    keras_backend: Literal["tensorflow", "jax", "torch"] = "tensorflow"
    device: Literal["auto", "gpu", "cpu"] = "auto"
    input_workers: int = 0
    python: str = ""
    image: str = "bc-pipeline-worker:latest"
    data_mount: str = "/data"
    gpus: int = 1
    namespace: str = ""
    data_volume_claim: str = ""
    node_selector: dict[str, str] = {}
    env: dict[str, str] = {}

    def run(self, context: dg.AssetExecutionContext, spec_path: Path, data_root: Path, on_message: Callable[[Any], None]) -> None:
        """Run the worker on ``spec_path`` to completion; each custom message (a worker event) goes to
        ``on_message`` as it arrives (``dagster_utils.progress.relaying``)."""
        from bc_pipeline.dagster_utils import launch
        from bc_pipeline.dagster_utils.progress import relaying

        # The backend and device travel in the spec; the environment only re-roots its paths in a container.
        if self.launcher == "subprocess":
            command = launch.worker_command(self.python or sys.executable, str(spec_path))
            client = dg.PipesSubprocessClient(message_reader=relaying(dg.PipesTempFileMessageReader(), on_message))
            client.run(command=command, context=context, env=dict(self.env))
            return
        env = {**self.env, "BC_WORKER_DATA_DIR": self.data_mount}
        command = launch.worker_command("python", launch.path_in_container(spec_path, data_root, self.data_mount))
        if self.launcher == "docker":
            reader = relaying(_import_client("docker", "dagster_docker", "PipesDockerLogsMessageReader")(), on_message)
            client = _import_client("docker", "dagster_docker", "PipesDockerClient")(message_reader=reader)
            kwargs = launch.docker_container_kwargs(data_root=data_root, mount=self.data_mount, gpus=self.gpus)
            client.run(context=context, image=self.image, command=command, env=env, container_kwargs=kwargs)
            return
        pod_spec = launch.k8s_pod_spec(gpus=self.gpus, volume_claim=self.data_volume_claim, mount=self.data_mount,
                                       node_selector=self.node_selector)  # fmt: skip
        reader = relaying(_import_client("k8s", "dagster_k8s", "PipesK8sPodLogsMessageReader")(), on_message)
        client = _import_client("k8s", "dagster_k8s", "PipesK8sClient")(message_reader=reader)
        client.run(
            context=context, image=self.image, command=command, env=env, namespace=self.namespace or None,
            base_pod_spec=pod_spec, base_pod_meta={"labels": {"app.kubernetes.io/name": "bc-pipeline-trainer"}},
        )  # fmt: skip


def _import_client(extra: str, module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise dg.Failure(
            description=f"launcher {extra!r} needs {module}, which is not installed: pip install 'bc_pipeline[{extra}]'"
        ) from None


# An input that reads every partition of a partitioned upstream asset: AssetIn(metadata=ALL_PARTITIONS).
ALL_PARTITIONS = {"all_partitions": True}


class ArtifactIOManager(dg.ConfigurableIOManager):
    """Stores every asset's value under ``base_dir`` in the formats of core.artifacts (atomic writes).

    A partitioned asset keeps one artifact per partition: ``<asset>/<partition>``. An input marked
    :data:`ALL_PARTITIONS` gets a lazy mapping from partition key to value, holding only the
    partitions that are stored.
    """

    base_dir: str

    def _base(self, asset_key: dg.AssetKey) -> Path:
        return Path(self.base_dir).joinpath(*asset_key.path)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        base = self._base(context.asset_key)
        if context.has_asset_partitions:
            base = base / context.asset_partition_key
        path = write_artifact(base, obj)
        context.add_output_metadata({ARTIFACT_PATH: dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> Any:
        base, what = self._base(context.asset_key), context.asset_key.to_user_string()
        if not context.has_asset_partitions:
            return read_artifact(base, what=what)
        keys = list(context.asset_partition_keys)
        if (context.definition_metadata or {}).get("all_partitions"):
            stored = PartitionedArtifacts(base, keys, what=what)
            if stored.missing:  # the normal case (few of the zoo are trained): information, not a warning
                context.log.info(f"{what}: {len(stored)} of {len(keys)} partitions stored; not trained yet, so left out: "
                                 f"{', '.join(stored.missing)}")  # fmt: skip
            return stored
        if len(keys) != 1:
            raise ValueError(f"{what}: expected one partition, got {len(keys)}; mark the input all_partitions")
        return read_artifact(base / keys[0], what=f"{what}[{keys[0]}]")


def build_resources(
    data_dir: str | Path | None = None,
    source: ImageSource | None = None,
    worker: TrainingWorker | None = None,
    external: ExternalFolders | None = None,
) -> dict[str, Any]:
    """Every resource of the pipeline: for a data directory, image source, training worker and external sets
    (default: the environment)."""
    root = str(data_dir or default_data_dir())
    return {
        "io_manager": ArtifactIOManager(base_dir=os.path.join(root, "assets")),
        "storage": PipelineStorage(data_dir=root),
        "image_source": source or from_env(ImageSource),
        "training_worker": worker or from_env(TrainingWorker),
        "external_folders": external or from_env(ExternalFolders),
    }


def step_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor of launched runs: Dagster's default, or one pod per step (``BC_STEP_EXECUTOR=k8s``).

    The pods take image, volumes and namespace from the Helm chart's run launcher; a step's own
    ``dagster-k8s/config`` tag adds to them (``trained_model`` asks for a GPU node).
    """
    kind = _env("executor", environ).get("kind") or "default"
    if kind == "default":
        return None
    if kind != "k8s":
        raise ValueError(f"BC_STEP_EXECUTOR={kind!r}: expected 'default' or 'k8s'")
    return _import_client("k8s", "dagster_k8s", "k8s_job_executor")


@dg.definitions
def resources() -> dg.Definitions:
    """The resources (and executor) the definitions load with (``dg`` autoloads this module from ``defs/``)."""
    return dg.Definitions(resources=build_resources(), executor=step_executor())
