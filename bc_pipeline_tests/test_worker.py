"""The Pipes training worker: trained on JAX on the CPU, models portable across backends, faults explained.

One module-scoped data directory holds the upstream assets of a 320-image pbc96 subset; each test
then runs only ``trained_model`` (through ``PipesSubprocessClient``, as ``make run`` does) or the
worker itself (``python -m bc_pipeline.training.worker --spec``), and asserts on what the user would see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from bc_pipeline.core.artifacts import read_artifact
from bc_pipeline.definitions import all_asset_checks, all_assets, build_resources
from bc_pipeline.defs.resources import ImageSource, TrainingWorker
from bc_pipeline.training.model_folder import load_trained_model, read_history, read_record
from bc_pipeline.training.spec import FAILURE_FILE

UPSTREAM = ["raw_images", "image_hashes", "duplicate_groups", "image_colour_stats", "corruption_report",
            "outlier_report", "clean_images", "noise_templates", "data_splits", "balanced_train_set",
            "augmented_train_set"]  # fmt: skip
QUICK = {"epochs": 2, "image_size": 32, "batch_size": 32}


@pytest.fixture(scope="module")
def prepared(pbc_subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageSource]:
    data_dir = tmp_path_factory.mktemp("worker_data")
    source = ImageSource(kind="folder", path=str(pbc_subset_dir), image_size=64)
    config = {"ops": {"augmented_train_set": {"config": {"policy": "light", "copies": 1, "shard_size": 200}}}}
    result = dg.materialize([*all_assets, *all_asset_checks], resources=build_resources(str(data_dir), source),
                            selection=UPSTREAM, run_config=config)  # fmt: skip
    assert result.success
    return data_dir, source


def _train(prepared, worker: TrainingWorker, config: dict, partition: str = "custom_cnn", instance=None):
    data_dir, source = prepared
    return dg.materialize(
        [*all_assets, *all_asset_checks], resources=build_resources(str(data_dir), source, worker),
        selection=["trained_model"], partition_key=partition, instance=instance, raise_on_error=False,
        run_config={"ops": {"trained_model": {"config": config}}},
    )  # fmt: skip


def _failure(result) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.message + (event.step_failure_data.user_failure_data.description or "")


def _logs(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def _worker_events(instance, result) -> list:
    """The worker's events as the run's event log holds them (engine events carrying their values)."""
    from bc_pipeline.dagster_utils.progress import worker_event_of

    entries = [entry.dagster_event for entry in instance.all_logs(result.run_id) if entry.dagster_event]
    return [event for event in map(worker_event_of, entries) if event is not None]


@pytest.mark.slow
def test_the_worker_trains_on_jax_through_pipes_and_the_model_predicts_the_same_on_tensorflow(prepared, tmp_path):
    from bc_pipeline.models.inference import predict_proba

    instance = dg.DagsterInstance.ephemeral()
    result = _train(prepared, TrainingWorker(keras_backend="jax"), QUICK, instance=instance)
    assert result.success, _failure(result)
    data_dir = prepared[0]
    folder = data_dir / "assets" / "trained_model" / "custom_cnn"
    facts = read_record(folder).training
    assert facts.backend == "jax" and facts.device.startswith("CPU") and facts.dtype_policy == "float32"
    events = _worker_events(instance, result)  # streamed through Pipes, typed in the run's event log
    assert [(e.values["backend"], e.values["device"][:3]) for e in events if e.kind == "ready"] == [("jax", "CPU")]
    assert [e.values["epoch"] for e in events if e.kind == "epoch"] == list(range(1, facts.epochs_run + 1)) == [1, 2]
    assert events[-1].kind == "finished" and events[-1].values["epochs_run"] == 2
    assert any(line.startswith("epoch 2 (phase 1): loss ") for line in _logs(instance, result))  # readable in the UI
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["epochs_streamed"].value == 2
    # Saved on JAX, loaded here on TensorFlow: the same probabilities as JAX computes.
    images = read_artifact(data_dir / "assets" / "clean_images").images[:48]
    np.save(tmp_path / "x.npy", images)
    script = ("import sys, numpy as np, keras; from bc_pipeline.models.inference import predict_proba;"
              "m = keras.saving.load_model(sys.argv[1], compile=False);"
              "np.save(sys.argv[3], predict_proba(m, np.load(sys.argv[2])))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(folder / "model.keras"), str(tmp_path / "x.npy"),
                           str(tmp_path / "p.npy")], env=os.environ | {"KERAS_BACKEND": "jax"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    on_jax = np.load(tmp_path / "p.npy")
    on_tf = predict_proba(load_trained_model(folder).model, images)
    assert on_tf.std() > 0.01  # a model that has learnt something, not uniform outputs
    np.testing.assert_allclose(on_tf, on_jax, atol=1e-4)


def test_the_worker_imports_neither_dagster_nor_keras_cv_nor_tensorflow_on_jax(prepared):
    """Run by hand on a finished job's spec, the JAX worker leaves those packages unimported."""
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.job import JobFolders, Placement, TrainingInputs, prepare_job
    from bc_pipeline.training.settings import TrainingSettings

    data_dir = prepared[0]
    assets = data_dir / "assets"
    splits = read_artifact(assets / "data_splits")
    inputs = TrainingInputs(
        train=read_artifact(assets / "balanced_train_set"), shards=read_artifact(assets / "augmented_train_set"),
        images=read_artifact(assets / "clean_images"), val_rows=splits.loc[splits["split"] == "val", "index"].to_numpy(),
    )  # fmt: skip
    job = prepare_job(
        JobFolders(data_dir / "probe_job", data_dir / "probe_output", data_root=data_dir), model=model_spec("custom_cnn"),
        settings=TrainingSettings(epochs=1, batch_size=32), inputs=inputs, placement=Placement(backend="jax", device="cpu"),
    )  # fmt: skip
    assert not job.spec.train.images.startswith("/")  # named relative to the data directory, not copied
    assert not (data_dir / "probe_job" / "train_images.npy").exists()
    script = ("import sys; from bc_pipeline.training.worker.__main__ import main; code = main(['--spec', sys.argv[1]]);"
              "print('MODULES', sorted({m.split('.')[0] for m in sys.modules})); sys.exit(code)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(job.spec_path)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    modules = eval(done.stdout.split("MODULES", 1)[1].strip())  # noqa: S307 - our own printed list
    assert "keras" in modules and "jax" in modules
    assert not {"dagster", "keras_cv", "tensorflow"} & set(modules)
    assert (data_dir / "probe_output" / "model.keras").is_file()
    assert "epoch 1 (phase 1)" in done.stderr  # the console reporter


@pytest.mark.slow
def test_a_killed_worker_fails_with_a_clear_message_and_the_next_run_resumes_from_its_checkpoint(prepared):
    """The smallest model (custom_cnn) trained for long enough to be killed between two epochs."""
    model, epochs = "custom_cnn", 6
    config = {**QUICK, "epochs": epochs, "patience": epochs, "lr_schedule": "constant"}
    checkpoint = prepared[0] / "cache" / "checkpoints" / "trained_model" / model / "state.json"
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=_train(prepared, TrainingWorker(), config, partition=model)))
    runner.start()
    deadline = time.time() + 600
    while not checkpoint.is_file() and time.time() < deadline and runner.is_alive():
        time.sleep(0.05)
    assert checkpoint.is_file(), "the worker never saved a checkpoint"
    spec = prepared[0] / "cache" / "training" / model / "spec.json"  # this test's worker only, not another test's
    killed = subprocess.run(["pkill", "-KILL", "-f", f"bc_pipeline.training.worker --spec {re.escape(str(spec))}"], timeout=30)
    assert killed.returncode == 0, "no worker process to kill"
    runner.join(timeout=600)
    result = outcome["result"]
    assert not result.success
    message = _failure(result)
    assert f"training worker of {model} was killed by SIGKILL" in message
    done = json.loads(checkpoint.read_text())["epochs_done"]
    assert done < epochs, "the kill came after training had ended"
    assert f"checkpoint after epoch {done} is kept" in message and "materialize trained_model again" in message
    assert "Traceback" not in message

    again = _train(prepared, TrainingWorker(), config, partition=model)
    assert again.success, _failure(again)
    (event,) = again.get_asset_materialization_events()
    assert event.materialization.metadata["resumed_from_epoch"].value == done
    history = read_history(prepared[0] / "assets" / "trained_model" / model)
    assert history["epoch"].tolist() == list(range(1, epochs + 1))


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")
def test_a_worker_whose_backend_is_missing_fails_fast_naming_it(prepared):
    start = time.perf_counter()
    result = _train(prepared, TrainingWorker(keras_backend="torch"), QUICK, partition="resnet50")
    assert not result.success
    message = _failure(result)
    assert "could not start" in message and "'torch' package is not installed" in message
    assert "pip install 'bc_pipeline[torch]'" in message
    assert time.perf_counter() - start < 60
    assert list((prepared[0] / "cache" / "staging" / "trained_model" / "resnet50").glob(f"*/{FAILURE_FILE}"))


def test_a_worker_that_requires_a_gpu_fails_fast_where_there_is_none(prepared):
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        pytest.skip("this machine has a GPU")
    result = _train(prepared, TrainingWorker(keras_backend="jax", device="gpu"), QUICK, partition="resnet50")
    assert not result.success
    message = _failure(result)
    assert "could not start" in message and "device=gpu, but the jax backend sees no GPU" in message
    assert "No epoch had completed" not in message  # nothing ran, so no talk of checkpoints
