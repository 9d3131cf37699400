"""Where the worker runs: commands, the Kubernetes pod and Docker container, failures in words; the backend rules."""

from __future__ import annotations

import importlib.util
import json
import signal

import dagster as dg
import pytest

from bc_pipeline.dagster_utils import launch
from bc_pipeline.training.worker.backend import Device, WorkerStartError, precision_policy, select_backend, use_jit

GPU = Device("jax", "gpu", "GPU x1: NVIDIA H200", bf16=True)
OLD_GPU = Device("tensorflow", "gpu", "GPU x1: Tesla V100", bf16=False)
CPU = Device("tensorflow", "cpu", "CPU (2 cores)")


def test_pod_spec_requests_gpus_mounts_the_data_claim_and_places_the_pod():
    spec = launch.k8s_pod_spec(gpus=2, volume_claim="bc-data", mount="/data", node_selector={"gpu": "h200"})
    (container,) = spec["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert {"name": launch.DATA_VOLUME, "mountPath": "/data"} in container["volumeMounts"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[launch.DATA_VOLUME]["persistentVolumeClaim"] == {"claimName": "bc-data"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert spec["nodeSelector"] == {"gpu": "h200"} and spec["restartPolicy"] == "Never"
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_only = launch.k8s_pod_spec(gpus=0, volume_claim="bc-data", mount="/data")
    assert cpu_only["containers"][0]["resources"]["limits"] == {} and "tolerations" not in cpu_only
    with pytest.raises(ValueError, match="needs data_volume_claim"):
        launch.k8s_pod_spec(gpus=1, volume_claim="", mount="/data")


@pytest.mark.skipif(importlib.util.find_spec("dagster_k8s") is None, reason="the k8s extra is not installed")
def test_dagster_k8s_builds_a_valid_pod_from_our_spec():
    from dagster_k8s.pipes import build_pod_body

    spec = launch.k8s_pod_spec(gpus=1, volume_claim="bc-data", mount="/data")
    pod = build_pod_body("p", "bc-pipeline-worker:latest", ["python", "-m", "bc_pipeline.training.worker"], {"A": "1"}, None, spec)
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "1"}


def test_the_spec_path_is_translated_into_the_container_mount(tmp_path):
    spec = tmp_path / "data" / "cache" / "training" / "custom_cnn" / "spec.json"
    assert launch.path_in_container(spec, tmp_path / "data", "/data") == "/data/cache/training/custom_cnn/spec.json"
    with pytest.raises(ValueError, match="outside the data directory"):
        launch.path_in_container(tmp_path / "elsewhere.json", tmp_path / "data", "/data")
    assert launch.worker_command("python", "/data/s.json") == ["python", "-m", "bc_pipeline.training.worker", "--spec", "/data/s.json"]


def test_docker_kwargs_bind_the_data_directory(tmp_path):
    kwargs = launch.docker_container_kwargs(data_root=tmp_path, mount="/data", gpus=0)
    assert kwargs["volumes"] == {str(tmp_path.resolve()): {"bind": "/data", "mode": "rw"}}
    assert "device_requests" not in kwargs


def test_failures_are_explained_with_what_to_do_next(tmp_path):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.job import JobFolders, TrainingJob
    from bc_pipeline.training.settings import TrainingSettings
    from bc_pipeline.training.spec import ArrayRef, WorkerSpec

    spec = WorkerSpec(data_dir=str(tmp_path), model=model_spec("resnet50"), settings=TrainingSettings(), num_classes=8,
                      train=ArrayRef("x", "y"), val=ArrayRef("x", "y"), output_dir="out")  # fmt: skip

    def job(checkpoint_dir):  # noqa: ANN001, ANN202
        return TrainingJob(spec, tmp_path / "spec.json", JobFolders(tmp_path, tmp_path / "out", tmp_path, checkpoint_dir))

    (tmp_path / "state.json").write_text(json.dumps({"epochs_done": 4}))
    killed = job(tmp_path).explain_failure(RuntimeError(f"failed with code {-signal.SIGKILL}"), "subprocess")
    assert killed.startswith("the training worker of resnet50 was killed by SIGKILL (out of memory")
    assert f"checkpoint after epoch 4 is kept in {tmp_path}" in killed
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "failure.txt").write_text("ValueError: bad shard\n\nTraceback (most recent call last): ...")
    crashed = job(None).explain_failure(RuntimeError("External execution process failed with code 1"), "subprocess")
    assert "failed (subprocess: External execution process failed with code 1): ValueError: bad shard." in crashed
    assert "Traceback" not in crashed and f"traceback is in {tmp_path / 'out' / 'failure.txt'}" in crashed
    cannot = job(tmp_path / "none").explain_failure(RuntimeError("failed with code 3"), "k8s")
    assert cannot.startswith("the training worker of resnet50 could not start") and "no checkpoint" not in cannot


def test_an_uninstalled_launcher_is_named_with_its_extra(monkeypatch):
    from bc_pipeline.defs import resources

    monkeypatch.setattr(resources.importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(dg.Failure, match=r"needs dagster_k8s, which is not installed: pip install 'bc_pipeline\[k8s\]'"):
        resources._import_client("k8s", "dagster_k8s", "PipesK8sClient")


def test_mixed_precision_and_xla_follow_the_device_and_the_backend():
    assert precision_policy("auto", GPU) == "mixed_bfloat16"  # Hopper: bf16, no loss scaling
    assert precision_policy("auto", OLD_GPU) == "mixed_float16"  # before Ampere: fp16 with loss scaling
    assert precision_policy("auto", CPU) == "float32" and precision_policy("off", GPU) == "float32"
    assert use_jit("auto", GPU) and use_jit("auto", Device("jax", "cpu", "CPU"))
    assert not use_jit("auto", OLD_GPU) and use_jit("on", OLD_GPU) and not use_jit("off", GPU)
    with pytest.raises(ValueError, match="auto, on or off"):
        precision_policy("bf16", GPU)


def test_an_unknown_or_uninstalled_backend_is_refused_before_keras_is_imported(monkeypatch):
    with pytest.raises(WorkerStartError, match="unknown Keras backend 'mxnet'"):
        select_backend("mxnet")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(WorkerStartError, match="the 'torch' package is not installed .*bc_pipeline\\[torch\\]"):
        select_backend("torch")


def test_the_training_worker_resource_reads_its_settings_from_the_environment(monkeypatch):
    from bc_pipeline.defs.resources import TrainingWorker, from_env

    def training_worker_from_env() -> TrainingWorker:
        return from_env(TrainingWorker)

    assert training_worker_from_env().launcher == "subprocess"
    monkeypatch.setenv("BC_KERAS_BACKEND", "jax")
    monkeypatch.setenv("BC_TRAINING_LAUNCHER", "k8s")
    monkeypatch.setenv("BC_DATA_VOLUME_CLAIM", "bc-data")
    worker = training_worker_from_env()
    assert (worker.keras_backend, worker.launcher, worker.data_volume_claim) == ("jax", "k8s", "bc-data")
