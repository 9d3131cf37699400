"""The ensemble partition: averaged probabilities, saved and reloaded, Grad-CAM, calibration, bad requests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.training.ensemble import EnsembleError, assemble_ensemble, build_ensemble, choose_members, ensemble_members


@pytest.fixture(scope="module")
def members():
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec

    keras.utils.set_random_seed(1)
    first = build_model(model_spec("custom_cnn", image_size=32), len(CLASS_NAMES))
    second = build_model(model_spec("mobilenetv3small", image_size=32), len(CLASS_NAMES))
    return {"custom_cnn": first, "mobilenetv3small": second}


def test_the_ensemble_averages_its_members_and_survives_a_save(members, pbc_subset_arrays, tmp_path):
    import keras

    from bc_pipeline.evaluation.interpret import grad_cam, predict_tta
    from bc_pipeline.models.inference import predict_proba

    images = pbc_subset_arrays[0][:24]
    ensemble = build_ensemble(members)
    expected = np.mean([predict_proba(m, images) for m in members.values()], axis=0)
    np.testing.assert_allclose(predict_proba(ensemble, images), expected, atol=1e-5)
    ensemble.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(predict_proba(loaded, images), expected, atol=1e-5)
    assert [m.name for m in ensemble_members(loaded)] == ["member_custom_cnn", "member_mobilenetv3small"]
    assert predict_tta(loaded, images[:4], views=("identity", "flip_lr")).shape == (4, len(CLASS_NAMES))
    classes = expected.argmax(1)[:4]
    maps = grad_cam(loaded, images[:4], classes)
    member_maps = [grad_cam(m, images[:4], classes) for m in members.values()]
    assert maps.shape == (4, 96, 96) and maps.max() <= 1.0
    mean = np.mean(member_maps, axis=0)
    peaks = mean.reshape(4, -1).max(1)
    np.testing.assert_allclose(maps[peaks > 0], (mean / np.where(peaks > 0, peaks, 1)[:, None, None])[peaks > 0], atol=1e-5)


def test_members_are_chosen_from_what_is_trained():
    assert choose_members([], ["custom_cnn", "resnet50", "ensemble"]) == ["custom_cnn", "resnet50"]
    assert choose_members(["resnet50", "custom_cnn"], ["custom_cnn", "resnet50"]) == ["resnet50", "custom_cnn"]
    with pytest.raises(EnsembleError, match="convnext_tiny are not trained"):
        choose_members(["convnext_tiny", "custom_cnn"], ["custom_cnn", "resnet50"])
    with pytest.raises(EnsembleError, match="at least 2 trained models, found custom_cnn"):
        choose_members([], ["custom_cnn"])


def test_assembled_from_stored_models_with_a_temperature(members, pbc_subset_arrays, tmp_path):
    from bc_pipeline.models.inference import weights_fingerprint
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.model_folder import ModelRecord, TrainedModel, read_record, write_model_folder
    from bc_pipeline_tests.conftest import training_facts

    for name, model in members.items():
        record = ModelRecord(
            model_name=name, class_names=CLASS_NAMES, weights_fingerprint=weights_fingerprint(model),
            parameters=int(model.count_params()), image_size=32, temperature=1.0,
            augmentation_policies=("light",) if name == "custom_cnn" else ("augmix",),
            training=training_facts(model_spec(name, image_size=32), train_seconds=10.0),
        )  # fmt: skip
        write_model_folder(tmp_path / name, TrainedModel(model, pd.DataFrame({"epoch": [1]}), record))
    images, labels = pbc_subset_arrays
    result = assemble_ensemble(tmp_path, [], images[:64], labels[:64])
    record = result.record
    assert record.ensemble.members == ("custom_cnn", "mobilenetv3small") and record.training is None
    assert record.augmentation_policies == ("augmix", "light") and record.train_seconds == 20.0
    assert 0.05 <= record.temperature <= 20 and record.class_names == CLASS_NAMES
    assert record.ensemble.member_fingerprints["custom_cnn"] == read_record(tmp_path / "custom_cnn").weights_fingerprint
    assert len(result.history) == 0
