"""Epoch selection: grouped stratified folds, row selection across stored copies, k-fold + retrain."""

from __future__ import annotations

import numpy as np
import pytest

from bc_pipeline.core.folds import fold_assignment
from bc_pipeline.training.worker.fit import Phase, TrainingSettings
from bc_pipeline.training.worker.selection import epochs_to_best, fixed_schedule, select_rows


def test_folds_keep_groups_together_and_classes_even():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(300), rng.integers(1, 4, size=300))  # oversampled repeats share a group
    labels = (groups % 5 == 0).astype(int) + (groups % 7 == 0).astype(int) * 2
    folds = fold_assignment(labels, groups, 4, seed=1)
    assert np.array_equal(folds, fold_assignment(labels, groups, 4, seed=1))
    for group in np.unique(groups):
        assert len(np.unique(folds[groups == group])) == 1, "a group never straddles two folds"
    for label in np.unique(labels):
        group_counts = [len(np.unique(groups[(labels == label) & (folds == f)])) for f in range(4)]
        assert max(group_counts) - min(group_counts) <= 1, (label, group_counts)


def test_rows_are_taken_from_the_set_and_from_every_copy_across_shards():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    labels = np.arange(10) % 3
    copy0 = [(images[:6] + 100, labels[:6]), (images[6:] + 100, labels[6:])]  # one copy in two shards
    copy1 = [(images + 200, labels)]
    x, y, copies = select_rows(images, labels, copy0 + copy1, np.array([1, 7]))
    assert x[:, 0, 0, 0].tolist() == [1, 7] and y.tolist() == [1, 1]
    assert [c[0][:, 0, 0, 0].tolist() for c in copies] == [[101, 107], [201, 207]]
    with pytest.raises(ValueError, match="whole number of copies"):
        select_rows(images, labels, copy0[:1], np.array([1]))


def test_epoch_counts_per_phase_and_the_fixed_schedule():
    import pandas as pd

    history = pd.DataFrame({"phase": [1, 1, 1, 2, 2, 2, 2], "val_loss": [0.9, 0.5, 0.6, 0.7, 0.4, 0.3, 0.35]})
    assert epochs_to_best(history) == [2, 3]
    fixed = fixed_schedule((Phase("frozen", 1e-3, 9, 2), Phase("all", 1e-4, 9, 2)), [2, 3])
    assert [(p.epochs, p.restore_best) for p in fixed] == [(2, False), (3, False)]
    assert all(p.patience > p.epochs for p in fixed), "no early stop in a fixed run"


@pytest.mark.slow
def test_kfold_chooses_the_count_and_the_final_model_trains_on_train_plus_validation():
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.selection import train_with_epoch_selection
    from bc_pipeline_tests.conftest import load_pbc96_arrays

    images, labels = load_pbc96_arrays(per_class=12, seed=3)
    val = np.arange(len(labels)) % 4 == 0
    train_x, train_y, val_x, val_y = images[~val], labels[~val], images[val], labels[val]
    groups = np.arange(len(train_y)) // 2  # pairs of rows from one source image
    copy = [(np.ascontiguousarray(train_x[:, ::-1]), train_y.copy())]  # one stored copy (flipped), row-aligned
    settings = TrainingSettings(epochs=3, patience=5, batch_size=16, cv_folds=2, retrain_on_validation=True, lr_schedule="constant")
    lines: list[str] = []
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData

    result = train_with_epoch_selection(
        TrainingData(train_x, train_y, val_x, val_y, num_classes=8, augmented=copy), model_spec("custom_cnn", image_size=32),
        settings, RunOptions(log=lines.append), groups=groups,
    )  # fmt: skip
    chosen = result.facts.epoch_selection
    assert chosen.method == "2-fold cross-validation" and chosen.retrained_on_validation is True
    assert len(chosen.folds) == 2 and sum(f["held_out"] for f in chosen.folds) == len(train_y)
    counts = chosen.epochs_per_phase
    assert counts == (int(np.round(np.median([f["epochs_to_best"][0] for f in chosen.folds]))) or 1,)
    assert len(result.history) == counts[0] and result.facts.best_epoch == counts[0]
    assert result.facts.pool_images == len(train_y) + len(val_y) + len(train_y), "train + val originals + the copy"
    assert 0.05 <= result.temperature <= 20 and result.temperature_source == "out-of-fold predictions"
    assert any(line.startswith("[fold 2]") for line in lines) and any("retraining on train + validation" in line for line in lines)


def test_the_consistency_loss_is_cross_entropy_for_identical_views_and_grows_with_disagreement():
    import keras

    from bc_pipeline.training.worker.consistency import AugMixConsistency

    rng = np.random.default_rng(0)
    clean = rng.dirichlet(np.ones(8), size=5).astype(np.float32)
    labels = np.eye(8, dtype=np.float32)[rng.integers(0, 8, 5)]
    y_true = np.concatenate([labels] * 3)
    loss = AugMixConsistency(weight=12.0)
    same = float(loss(y_true, np.concatenate([clean] * 3)))
    cross_entropy = float(np.mean(-np.log(np.sum(labels * clean, axis=1))))
    assert same == pytest.approx(cross_entropy, rel=1e-4)
    other = rng.dirichlet(np.ones(8), size=5).astype(np.float32)
    assert float(loss(y_true, np.concatenate([clean, other, clean]))) > same + 0.05
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, AugMixConsistency) and restored.weight == 12.0


@pytest.mark.slow
def test_jsd_training_draws_three_aligned_views_and_learns(tmp_path):
    from bc_pipeline.models.zoo import model_spec
    from bc_pipeline.training.worker.data import BatchRecipe, view_batches
    from bc_pipeline.training.worker.fit import train_classifier
    from bc_pipeline_tests.conftest import load_pbc96_arrays

    images, labels = load_pbc96_arrays(per_class=10, seed=5)
    copies = [np.ascontiguousarray(images[:, ::-1]), np.ascontiguousarray(images[:, :, ::-1])]
    batch_x, batch_y = view_batches(images, copies, labels, BatchRecipe(num_classes=8, batch_size=6, seed=0, augment=False))[0]
    assert batch_x.shape[0] == 18 and np.array_equal(batch_y[:6], batch_y[6:12])
    clean = {bytes(x) for x in batch_x[:6]}
    flipped = {(bytes(np.ascontiguousarray(x[::-1])), bytes(np.ascontiguousarray(x[:, ::-1]))) for x in batch_x[6:18]}
    assert all(a in clean or b in clean for a, b in flipped), "every view is a copy of a clean image of the batch"
    settings = TrainingSettings(epochs=2, batch_size=16, consistency_loss="jsd", lr_schedule="constant")
    shards = [(c, labels) for c in copies]
    from bc_pipeline.training.worker.fit import RunOptions, TrainingData

    data = TrainingData(images, labels, images[:16], labels[:16], num_classes=8, augmented=shards)
    result = train_classifier(data, model_spec("custom_cnn", image_size=32), settings, RunOptions(log=lambda _: None))
    assert len(result.history) == 2 and np.isfinite(result.history["loss"]).all()
    with pytest.raises(ValueError, match="set batch_augment none"):
        train_classifier(data, model_spec("custom_cnn", image_size=32),
                         TrainingSettings(consistency_loss="jsd", batch_augment="mixup"))  # fmt: skip
