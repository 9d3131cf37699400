"""Training: config, schedules (phases, rates), losses, optimizers, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bc_pipeline.defs.assets.training import PhaseConfig, TrainingConfig
from bc_pipeline.preparation.balancing import class_weights
from bc_pipeline.training.worker.fit import Phase, TrainingSettings


def test_the_training_config_is_derived_from_the_one_schema():
    """TrainingConfig and PhaseConfig mirror training.settings field by field: defaults, bounds, descriptions."""
    import dataclasses

    for settings_class, config_class in ((TrainingSettings, TrainingConfig), (Phase, PhaseConfig)):
        fields = config_class.model_fields
        for field in dataclasses.fields(settings_class):
            expected = [] if isinstance(field.default, tuple) else field.default
            assert fields[field.name].default == expected, field.name
            assert fields[field.name].description == field.metadata.get("description"), field.name
    assert PhaseConfig().epochs == Phase().epochs == 13  # the two once disagreed (5 and 13)
    with pytest.raises(ValueError):
        TrainingConfig(cv_folds=21)  # le=20, declared in training.settings only
    with pytest.raises(ValueError):
        TrainingConfig(lr_schedule="linear")


def test_balanced_class_weights_equalise_class_mass():
    labels = np.array([0] * 60 + [1] * 30 + [3] * 10)
    weights = class_weights(labels, num_classes=4)
    assert set(weights) == {0, 1, 3}
    mass = {c: weights[c] * np.sum(labels == c) for c in weights}
    assert np.allclose(list(mass.values()), len(labels) / 3)


def test_config_maps_onto_every_training_setting():
    config = TrainingConfig(
        epochs=3, learning_rate=0.01, augment=False, optimizer="lion", loss="focal",
        phases=[PhaseConfig(trainable="frozen", epochs=2), PhaseConfig(trainable="last:10", learning_rate=1e-4)],
    )  # fmt: skip
    settings = config.settings()
    assert isinstance(settings, TrainingSettings)
    assert (settings.epochs, settings.learning_rate, settings.augment) == (3, 0.01, False)
    assert (settings.optimizer, settings.loss) == ("lion", "focal")
    assert settings.phases == (Phase("frozen", 1e-3, 2, 4), Phase("last:10", 1e-4, Phase().epochs, 4))  # one default: training.settings
    assert TrainingConfig().settings() == TrainingSettings()
    assert config.spec("resnet50").image_size == 96 and TrainingConfig(image_size=48).spec("resnet50").image_size == 48
    with pytest.raises(Exception):
        TrainingConfig(image_size=16)


def test_default_schedule_is_one_phase_from_scratch_and_three_when_pretrained(tmp_path):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import default_phases

    settings = TrainingSettings(epochs=9, learning_rate=1e-3)
    assert default_phases(model_spec("custom_cnn"), settings) == (Phase("all", 1e-3, 9, 4),)
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"x")
    phases = default_phases(model_spec("resnet50", weights=str(weights)), settings)
    assert [p.trainable for p in phases] == ["frozen", "last:30%", "all"]
    assert [p.learning_rate for p in phases] == pytest.approx([1e-3, 1e-4, 1e-5])
    assert sum(p.epochs for p in phases) == 9


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_down_weights_easy_examples():
    from bc_pipeline.training.worker.fit import make_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 8)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.eye(8, dtype=np.float32)[rng.integers(0, 8, 64)]
    cross_entropy = float(make_loss("categorical_crossentropy")(labels, probabilities))
    assert float(make_loss("focal", gamma=0.0, label_smoothing=0.0)(labels, probabilities)) == pytest.approx(cross_entropy, rel=1e-5)
    assert float(make_loss("focal", gamma=2.0)(labels, probabilities)) < cross_entropy
    smoothed = float(make_loss("categorical_crossentropy", label_smoothing=0.1)(labels, probabilities))
    assert float(make_loss("focal", gamma=0.0, label_smoothing=0.1)(labels, probabilities)) == pytest.approx(smoothed, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("hinge")


def _stops_at(losses: list[float], patience: int) -> int | None:
    from bc_pipeline.training.worker.checkpoint import TrainingState

    state = TrainingState()
    state.start_phase()
    for epoch, loss in enumerate(losses, start=1):
        state.record_epoch(epoch, {"epoch": epoch, "phase": 1, "val_loss": loss}, loss, patience)
        if state.phase_stopped:
            return epoch
    return None


def test_one_lucky_validation_epoch_does_not_end_a_run_that_is_still_learning():
    # Epoch 3 dips far below its neighbours (a noisy validation pass), then the loss keeps falling
    # more slowly: the raw minimum would stop at epoch 6 with patience 3; the 3-epoch mean does not.
    learning = [1.0, 0.9, 0.5, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.58]
    assert _stops_at(learning, patience=3) is None
    # A real rise still stops the phase, one epoch later than the raw loss would.
    diverging = [1.0, 0.8, 0.7, 0.9, 1.0, 1.1, 1.2, 1.3]
    assert _stops_at(diverging, patience=3) == 7
    # New raw lows between high epochs keep it going although their mean does not fall: never
    # earlier than the raw rule (which would not stop here).
    see_saw = [1.0, 0.5, 1.6, 0.45, 1.7, 0.44, 1.8, 0.43]
    assert _stops_at(see_saw, patience=2) is None
    # A checkpoint written before the smoothed loss existed still resumes.
    from bc_pipeline.training.worker.checkpoint import TrainingState

    saved = TrainingState(phase=1, best_val_loss=0.4, wait=2).to_json()
    del saved["best_smoothed_loss"]
    assert TrainingState.from_json(saved).wait == 2


def test_optimizers_cyclical_and_cosine_rates():
    from bc_pipeline.training.worker.callbacks import cosine_rate, cyclical_rate
    from bc_pipeline.training.worker.fit import make_optimizer

    assert [type(make_optimizer(n, 1e-3, 1e-4)).__name__ for n in ("adam", "adamw", "lion")] == ["Adam", "AdamW", "Lion"]
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", 1e-3)
    rates = [cyclical_rate(step, 0.1, 1.0, period=10) for step in range(21)]
    assert rates[0] == pytest.approx(0.1) and rates[5] == pytest.approx(1.0) and rates[10] == pytest.approx(0.1)
    assert rates[:11] == pytest.approx(rates[10:])
    cosine = [cosine_rate(step, 1.0, total=10) for step in range(13)]
    assert cosine[0] == pytest.approx(1.0) and cosine[5] == pytest.approx(0.5) and cosine[10:] == pytest.approx([0.0] * 3)
    assert all(later < earlier for earlier, later in zip(cosine[:10], cosine[1:11])), "falls at every step of the phase"
    assert cosine[1] > 0.97 and cosine[9] < 0.03, "slow at both ends: most steps near the top or the bottom"


def _subset(per_class: int = 40):
    from bc_pipeline_tests.conftest import load_pbc96_arrays

    images, labels = load_pbc96_arrays(per_class=per_class, seed=3)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(order))
    return images[order[:cut]], labels[order[:cut]], images[order[cut:]], labels[order[cut:]]


@pytest.mark.slow
def test_training_learns_a_real_subset_and_logs_each_epoch():
    from bc_pipeline.models.inference import predict_proba
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, train_classifier

    train_x, train_y, val_x, val_y = _subset(per_class=40)
    lines: list[str] = []
    result = train_classifier(
        TrainingData(train_x, train_y, val_x, val_y, num_classes=8), model_spec("custom_cnn"),
        TrainingSettings(epochs=8, batch_size=32, patience=20), RunOptions(log=lines.append),
    )  # fmt: skip
    epochs = [line.split(":")[0] for line in lines if line.startswith("epoch")]
    assert epochs == [f"epoch {i} (phase 1)" for i in range(1, 9)]
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    assert list(result.history["epoch"]) == list(range(1, 9)) and set(result.history["phase"]) == {1}
    # Inference-mode accuracy, well above chance (0.125) after 8 short epochs on 256 images (measured 0.60-0.64 / 0.52-0.55).
    assert (predict_proba(result.model, train_x).argmax(1) == train_y).mean() > 0.5
    assert (predict_proba(result.model, val_x).argmax(1) == val_y).mean() > 0.35


@pytest.mark.slow
def test_a_frozen_phase_trains_only_the_head_and_the_next_phase_unfreezes():
    import keras

    from bc_pipeline.models.zoo import build_model, model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, train_classifier

    train_x, train_y, val_x, val_y = _subset()
    data = TrainingData(train_x, train_y, val_x, val_y, num_classes=8)
    spec = model_spec("custom_cnn")
    keras.utils.set_random_seed(0)
    initial = build_model(spec, 8)
    frozen_only = TrainingSettings(phases=(Phase("frozen", 1e-3, 1, 5),), batch_size=32, lr_schedule="constant")
    result = train_classifier(data, spec, frozen_only, RunOptions(log=lambda _: None))
    for before, after in zip(initial.get_layer("backbone").get_weights(), result.model.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(before, after)
    head_changed = [not np.array_equal(b, a) for b, a in
                    zip(initial.get_layer("head").get_weights(), result.model.get_layer("head").get_weights())]  # fmt: skip
    assert any(head_changed)

    lines: list[str] = []
    two = TrainingSettings(phases=(Phase("frozen", 1e-3, 1, 5), Phase("last:4", 1e-3, 1, 5)), batch_size=32)
    result = train_classifier(data, spec, two, RunOptions(log=lines.append))
    changed = [not np.array_equal(b, a) for b, a in
               zip(initial.get_layer("backbone").get_weights(), result.model.get_layer("backbone").get_weights())]  # fmt: skip
    # Blocks 0-3 (conv kernel, bn gamma/beta/mean/variance each) stay; the last block trained.
    assert changed[:20] == [False] * 20 and any(changed[20:])
    assert [line.split(":")[0] for line in lines if line.startswith("phase")] == ["phase 1", "phase 2"]
    assert list(result.history["phase"]) == [1, 2] and list(result.history["epoch"]) == [1, 2]


class _Interrupted(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phases", "saved"),
    [((Phase("all", 1e-3, 4, 9),), 2), ((Phase("frozen", 1e-3, 2, 9), Phase("all", 1e-4, 2, 9)), 2)],
    ids=["mid-phase", "between-phases"],
)
def test_an_interrupted_training_resumes_after_its_last_saved_epoch(tmp_path, phases, saved):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, train_classifier

    train_x, train_y, val_x, val_y = _subset(per_class=20)  # what is saved and resumed, not what is learnt
    data = TrainingData(train_x, train_y, val_x, val_y, num_classes=8)
    settings = TrainingSettings(phases=phases, batch_size=32, lr_schedule="constant")
    spec = model_spec("custom_cnn")
    checkpoints = tmp_path / "checkpoints"

    def killed(event) -> None:  # noqa: ANN001 - the run dies as epoch `saved` ends (its event follows its checkpoint)
        if event.kind == "epoch" and event.values["epoch"] == saved:
            raise _Interrupted(event.text())

    with pytest.raises(_Interrupted):
        train_classifier(data, spec, settings, RunOptions(checkpoint_dir=checkpoints, events=killed))
    assert (checkpoints / "state.json").is_file()
    events: list = []
    result = train_classifier(data, spec, settings, RunOptions(checkpoint_dir=checkpoints, events=events.append))
    assert [e.values["epoch"] for e in events if e.kind == "resumed"] == [saved]
    assert [e.values["epoch"] for e in events if e.kind == "epoch"] == list(range(saved + 1, 5))  # 1..saved not run again
    assert list(result.history["epoch"]) == [1, 2, 3, 4]
    assert result.facts.resumed_from_epoch == saved
    assert not checkpoints.exists()  # cleared once training completed


@pytest.mark.slow
def test_a_checkpoint_made_with_other_settings_is_discarded_not_resumed(tmp_path):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, train_classifier

    train_x, train_y, val_x, val_y = _subset(per_class=20)
    data, spec, checkpoints = TrainingData(train_x, train_y, val_x, val_y, num_classes=8), model_spec("custom_cnn"), tmp_path / "c"
    phases = (Phase("all", 1e-3, 3, 9),)

    def killed(event) -> None:  # noqa: ANN001
        if event.kind == "epoch" and event.values["epoch"] == 2:
            raise _Interrupted(event.text())

    with pytest.raises(_Interrupted):
        train_classifier(data, spec, TrainingSettings(phases=phases, batch_size=32), RunOptions(checkpoint_dir=checkpoints, events=killed))
    other: list[str] = []  # without an events callback, the events are log lines
    train_classifier(data, spec, TrainingSettings(phases=phases, batch_size=32, seed=1),
                     RunOptions(checkpoint_dir=checkpoints, log=other.append))  # fmt: skip
    assert any("discarding the checkpoint" in line and "other data or settings" in line for line in other)
    assert [int(line.split()[1]) for line in other if line.startswith("epoch")] == [1, 2, 3]


def test_template_augmentation_blends_a_recovered_template_with_a_bounded_weight():
    from bc_pipeline.training.worker.data import blend_templates

    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, size=(2, 8, 8, 3)).astype(np.float32)
    images = rng.integers(0, 256, size=(200, 8, 8, 3)).astype(np.uint8)
    out = blend_templates(images, templates, np.random.default_rng(1), probability=1.0, max_weight=0.3)
    assert out.dtype == np.uint8
    weights = []
    for image, blended in zip(images.astype(np.float32), out.astype(np.float32)):
        # out = round((1 - w) x + w T_k) for one k: solve w for each template, keep the exact one.
        fits = []
        for template in templates:
            d = (template - image).ravel()
            w = float(((blended - image).ravel() @ d) / (d @ d))
            fits.append((np.abs(image + w * (template - image) - blended).max(), w))
        error, w = min(fits)
        assert error <= 0.6  # rounding to uint8 (0.5), plus w fitted to the rounded pixels
        weights.append(w)
    assert -0.01 <= min(weights) and max(weights) <= 0.3 + 0.01 and np.std(weights) > 0.05
    never = blend_templates(images, templates, np.random.default_rng(1), probability=0.0, max_weight=0.3)
    np.testing.assert_array_equal(never, images)


def test_template_augmentation_is_off_by_default_and_skipped_without_templates():
    from bc_pipeline.models.zoo import build_model, model_spec
    from bc_pipeline.training.worker.fit import _templates_for

    assert TrainingConfig().template_augmentation is False
    model = build_model(model_spec("custom_cnn"), 8)
    lines: list[str] = []
    on = TrainingSettings(template_augmentation=True)
    assert _templates_for(model, np.zeros((0, 96, 96, 3), np.uint8), on, lines.append) is None
    assert "no corruption templates" in lines[-1]
    resized = _templates_for(model, np.zeros((2, 96, 96, 3), np.uint8), on, lines.append)
    assert resized.shape == (2, 32, 32, 3)
    assert _templates_for(model, np.zeros((2, 96, 96, 3), np.uint8), TrainingSettings(), lines.append) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "schedule", "expected"),
    [
        ("lion", "exponential", lambda epoch, steps: 1e-3 * 0.5**epoch),
        # The rate after an epoch's last batch: step (epoch + 1) * steps - 1 of a 1-epoch triangle.
        ("adamw", "cyclical", lambda epoch, steps: 1e-4 + (1e-3 - 1e-4) * (1 - abs(2 * ((steps - 1) / steps) - 1))),
        # The rate of each epoch's last batch on half a cosine over the phase's 3 epochs.
        ("adam", "cosine", lambda epoch, steps: 0.5e-3 * (1 + math.cos(math.pi * ((epoch + 1) * steps - 1) / (3 * steps)))),
    ],
)
def test_rate_schedules_and_optimizers_drive_a_real_training(optimizer, schedule, expected):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData, train_classifier

    train_x, train_y, val_x, val_y = _subset(per_class=16)
    settings = TrainingSettings(
        phases=(Phase("all", 1e-3, 3, 9),), batch_size=32, optimizer=optimizer, lr_schedule=schedule, lr_decay=0.5,
        cycle_epochs=1, cycle_min_factor=0.1, loss="focal", label_smoothing=0.1,
    )  # fmt: skip
    result = train_classifier(TrainingData(train_x, train_y, val_x, val_y, num_classes=8), model_spec("custom_cnn"),
                              settings, RunOptions(log=lambda _: None))  # fmt: skip
    steps = -(-len(train_x) // 32)
    assert result.history["lr"].tolist() == pytest.approx([expected(e, steps) for e in range(3)], rel=1e-4)
    assert np.isfinite(result.history["loss"]).all()


def test_the_reported_best_epoch_is_the_one_the_final_weights_come_from():
    import pandas as pd

    from bc_pipeline.training.worker.fit import best_epoch

    # Phase 1's epoch 1 has the lowest loss, but phase 2 restored its own best (epoch 4).
    two_phases = pd.DataFrame({"epoch": [1, 2, 3, 4, 5], "phase": [1, 1, 2, 2, 2], "val_loss": [0.1, 0.5, 0.4, 0.3, 0.35]})
    assert best_epoch(two_phases) == 4
    assert best_epoch(pd.DataFrame({"epoch": [1, 2, 3], "val_loss": [0.3, 0.1, 0.2]})) == 2
