"""Where the training worker runs: its command line, and the Kubernetes pod and Docker container around
it. Plain data; the ``TrainingWorker`` resource hands it to a Pipes client.

- ``subprocess``: a child process on this machine (its CPU or GPU), ``PipesSubprocessClient``;
- ``docker``: a container of the worker image with the data directory bind-mounted and the GPUs
  requested from the NVIDIA container runtime, ``PipesDockerClient`` (extra ``docker``);
- ``k8s``: a pod with ``nvidia.com/gpu`` in its limits, the data directory from a
  PersistentVolumeClaim and an optional node selector, ``PipesK8sClient`` (extra ``k8s``). Each
  model partition gets its own pod, so several models train at once on several GPU nodes.

On a cluster deployed with Dagster's Helm chart (``deploy/``), the ``k8s_job_executor`` runs each
step in its own pod; :data:`TRAINING_STEP_K8S_CONFIG` is the ``dagster-k8s/config`` tag of
``trained_model``, so its step pod (and only it) asks for a GPU node; the worker then runs there as
a subprocess.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

WORKER_MODULE = "bc_pipeline.training.worker"
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the label NVIDIA's GPU operator puts on GPU nodes
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
CONTAINER_NAME = "trainer"
DATA_VOLUME = "bc-data"
LAUNCHERS = ("subprocess", "docker", "k8s")
EXTRA_OF = {"docker": "dagster_docker", "k8s": "dagster_k8s"}


def worker_command(python: str, spec_path: str) -> list[str]:
    return [python, "-m", WORKER_MODULE, "--spec", spec_path]


def path_in_container(path: Path, data_root: Path, mount: str) -> str:
    """``path`` (below the data directory) as the container sees it, the directory mounted at ``mount``."""
    try:
        relative = Path(path).resolve().relative_to(Path(data_root).resolve())
    except ValueError:
        raise ValueError(f"{path} is outside the data directory {data_root}: a container cannot see it") from None
    return str(PurePosixPath(mount, *relative.parts))


def k8s_pod_spec(
    *, gpus: int, volume_claim: str, mount: str, node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None, cpu: str = "", memory: str = "",
) -> dict[str, Any]:  # fmt: skip
    """The ``base_pod_spec`` of ``PipesK8sClient.run``: GPU limits, data volume, placement.

    GPUs are extended resources: Kubernetes schedules them by limits only, and the NVIDIA device
    plugin gives the container exactly that many. ``/dev/shm`` is enlarged because the default
    64 MiB is too small for input threads handing batches to the backend.
    """
    if not volume_claim:
        raise ValueError("launcher k8s needs data_volume_claim: the PersistentVolumeClaim that holds the data directory")
    limits: dict[str, str] = {"nvidia.com/gpu": str(gpus)} if gpus > 0 else {}
    requests: dict[str, str] = {}
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = limits["memory"] = memory
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "resources": {"limits": limits, **({"requests": requests} if requests else {})},
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": mount}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [
            {"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": volume_claim}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if gpus > 0:
        spec["tolerations"] = list(tolerations or [GPU_TOLERATION])
    return spec


def training_step_k8s_config(gpus: int = 1) -> dict[str, Any]:
    """The ``dagster-k8s/config`` tag of the training step: ``gpus`` GPUs, a GPU node, its taint tolerated.

    Only the limit matters to the scheduler for extended resources (see :func:`k8s_pod_spec`); the
    enlarged ``/dev/shm`` is for the input threads, as in the Pipes pod.
    """
    return {
        "container_config": {
            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            "volume_mounts": [{"name": "dshm", "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": {
            "node_selector": dict(GPU_NODE_SELECTOR),
            "tolerations": [dict(GPU_TOLERATION)],
            "volumes": [{"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": "8Gi"}}],
        },
    }


TRAINING_STEP_K8S_CONFIG = training_step_k8s_config()


def docker_container_kwargs(*, data_root: Path, mount: str, gpus: int) -> dict[str, Any]:
    """``container_kwargs`` of ``PipesDockerClient.run`` (docker-py's ``containers.create``)."""
    kwargs: dict[str, Any] = {
        "volumes": {str(Path(data_root).resolve()): {"bind": mount, "mode": "rw"}},
        "shm_size": "8g",
    }
    if gpus != 0:
        from docker.types import DeviceRequest

        kwargs["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
    return kwargs
