"""evaluate_model and write_evaluation on real PBC images and a briefly trained CNN: the scores equal
what the model's own predictions give, the files round-trip, and timings stay out of the version."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.core.storage import fingerprint
from bc_pipeline.evaluation.evaluate import (
    TIMINGS,
    EvaluationSettings,
    ModelEvaluation,
    evaluate_model,
    without_timings,
    write_evaluation,
)
from bc_pipeline.evaluation.interpret import TTA_VIEWS
from bc_pipeline.training.model_folder import ModelRecord, TrainedModel
from bc_pipeline_tests.conftest import load_pbc96_arrays, training_facts

NAME = "tiny_cnn"
PER_CLASS = 12  # 6 train, 2 val, 4 test images per class
CORRUPTIONS = ("gaussian_noise", "pixelate")  # the 'light' preset trains on Gaussian noise, not pixelation
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """96 real images, split per class into train / val / test (48 / 16 / 32)."""
    images, labels = load_pbc96_arrays(per_class=PER_CLASS, seed=5)
    position = np.arange(len(labels)) % PER_CLASS  # the loader returns each class's files together
    parts = {"train": position < 6, "val": (position >= 6) & (position < 8), "test": position >= 8}
    return {split: (images[rows], labels[rows]) for split, rows in parts.items()}


@pytest.fixture(scope="module")
def trained(data) -> TrainedModel:
    """The custom CNN at 32 px after two epochs on the train part (a few seconds on two cores)."""
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec

    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    keras.utils.set_random_seed(0)
    model = build_model(model_spec("custom_cnn", image_size=32), len(CLASS_NAMES))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    fit = model.fit(train_x.astype(np.float32), train_y, validation_data=(val_x.astype(np.float32), val_y),
                    epochs=2, batch_size=16, verbose=0)  # fmt: skip
    history = pd.DataFrame(fit.history).assign(epoch=lambda frame: np.arange(1, len(frame) + 1))
    record = ModelRecord(
        model_name=NAME, class_names=CLASS_NAMES, weights_fingerprint="w", parameters=int(model.count_params()),
        image_size=32, augmentation_policies=("light",),
        training=training_facts(model_spec("custom_cnn", image_size=32), epochs_run=2, train_seconds=1.5, class_weight={0: 1.0}),
    )  # fmt: skip
    return TrainedModel(model=model, history=history, record=record)


@pytest.fixture(scope="module")
def perturbed(data) -> ImageSet:
    """Val and test under two policies: 'strong' (a quarter turn, darker) and 'light' (a mirror)."""
    policies = {
        "strong": lambda x: np.clip(np.rot90(x, 1, axes=(1, 2)).astype(np.int16) - 40, 0, 255).astype(np.uint8),
        "light": lambda x: x[:, :, ::-1].copy(),
    }
    parts, frames = [], []
    for policy, perturb in policies.items():
        for split in ("val", "test"):
            images, labels = data[split]
            parts.append(perturb(images))
            frames.append(pd.DataFrame({"policy": policy, "split": split, "clean_index": np.arange(len(labels)), "label": labels}))
    return ImageSet(images=np.concatenate(parts), manifest=pd.concat(frames, ignore_index=True))


@pytest.fixture(scope="module")
def corruption_set(data) -> ImageSet:
    from bc_pipeline.evaluation.imagenet_c import build_corrupted_set

    images, labels = data["test"]
    built = build_corrupted_set(images, labels, np.arange(len(labels)), corruptions=CORRUPTIONS, severities=(3,), seed=0)
    return ImageSet(images=built.images, manifest=built.manifest)


@pytest.fixture(scope="module")
def evaluated(trained, data, perturbed, corruption_set) -> tuple[ModelEvaluation, list[str]]:
    lines: list[str] = []
    result = evaluate_model(
        trained, name=NAME, test=data["test"], val=data["val"], perturbed=perturbed, corruption_set=corruption_set,
        settings=EvaluationSettings(), log=lines.append,
    )  # fmt: skip
    return result, lines


def _accuracy(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(proba.argmax(axis=1) == labels))


def test_the_default_views_are_the_ones_the_asset_used():
    assert EvaluationSettings().tta_views == ("identity", "flip_lr", "flip_ud", "rotate+10", "rotate-10") == TTA_VIEWS
    assert EvaluationSettings(tta_views=["identity", "flip_lr"]).tta_views == ("identity", "flip_lr")


def test_scores_equal_the_models_own_predictions(evaluated, trained, data, perturbed):
    from bc_pipeline.evaluation.interpret import predict_tta
    from bc_pipeline.models.inference import predict_proba

    result, _ = evaluated
    model, (test_x, test_y) = trained.model, data["test"]
    summary = result.summary
    assert summary["model"] == NAME and summary["test_images"] == len(test_y) == 32
    assert summary["accuracy"] == pytest.approx(_accuracy(predict_proba(model, test_x), test_y))
    assert summary["accuracy_tta"] == pytest.approx(_accuracy(predict_tta(model, test_x, views=TTA_VIEWS), test_y))
    strong_test = ((perturbed.manifest["policy"] == "strong") & (perturbed.manifest["split"] == "test")).to_numpy()
    strong_x, strong_y = perturbed.images[strong_test], perturbed.manifest["label"].to_numpy()[strong_test]
    assert summary["robust_accuracy"] == pytest.approx(_accuracy(predict_proba(model, strong_x), strong_y))
    assert summary["robust_accuracy_tta"] == pytest.approx(_accuracy(predict_tta(model, strong_x), strong_y))
    confusion = np.array(summary["confusion_matrix"])
    assert confusion.sum() == 32 and np.trace(confusion) == round(summary["accuracy"] * 32)
    assert result.per_class["support"].tolist() == [4] * len(CLASS_NAMES)
    assert summary["training"]["version"] == 2 and summary["training"]["training"]["epochs_run"] == 2  # the model's record
    assert summary["parameters"] == trained.record.parameters and summary["image_size"] == 32
    assert (summary["epochs_run"], summary["train_seconds"], summary["device"]) == (2, 1.5, "cpu")


def test_the_robustness_table_has_every_policy_plain_and_only_the_robust_one_with_tta(evaluated):
    table = evaluated[0].robustness
    keys = set(zip(table["policy"], table["split"], table["tta"]))
    plain = {(p, s, False) for p in ("strong", "light") for s in ("val", "test")}
    assert keys == plain | {("strong", "val", True), ("strong", "test", True)}
    assert dict(zip(table["split"], table["images"])) == {"val": 16, "test": 32}
    clean = evaluated[0].summary["accuracy"]
    test_rows = table[(table["split"] == "test") & ~table["tta"]]
    np.testing.assert_allclose(test_rows["drop_from_clean"], clean - test_rows["accuracy"])


def test_the_corruption_benchmark_leaves_out_what_training_saw(evaluated, trained, corruption_set):
    from bc_pipeline.models.inference import predict_proba

    result, _ = evaluated
    hits = predict_proba(trained.model, corruption_set.images).argmax(axis=1) == corruption_set.manifest["label"].to_numpy()
    by_corruption = pd.Series(hits).groupby(corruption_set.manifest["corruption"].to_numpy()).mean()
    assert result.summary["corruptions_seen_in_training"] == ["gaussian_noise"]
    assert result.summary["corruption_accuracy"] == pytest.approx(by_corruption.mean())
    assert result.summary["corruption_accuracy_unseen"] == pytest.approx(by_corruption["pixelate"])
    assert result.corruptions["corruption"].tolist() == list(CORRUPTIONS)


def test_calibration_is_fitted_when_the_model_stored_no_temperature(evaluated):
    summary = evaluated[0].summary
    assert summary["calibration"]["fitted_by"] == "the evaluation, on the validation split"
    assert summary["temperature"] == summary["calibration"]["temperature"] > 0
    assert summary["ece"] == summary["calibration"]["ece"]


def test_log_lines_report_speed_benchmark_tta_and_both_runs(evaluated):
    lines = evaluated[1]
    assert len(lines) == 5
    assert lines[0].startswith(f"{NAME}: 32 test images at ") and lines[0].endswith(" images/s")
    assert lines[1].startswith("corruption benchmark: mCA ")
    assert lines[2] == "test-time augmentation over 5 views (48 perturbed images)"
    assert lines[3].startswith("plain: accuracy ") and lines[4].startswith("tta: accuracy ")
    assert lines[3].endswith(f"robust (strong) {evaluated[0].summary['robust_accuracy']}")


def test_figures_and_report(evaluated):
    result, _ = evaluated
    assert list(result.pngs) == ["confusion_matrix", "training_curves", "reliability", "corruption_heatmap", "gradcam"]
    assert all(png.startswith(PNG) and len(png) > 1000 for png in result.pngs.values())
    report = result.report
    assert report.startswith(f"# bc_pipeline evaluation of {NAME} (test split)")
    for png_name in result.pngs:
        assert f"({png_name}.png)" in report
    assert f"**{result.summary['accuracy']:.4f}**" in report
    assert "| gaussian_noise (seen in training) | noise |" in report


def test_headline_rounds_the_summary_and_the_version_leaves_out_timings(evaluated):
    result, _ = evaluated
    headline, summary = result.headline(), result.summary
    assert headline["accuracy"] == round(summary["accuracy"], 4)
    assert headline["weighted_f1"] == round(summary["weighted"]["f1"], 4)
    assert headline["test_images"] == 32 and headline["inference_images_per_second"] == round(result.images_per_second, 1)
    assert set(headline) >= {"accuracy_tta", "robust_accuracy_tta", "corruption_accuracy_unseen", "ece_scaled", "temperature"}
    assert TIMINGS == ("inference_images_per_second",)
    versioned = result.without_timings()
    assert "inference_images_per_second" not in versioned and versioned == without_timings(summary)
    assert set(summary) - set(versioned) == set(TIMINGS)
    slower = {**summary, "inference_images_per_second": summary["inference_images_per_second"] + 100.0}
    assert fingerprint(without_timings(slower)) == fingerprint(versioned)
    assert fingerprint(without_timings({**summary, "accuracy": 0.0})) != fingerprint(versioned)


def test_written_files_round_trip(evaluated, tmp_path):
    result, _ = evaluated
    paths = write_evaluation(result, tmp_path / "evaluation_report" / NAME)
    tables = ("per_class", "robustness", "corruptions")
    assert set(paths) == {*tables, "metrics", "report", *result.pngs}
    assert all(path.is_file() and path.parent == tmp_path / "evaluation_report" / NAME for path in paths.values())
    for table in tables:
        assert paths[table].name == f"{table}.parquet"
        pd.testing.assert_frame_equal(pd.read_parquet(paths[table]), getattr(result, table))
    stored = json.loads(paths["metrics"].read_text())
    assert stored == json.loads(json.dumps(result.summary))
    assert stored["inference_images_per_second"] == result.summary["inference_images_per_second"]
    report = paths["report"].read_text()
    assert report == result.report and NAME in report
    for png_name, png in result.pngs.items():
        assert paths[png_name].name == f"{png_name}.png" and paths[png_name].read_bytes() == png
    assert not [p for p in paths["report"].parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_without_tta_gradcam_or_benchmark_only_the_plain_scores_remain(trained, data, perturbed):
    lines: list[str] = []
    empty = ImageSet(images=np.zeros((0, 96, 96, 3), np.uint8), manifest=pd.DataFrame(columns=["corruption", "severity", "family", "label"]))
    settings = EvaluationSettings(robust_policy="light", tta=False, gradcam_per_class=0)
    result = evaluate_model(trained, name=NAME, test=data["test"], val=data["val"], perturbed=perturbed,
                            corruption_set=empty, settings=settings, log=lines.append)  # fmt: skip
    summary = result.summary
    assert summary["accuracy_tta"] is None and summary["robust_accuracy_tta"] is None and summary["per_class_tta"] is None
    assert summary["corruption_accuracy"] is None and summary["corruptions"] == [] and summary["robust_policy"] == "light"
    assert list(result.pngs) == ["confusion_matrix", "training_curves", "reliability"]
    assert not result.robustness["tta"].any() and len(result.robustness) == 4
    assert "with TTA" not in result.report and "ImageNet-C" not in result.report
    assert len(lines) == 3 and lines[2].startswith("plain: accuracy ")
    assert result.headline()["accuracy_tta"] is None


def test_the_library_does_not_import_dagster():
    code = (
        "import sys, bc_pipeline.evaluation.evaluate\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'dagster'], 'dagster imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
