"""Resources: where images come from, where reports and caches go, and where models train."""

from __future__ import annotations

import importlib
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg

from bc_pipeline.lib.bloodmnist import BLOODMNIST_FILENAME, fetch_bloodmnist
from bc_pipeline.lib.classes import CLASS_NAMES
from bc_pipeline.lib.loaders import LoadedImages, load_source


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

    def cache_dir(self) -> Path:
        path = self.root / "cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_dir(self, name: str) -> Path:
        """An empty folder on the data directory's file system, for files an asset writes one by one.

        The IO manager then renames it into place, so the artifact appears complete or not at all.
        Left-overs of a killed run are removed here, the next time the same asset runs.
        """
        path = self.cache_dir() / "staging" / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


class ImageSource(dg.ConfigurableResource):
    """Which images the pipeline starts from.

    ``kind``: ``bloodmnist`` (default; fetched into ``<data_dir>/raw/`` if missing), ``npz`` (the
    course challenge layout) or ``folder`` (one sub-folder per class). ``path`` is the file or
    folder; empty means the default BloodMNIST file.
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

    def load(self, data_dir: Path, log: Callable[[str], None]) -> LoadedImages:
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
        )


class TrainingWorker(dg.ConfigurableResource):
    """Where ``trained_model`` runs its training worker, launched through Dagster Pipes.

    ``launcher``: ``subprocess`` (default: a process on this machine, its CPU or GPU), ``docker``
    (a container of ``image``, the data directory bind-mounted at ``data_mount``) or ``k8s`` (a pod
    of ``image`` with ``gpus`` x ``nvidia.com/gpu``, the data directory from the PersistentVolumeClaim
    ``data_volume_claim`` mounted at ``data_mount``, placed by ``node_selector``).
    ``keras_backend``: tensorflow | jax | torch, for the worker only (the other assets stay on
    TensorFlow). ``device``: auto | gpu (fail fast without one) | cpu. Set from the environment in
    definitions.py: ``BC_KERAS_BACKEND``, ``BC_TRAINING_LAUNCHER``, ``BC_TRAINING_DEVICE``,
    ``BC_WORKER_IMAGE``, ``BC_K8S_NAMESPACE``, ``BC_DATA_VOLUME_CLAIM``.
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

    def run(self, context: dg.AssetExecutionContext, spec_path: Path, data_root: Path) -> list[dict]:
        """Run the worker on ``spec_path`` to completion; the custom messages it sent (epochs, summary)."""
        from bc_pipeline.lib import launch

        # The backend and device travel in the spec; the environment only re-roots its paths in a container.
        if self.launcher == "subprocess":
            command = launch.worker_command(self.python or sys.executable, str(spec_path))
            invocation = dg.PipesSubprocessClient().run(command=command, context=context, env=dict(self.env))
            return invocation.get_custom_messages()
        env = {**self.env, "BC_WORKER_DATA_DIR": self.data_mount}
        command = launch.worker_command("python", launch.path_in_container(spec_path, data_root, self.data_mount))
        if self.launcher == "docker":
            client = _import_client("docker", "dagster_docker", "PipesDockerClient")()
            kwargs = launch.docker_container_kwargs(data_root=data_root, mount=self.data_mount, gpus=self.gpus)
            invocation = client.run(context=context, image=self.image, command=command, env=env, container_kwargs=kwargs)
        else:
            pod_spec = launch.k8s_pod_spec(gpus=self.gpus, volume_claim=self.data_volume_claim, mount=self.data_mount,
                                           node_selector=self.node_selector)  # fmt: skip
            client = _import_client("k8s", "dagster_k8s", "PipesK8sClient")()
            invocation = client.run(
                context=context, image=self.image, command=command, env=env, namespace=self.namespace or None,
                base_pod_spec=pod_spec, base_pod_meta={"labels": {"app.kubernetes.io/name": "bc-pipeline-trainer"}},
            )  # fmt: skip
        return invocation.get_custom_messages()


def _import_client(extra: str, module: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        raise dg.Failure(
            description=f"launcher {extra!r} needs {module}, which is not installed: pip install 'bc_pipeline[{extra}]'"
        ) from None
