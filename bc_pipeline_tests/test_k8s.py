"""The Kubernetes deployment (deploy/): the step pods dagster-k8s builds from the project's definitions
and the Helm values, a GPU for the training step only; the run launcher values valid for dagster-k8s."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import yaml

from bc_pipeline.defs.resources import PROJECT_ROOT, step_executor

pytest.importorskip("dagster_k8s", reason="the k8s extra is not installed (pip install 'bc_pipeline[k8s]')")

VALUES = yaml.safe_load((PROJECT_ROOT / "deploy" / "values.yaml").read_text())
USER_CODE = VALUES["dagster-user-deployments"]["deployments"][0]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _launcher_config() -> dict:
    """The chart's k8sRunLauncher values as K8sRunLauncher's own config (the chart renames camelCase)."""
    return {_snake(k): v for k, v in VALUES["runLauncher"]["config"]["k8sRunLauncher"].items()}


def _step_pod(step: str):
    """The pod spec dagster-k8s's step handler would submit for ``step`` of a launched run."""
    from dagster._core.execution.api import create_execution_plan
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from bc_pipeline.definitions import load

    job = load().resolve_implicit_global_asset_job_def()
    (tags,) = [s.tags for s in create_execution_plan(job).steps if s.key == step]
    launcher = _launcher_config()
    context = K8sContainerContext(volumes=launcher["volumes"], volume_mounts=launcher["volume_mounts"],
                                  env_vars=launcher["env_vars"], namespace="dagster")  # fmt: skip
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    image = f"{USER_CODE['image']['repository']}:{USER_CODE['image']['tag']}"
    config = DagsterK8sJobConfig(job_image=image, dagster_home="/opt/dagster/dagster_home", instance_config_map="dagster-instance")
    k8s_job = construct_dagster_k8s_job(config, ["dagster", "api", "execute_step"], f"dagster-step-{step.replace('_', '-')}",
                                        user_defined_k8s_config=context.run_k8s_config, component="step_worker")  # fmt: skip
    return k8s_job.spec.template.spec


def test_the_training_step_pod_asks_for_a_gpu_node_and_a_data_step_pod_does_not():
    training, data = _step_pod("trained_model"), _step_pod("raw_images")
    (trainer,), (loader,) = training.containers, data.containers
    assert trainer.resources.limits == {"nvidia.com/gpu": "1"}
    assert training.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [t.key for t in training.tolerations] == ["nvidia.com/gpu"]
    assert not (loader.resources and loader.resources.limits) and not data.node_selector and not data.tolerations
    for pod, container in ((training, trainer), (data, loader)):
        assert container.image == "registry.example.com/bc-pipeline:latest"
        assert {m.name: m.mount_path for m in container.volume_mounts}["bc-data"] == "/data"
        claims = {v.name: v.persistent_volume_claim.claim_name for v in pod.volumes if v.persistent_volume_claim}
        assert claims == {"bc-data": "bc-data"}
        assert {e.name: e.value for e in container.env if e.value}["BC_DATA_DIR"] == "/data"
    assert {m.name: m.mount_path for m in trainer.volume_mounts}.get("dshm") == "/dev/shm"


def test_the_helm_values_are_valid_k8s_run_launcher_config_and_choose_the_step_executor():
    from dagster._config import process_config
    from dagster_k8s import K8sRunLauncher

    chart_sets = {"instance_config_map": "dagster-instance", "dagster_home": "/opt/dagster/dagster_home",
                  "postgres_password_secret": "dagster-postgresql-secret"}  # what the chart's template adds
    result = process_config(K8sRunLauncher.config_type(), {**_launcher_config(), **chart_sets})
    assert result.success, [e.message for e in result.errors]
    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher" and VALUES["postgresql"]["enabled"] is True
    assert VALUES["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    env = {e["name"]: e["value"] for e in USER_CODE["env"]}
    assert env == {"BC_DATA_DIR": "/data", "BC_STEP_EXECUTOR": "k8s"}
    assert USER_CODE["dagsterApiGrpcArgs"][-1] == "code_location"
    assert step_executor(env).name == "k8s" and step_executor({}) is None
    with pytest.raises(ValueError, match="BC_STEP_EXECUTOR='celery'"):
        step_executor({"BC_STEP_EXECUTOR": "celery"})
    dockerfile = (PROJECT_ROOT / "deploy" / "Dockerfile").read_text()
    assert '".[k8s,postgres,gpu]"' in dockerfile and "code_location" in dockerfile
