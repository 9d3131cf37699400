"""The raw source's content version, and the drop-folder sensor that observes it when files land."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from bc_pipeline.lib.source_version import MISSING, changed_entries, folder_stamps, snapshot
from bc_pipeline.resources import ImageSource, PipelineStorage
from bc_pipeline.sensors import raw_dataset_sensor
from bc_pipeline_tests.conftest import load_pbc96_arrays


@pytest.fixture(scope="module")
def small_arrays() -> tuple[np.ndarray, np.ndarray]:
    return load_pbc96_arrays(per_class=3, seed=5)


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels)


def test_snapshot_changes_with_content_not_with_timestamps(pbc_subset_dir: Path, tmp_path: Path):
    source = tmp_path / "cells"
    shutil.copytree(pbc_subset_dir, source)
    first = snapshot(source)
    assert first.exists and first.files == 320 and first.bytes > 0

    some = sorted(source.rglob("*.jpg"))
    os.utime(some[0], (1, 1))
    some[1].touch()
    (source / ".DS_Store").write_bytes(b"finder noise")
    assert snapshot(source).version == first.version, "timestamps and hidden files do not count"

    shutil.copy(some[0], some[0].with_name("new_" + some[0].name))
    added = snapshot(source)
    assert added.version != first.version and added.files == 321
    some[0].with_name("new_" + some[0].name).unlink()
    assert snapshot(source).version == first.version, "removing the image restores the version"

    relabelled = next(file for file in some if file.parent.name != "platelet")
    relabelled.rename(source / "platelet" / relabelled.name)
    moved = snapshot(source)
    assert moved.version != first.version, "an image moved to another class is a change"

    edited = next(file for file in some[3:] if file.exists())
    data = bytearray(edited.read_bytes())
    data[-10] ^= 0xFF
    edited.write_bytes(bytes(data))
    assert snapshot(source).version not in {first.version, moved.version}


def test_snapshot_of_a_file_and_of_nothing(small_arrays, tmp_path: Path):
    images, labels = small_arrays
    _write_npz(tmp_path / "a.npz", images, labels)
    version = snapshot(tmp_path / "a.npz").version
    shutil.copy(tmp_path / "a.npz", tmp_path / "b.npz")
    assert snapshot(tmp_path / "b.npz").version == version, "same bytes, same version, whatever the name"
    assert snapshot(tmp_path / "missing.npz").version == MISSING
    assert not snapshot(tmp_path / "empty_dir").exists


def test_folder_stamps_report_added_removed_and_rewritten_files(tmp_path: Path):
    (tmp_path / "x.npz").write_bytes(b"1")
    before = folder_stamps(tmp_path)
    (tmp_path / "y.npz").write_bytes(b"2")
    os.utime(tmp_path / "x.npz", ns=(10**9, 10**9))
    after = folder_stamps(tmp_path)
    assert changed_entries(before, after) == ["x.npz", "y.npz"]
    (tmp_path / "y.npz").unlink()
    assert changed_entries(after, folder_stamps(tmp_path)) == ["y.npz"]
    assert folder_stamps(tmp_path / "absent") == {}


class DropFolder:
    """Runs the sensor as the daemon would: same resources, cursor carried between ticks."""

    def __init__(self, data_dir: Path, source: ImageSource):
        self.resources = {"image_source": source, "storage": PipelineStorage(data_dir=str(data_dir))}
        self.cursor: str | None = None

    def tick(self):
        context = dg.build_sensor_context(cursor=self.cursor, resources=self.resources)
        result = raw_dataset_sensor(context)
        self.cursor = context.cursor
        return result


def test_drop_sensor_observes_the_source_when_its_file_lands_or_changes(small_arrays, tmp_path: Path):
    images, labels = small_arrays
    raw = tmp_path / "data" / "raw"
    target = raw / "training_set.npz"
    drop = DropFolder(tmp_path / "data", ImageSource(kind="npz", path=str(target)))

    first = drop.tick()
    assert isinstance(first, dg.SkipReason) and "nothing new" in first.skip_message

    _write_npz(target, images, labels)
    request = drop.tick()
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == f"raw-source-{snapshot(target).version}"
    assert isinstance(drop.tick(), dg.SkipReason), "no second request for the same file"

    os.utime(target, ns=(10**9, 10**9))
    touched = drop.tick()
    assert isinstance(touched, dg.SkipReason) and "content unchanged" in touched.skip_message

    _write_npz(raw / "other_batch.npz", images[:4], labels[:4])
    other = drop.tick()
    assert isinstance(other, dg.SkipReason)
    assert "other_batch.npz" in other.skip_message and "BC_SOURCE_PATH" in other.skip_message

    _write_npz(target, images[::-1], labels[::-1])
    again = drop.tick()
    assert isinstance(again, dg.RunRequest) and again.run_key != request.run_key


def test_drop_sensor_watches_a_class_folder_source_below_raw(pbc_subset_dir: Path, tmp_path: Path):
    source = tmp_path / "data" / "raw" / "cells"
    shutil.copytree(pbc_subset_dir, source)
    drop = DropFolder(tmp_path / "data", ImageSource(kind="folder", path=str(source)))
    assert isinstance(drop.tick(), dg.RunRequest), "the first look observes what is there"
    assert isinstance(drop.tick(), dg.SkipReason)
    one = sorted(source.rglob("*.jpg"))[0]
    shutil.copy(one, one.with_name("added_" + one.name))
    assert isinstance(drop.tick(), dg.RunRequest)
