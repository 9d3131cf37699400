"""The submission export and ``bc-predict``, with a small CNN trained on real PBC images."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.cli import main
from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.evaluation.predict import load_classifier, read_new_images, stored_temperature
from bc_pipeline.evaluation.submission import MODEL_TEMPLATE, write_submission

# Runs model.py where bc_pipeline cannot be imported, even though it is installed in this venv.
STANDALONE_SCRIPT = """
import importlib.abc, importlib.util, sys
import numpy as np

class BlockPipeline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "bc_pipeline":
            raise ImportError("model.py must not import bc_pipeline")
        return None

sys.meta_path.insert(0, BlockPipeline())
spec = importlib.util.spec_from_file_location("submitted_model", "model.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
labels = module.Model().predict(np.load(sys.argv[1]))
np.save(sys.argv[2], labels)
print("loaded:", sorted(m for m in sys.modules if m.startswith("bc_pipeline")))
"""


@pytest.fixture(scope="module")
def trained(pbc_subset_arrays):
    """A custom CNN fitted for 3 quick epochs on the 320-image subset (about 10 s on a CPU).

    Batches of 16 give the batch-norm statistics enough updates that inference-mode predictions
    spread over several classes; with one predicted class, "agrees with the model" proves little.
    """
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec

    keras.utils.set_random_seed(0)
    images, labels = pbc_subset_arrays
    model = build_model(model_spec("custom_cnn"), len(CLASS_NAMES))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    onehot = keras.utils.to_categorical(labels, len(CLASS_NAMES))
    model.fit(images.astype(np.float32), onehot, epochs=3, batch_size=16, verbose=0)
    return model


@pytest.fixture(scope="module")
def expected(trained, pbc_subset_arrays) -> np.ndarray:
    """The Keras model's own class indices for the subset, the reference for every other path."""
    from bc_pipeline.models.inference import predict_proba

    labels = predict_proba(trained, pbc_subset_arrays[0]).argmax(axis=1)
    assert len(np.unique(labels)) >= 3, f"the quick model predicts too few classes: {np.bincount(labels)}"
    return labels


@pytest.fixture(scope="module")
def submission(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "submission"
    return write_submission(trained, CLASS_NAMES, folder, info={"model_name": "custom_cnn", "epochs": 3})


def _load_model_py(folder: Path):
    spec = importlib.util.spec_from_file_location(f"submitted_{abs(hash(folder))}", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_cli(*args) -> int:
    return main([str(arg) for arg in args])


# --- the submission folder ---------------------------------------------------------------------


def test_submission_folder_holds_every_file_and_the_zip_holds_them_too(submission):
    assert sorted(p.name for p in submission.iterdir()) == sorted(
        ["model.keras", "model.py", "class_names.json", "info.json", "submission.zip"]
    )
    assert json.loads((submission / "class_names.json").read_text()) == list(CLASS_NAMES)
    info = json.loads((submission / "info.json").read_text())
    assert (info["model_name"], info["epochs"], info["class_names"]) == ("custom_cnn", 3, list(CLASS_NAMES))
    with zipfile.ZipFile(submission / "submission.zip") as archive:
        assert {"model.py", "model.keras"} <= set(archive.namelist())
        assert archive.read("model.py").decode() == (submission / "model.py").read_text()
        assert archive.read("model.keras") == (submission / "model.keras").read_bytes()
    assert not [p for p in submission.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_model_py_imports_only_numpy_and_keras(submission):
    source = (submission / "model.py").read_text()
    assert source == MODEL_TEMPLATE
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"os", "numpy", "keras"}, imported


def _backends() -> list[str]:
    """The Keras backends installed here (TensorFlow and JAX in the dev extra; PyTorch if present)."""
    return [name for name in ("tensorflow", "jax", "torch") if importlib.util.find_spec(name) is not None]


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_standalone_model_py_predicts_what_the_keras_model_predicts(
    submission, pbc_subset_arrays, expected, tmp_path, backend
):
    """The submission, trained on TensorFlow, gives the same classes on every Keras backend."""
    images = pbc_subset_arrays[0]
    assert images.dtype == np.uint8 and images.shape[1:] == (96, 96, 3)
    np.save(tmp_path / "X.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": backend}
    done = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE_SCRIPT, str(tmp_path / "X.npy"), str(tmp_path / "y.npy")],
        cwd=submission, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded: []" in done.stdout
    labels = np.load(tmp_path / "y.npy")
    assert labels.shape == (len(images),) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_model_py_rejects_wrong_shapes_and_accepts_any_size(submission, pbc_subset_arrays, expected):
    model = _load_model_py(submission).Model()
    images = pbc_subset_arrays[0][:20]
    for bad in (images[0], images[..., 0], np.concatenate([images, images[..., :1]], axis=-1), images.astype(str)):
        with pytest.raises(ValueError, match=r"\(N, H, W, 3\)|numeric"):
            model.predict(bad)
    empty = model.predict(np.zeros((0, 96, 96, 3), np.uint8))
    assert empty.shape == (0,) and empty.dtype == np.int64
    larger = model.predict(np.repeat(np.repeat(images, 2, axis=1), 2, axis=2))  # 192x192, resized by the model
    assert larger.shape == (20,) and larger.dtype == np.int64 and larger.max() < len(CLASS_NAMES)
    np.testing.assert_array_equal(model.predict(images), expected[:20])


def test_write_submission_refuses_a_class_count_that_does_not_match(trained, tmp_path):
    with pytest.raises(ValueError, match="7 class names for a model with 8 outputs"):
        write_submission(trained, CLASS_NAMES[:7], tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


# --- loading a model for prediction ------------------------------------------------------------


def test_load_classifier_reads_artifacts_submissions_and_bare_files(trained, submission, tmp_path):
    from bc_pipeline.training.model_folder import ModelRecord, TrainedModel, write_model_folder

    names = [f"cell_{i}" for i in range(8)]
    record = ModelRecord(model_name="x", class_names=tuple(names), weights_fingerprint="w", parameters=1, image_size=32, temperature=1.5)
    artifact = write_model_folder(tmp_path / "artifact", TrainedModel(trained, pd.DataFrame({"loss": [1.0]}), record))
    bare = tmp_path / "alone" / "net.keras"
    bare.parent.mkdir()
    bare.write_bytes((submission / "model.keras").read_bytes())
    assert load_classifier(artifact)[1] == names
    assert load_classifier(artifact / "model.keras")[1] == names
    assert stored_temperature(artifact) == 1.5  # read from the model record
    model, loaded_names = load_classifier(submission)
    assert loaded_names == list(CLASS_NAMES) and model.output_shape == (None, 8)
    assert load_classifier(bare)[1] == [f"class_{i}" for i in range(8)]

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_classifier(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model.keras"):
        load_classifier(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt"):
        load_classifier(tmp_path / "notes.txt")
    (tmp_path / "broken.keras").write_text("not a model")
    with pytest.raises(ValueError, match="broken.keras"):
        load_classifier(tmp_path / "broken.keras")


# --- bc-predict --------------------------------------------------------------------------------


def test_cli_classifies_a_folder_like_the_model(submission, pbc_subset_dir, expected, tmp_path, capsys):
    from bc_pipeline.ingest.loaders import load_folder

    output = tmp_path / "out" / "predictions.csv"
    assert _run_cli(submission, pbc_subset_dir, "-o", output, "--batch-size", 64) == 0
    frame = pd.read_csv(output)
    probability_columns = [f"p_{name}" for name in CLASS_NAMES]
    assert list(frame.columns) == ["source", "predicted_index", "predicted_class", *probability_columns]
    assert len(frame) == 320
    np.testing.assert_allclose(frame[probability_columns].sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(frame["predicted_index"], frame[probability_columns].to_numpy().argmax(axis=1))
    assert (frame["predicted_class"] == np.asarray(CLASS_NAMES)[frame["predicted_index"]]).all()
    # The fixture's arrays follow load_folder's manifest order; match on the file, not the row.
    reference = dict(zip(load_folder(pbc_subset_dir).manifest["source"], expected))
    assert set(frame["source"]) == set(reference)
    assert frame["predicted_index"].tolist() == [reference[source] for source in frame["source"]]
    out = capsys.readouterr().out
    assert "classified 320 images" in out and "(0 skipped)" in out and str(output.resolve()) in out


def test_cli_classifies_npz_files_uint8_or_unit_floats(submission, pbc_subset_arrays, expected, tmp_path):
    images = pbc_subset_arrays[0][:40]
    np.savez(tmp_path / "test.npz", X=images)
    np.savez(tmp_path / "floats.npz", ids=np.arange(40), pixels=images.astype(np.float32) / 255.0)
    for name in ("test.npz", "floats.npz"):
        output = tmp_path / f"{name}.csv"
        assert _run_cli(submission, tmp_path / name, "-o", output) == 0
        frame = pd.read_csv(output)
        assert frame["source"].tolist() == [f"{name}[{i}]" for i in range(40)]
        np.testing.assert_array_equal(frame["predicted_index"], expected[:40])


def test_cli_reports_expected_errors_with_status_2_and_no_traceback(submission, tmp_path, capsys):
    np.savez(tmp_path / "labels_only.npz", labels=np.arange(5), names=np.array(["a", "b"]))
    cases = [
        ((submission, tmp_path / "missing_dir"), ["missing_dir", "not found"]),
        ((submission, tmp_path / "labels_only.npz"), ["labels_only.npz", "no image array", "'labels'", "'names'"]),
        ((tmp_path / "no_model.keras", tmp_path / "labels_only.npz"), ["no_model.keras", "model not found"]),
    ]
    for args, expected_parts in cases:
        assert _run_cli(*args, "-o", tmp_path / "p.csv") == 2
        err = capsys.readouterr().err
        assert err.startswith("bc-predict: error: ") and "Traceback" not in err
        assert all(part in err for part in expected_parts), err
    assert not (tmp_path / "p.csv").exists()
    assert main([]) == 2 and "usage: bc-predict" in capsys.readouterr().err
    assert main(["m", "i", "--batch-size", "0"]) == 2
    for framing in ("9", "wide"):
        assert main(["m", "i", "--framing", framing]) == 2 and "--framing" in capsys.readouterr().err


def test_cli_framing_zooms_the_input_by_a_factor_or_by_the_models_surest_zoom(submission, pbc_subset_arrays, tmp_path, capsys):
    from bc_pipeline.evaluation.framing import ZOOMS, zoom_images
    from bc_pipeline.models.inference import predict_proba

    images = pbc_subset_arrays[0][:40]
    np.savez(tmp_path / "cells.npz", X=images)
    model, _ = load_classifier(submission)
    assert _run_cli(submission, tmp_path / "cells.npz", "-o", tmp_path / "zoomed.csv", "--framing", "2") == 0
    zoomed = pd.read_csv(tmp_path / "zoomed.csv")
    np.testing.assert_array_equal(zoomed["predicted_index"], predict_proba(model, zoom_images(images, 2.0)).argmax(1))
    assert "framing: zoom 2x (--framing)" in capsys.readouterr().out
    assert _run_cli(submission, tmp_path / "cells.npz", "-o", tmp_path / "auto.csv", "--framing", "auto") == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("framing: zoom"))
    zoom = float(line.split()[2].rstrip("x"))
    assert zoom in ZOOMS and "highest image-class information" in line
    auto = pd.read_csv(tmp_path / "auto.csv")
    np.testing.assert_array_equal(auto["predicted_index"], predict_proba(model, zoom_images(images, zoom)).argmax(1))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in _backends() if b != "tensorflow"])
def test_cli_gives_the_same_probabilities_on_another_backend(submission, trained, pbc_subset_arrays, tmp_path, backend):
    """bc-predict on JAX (or PyTorch) with a model trained on TensorFlow: probabilities within 1e-4."""
    from bc_pipeline.models.inference import predict_proba

    images = pbc_subset_arrays[0][:64]
    np.savez(tmp_path / "new.npz", images=images)
    done = subprocess.run(
        [sys.executable, "-m", "bc_pipeline.cli", str(submission), str(tmp_path / "new.npz"), "-o", str(tmp_path / "p.csv")],
        env=os.environ | {"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    frame = pd.read_csv(tmp_path / "p.csv")
    theirs = frame[[f"p_{name}" for name in CLASS_NAMES]].to_numpy()
    ours = predict_proba(trained, images)
    assert ours.max(axis=1).min() < 0.99  # not a saturated model, for which any backend would agree
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_cli_module_entry_point_exits_with_status_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bc_pipeline.cli", str(tmp_path / "m.keras"), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("bc-predict: error: ") and "m.keras" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_skips_and_reports_unreadable_files(submission, pbc_subset_dir, tmp_path, capsys):
    folder = tmp_path / "new" / "batch1"
    folder.mkdir(parents=True)
    good = sorted((pbc_subset_dir / "neutrophil").glob("*.jpg"))[:5]
    for file in good:
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "garbage.jpg").write_bytes(b"\x00not an image at all" * 50)
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:600])
    (folder / "notes.txt").write_text("scanned on monday")

    skipped = dict(read_new_images(tmp_path / "new").skipped)
    assert set(skipped) == {"batch1/garbage.jpg", "batch1/truncated.jpg", "batch1/notes.txt"}
    assert "truncated" in skipped["batch1/truncated.jpg"] and "extension" in skipped["batch1/notes.txt"]

    output = tmp_path / "predictions.csv"
    assert _run_cli(submission, tmp_path / "new", "-o", output) == 0
    assert sorted(pd.read_csv(output)["source"]) == sorted(f"batch1/{file.name}" for file in good)
    out = capsys.readouterr().out
    assert "classified 5 images" in out and "(3 skipped)" in out
    assert "skipped batch1/garbage.jpg: not a readable image" in out


def test_a_folder_with_no_readable_image_is_an_error(submission, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("nothing here")
    assert _run_cli(submission, tmp_path / "empty", "-o", tmp_path / "p.csv") == 2
    err = capsys.readouterr().err
    assert "empty" in err and "no readable images" in err and "1 files skipped" in err


def test_cli_probabilities_use_the_stored_temperature(trained, pbc_subset_arrays, expected, tmp_path, capsys):
    """A submission written with a temperature gives softer probabilities and the same classes."""
    from bc_pipeline.models.calibration import scale_probabilities
    from bc_pipeline.models.inference import predict_proba

    images = pbc_subset_arrays[0][:40]
    np.savez(tmp_path / "few.npz", X=images)
    folder = write_submission(trained, CLASS_NAMES, tmp_path / "calibrated", info={"temperature": 2.5})
    assert _run_cli(folder, tmp_path / "few.npz", "-o", tmp_path / "p.csv") == 0
    assert "temperature 2.500" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "p.csv")
    probabilities = frame[[f"p_{name}" for name in CLASS_NAMES]].to_numpy()
    np.testing.assert_allclose(probabilities, scale_probabilities(predict_proba(trained, images), 2.5), atol=1e-5)
    np.testing.assert_array_equal(frame["predicted_index"], expected[:40])
    (folder / "info.json").write_text(json.dumps({"temperature": -1}))
    assert _run_cli(folder, tmp_path / "few.npz", "-o", tmp_path / "q.csv") == 2
    assert "'temperature' must be a positive number" in capsys.readouterr().err
