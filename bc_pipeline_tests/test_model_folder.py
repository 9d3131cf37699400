"""The model folder's typed record: written and read in one place, old files still load, bad ones are named.

The two ``data/info_v1_*.json`` files are real ``info.json`` files written by bc_pipeline before the
record was typed (a custom_cnn trained by the worker, and the ensemble partition).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.models.zoo import model_spec
from bc_pipeline.training.model_folder import (
    RECORD_VERSION,
    EpochSelection,
    ModelRecord,
    ModelRecordError,
    TrainedModel,
    read_record,
    record_metadata,
    write_model_folder,
)
from bc_pipeline.training.settings import Phase, TrainingSettings
from bc_pipeline_tests.conftest import training_facts

DATA = Path(__file__).parent / "data"


def test_a_version_1_info_json_of_a_trained_model_loads_with_every_fact():
    raw = json.loads((DATA / "info_v1_custom_cnn.json").read_text())
    record = ModelRecord.from_json(raw)
    assert record.model_name == "custom_cnn" and record.class_names == CLASS_NAMES
    assert (record.weights_fingerprint, record.parameters, record.temperature) == (raw["weights_fingerprint"], raw["parameters"], raw["temperature"])
    assert record.image_size == raw["spec"]["image_size"] and record.augmentation_policies == ()
    assert record.settings == TrainingSettings.from_json(raw["settings"]) and record.settings.template_augmentation
    facts = record.training
    assert facts.spec == model_spec("custom_cnn", image_size=raw["spec"]["image_size"])
    assert facts.phases == (Phase("all", 1e-3, 1, 4, True),) and (facts.epochs_run, facts.best_epoch) == (1, 1)
    assert facts.class_weight[0] == pytest.approx(raw["class_weight"]["0"]) and facts.augmentation_templates == 2
    assert record.ensemble is None and record.train_seconds == raw["train_seconds"]
    assert ModelRecord.from_json(record.to_json()) == record  # and it is written as version 2


def test_a_version_1_info_json_of_the_ensemble_loads_as_an_ensemble():
    record = ModelRecord.from_json(json.loads((DATA / "info_v1_ensemble.json").read_text()))
    assert record.model_name == "ensemble" and record.training is None and record.settings is None
    assert record.ensemble.members == ("custom_cnn", "mobilenetv3small") and record.train_seconds == 46.1
    assert set(record.ensemble.member_fingerprints) == {"custom_cnn", "mobilenetv3small"}
    assert record.temperature_source == "the ensemble's validation predictions" and record.device == "-"


def test_a_record_round_trips_through_a_model_folder(tmp_path):
    import keras

    spec = model_spec("custom_cnn", image_size=32)
    selection = EpochSelection("2-fold cross-validation", (3,), ({"fold": 1, "held_out": 5},), True)
    record = ModelRecord(
        model_name="custom_cnn", class_names=CLASS_NAMES, weights_fingerprint="f" * 32, parameters=123, image_size=32,
        temperature=1.25, temperature_source="out-of-fold predictions", augmentation_policies=("light", "noise"),
        settings=TrainingSettings(epochs=3, phases=(Phase("frozen", 1e-3, 1, 2),)),
        training=training_facts(spec, epochs_run=3, class_weight={0: 0.5, 7: 2.0}, epoch_selection=selection, worker_seconds=9.5),
    )  # fmt: skip
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    history = pd.DataFrame({"epoch": [1, 2, 3], "phase": [1, 1, 1], "val_accuracy": [0.5, 0.7, 0.6]})
    folder = write_model_folder(tmp_path / "m", TrainedModel(model, history, record))
    assert sorted(p.name for p in folder.iterdir()) == ["history.parquet", "info.json", "model.keras"]
    assert json.loads((folder / "info.json").read_text())["version"] == RECORD_VERSION
    assert read_record(folder) == record
    metadata = record_metadata(record, history)
    assert (metadata["best_epoch"], metadata["best_val_accuracy"], metadata["class_weighted"]) == (3, 0.6, True)
    assert (metadata["backbone"], metadata["image_size"], metadata["worker_seconds"]) == ("custom_cnn", 32, 9.5)
    assert (metadata["input_norm"], metadata["norm"]) == ("channel", "batch")  # the registry's, shown on the asset page


def test_records_this_version_cannot_read_are_named_with_what_to_do(tmp_path):
    with pytest.raises(ModelRecordError, match=r"x/info.json: model record version 3 is newer .* update bc_pipeline"):
        ModelRecord.from_json({"version": 3}, where="x/info.json")
    with pytest.raises(ModelRecordError, match=r"a version 2 model record that cannot be read \(KeyError: 'class_names'\)"):
        ModelRecord.from_json({"version": 2, "model_name": "m"})
    with pytest.raises(ModelRecordError, match="not a model record"):
        ModelRecord.from_json(["a list"])
    (tmp_path / "info.json").write_text(json.dumps({"model_name": "old", "class_names": ["a"]}))
    with pytest.raises(ModelRecordError, match=r"ValueError: it has no weights_fingerprint, parameters\); materialize trained_model"):
        read_record(tmp_path)


def test_numpy_values_in_a_record_are_written_as_plain_json():
    record = ModelRecord(model_name="m", class_names=("a",), weights_fingerprint="w", parameters=np.int64(5),
                         image_size=np.int64(32), temperature=np.float32(1.5))  # fmt: skip
    written = record.to_json()
    assert written["parameters"] == 5 and written["temperature"] == 1.5 and json.dumps(written)
