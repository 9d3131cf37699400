"""The raw source's content version, and the drop-folder sensor that observes it when files land."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from bc_pipeline.defs.resources import ImageSource, PipelineStorage
from bc_pipeline.defs.sensors import raw_data_sensor
from bc_pipeline.ingest.source_version import MISSING, changed_entries, folder_stamps, snapshot
from bc_pipeline_tests.conftest import load_pbc96_arrays, tick_sensor


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


class SensorTicks:
    """Runs raw_data_sensor as the daemon would: same resources and instance, cursor carried over,
    and its observations recorded in the instance."""

    def __init__(self, data_dir: Path, source: ImageSource, instance: dg.DagsterInstance):
        self.resources = {"image_source": source, "storage": PipelineStorage(data_dir=str(data_dir))}
        self.instance = instance
        self.cursor: str | None = None

    def tick(self):
        result, self.cursor = tick_sensor(raw_data_sensor, self.instance, self.cursor, self.resources)
        return result

    def versions(self) -> list[str]:
        records = self.instance.fetch_observations(dg.AssetKey("raw_image_source"), limit=100).records
        return [r.asset_observation.tags["dagster/data_version"] for r in reversed(records)]


def _observed(result) -> str:
    assert isinstance(result, dg.SensorResult), result
    (event,) = result.asset_events
    assert isinstance(event, dg.AssetObservation) and event.asset_key == dg.AssetKey("raw_image_source")
    return event.tags["dagster/data_version"]


def test_sensor_observes_the_source_when_its_content_changes_not_when_touched(small_arrays, tmp_path: Path):
    images, labels = small_arrays
    raw = tmp_path / "data" / "raw"
    target = raw / "training_set.npz"
    with dg.instance_for_test() as instance:
        ticks = SensorTicks(tmp_path / "data", ImageSource(kind="npz", path=str(target)), instance)
        first = ticks.tick()
        assert isinstance(first, dg.SkipReason) and "watching" in first.skip_message, "a baseline, no rebuild unasked"

        _write_npz(target, images, labels)
        assert _observed(ticks.tick()) == snapshot(target).version, "the file landed"
        assert isinstance(ticks.tick(), dg.SkipReason), "no second observation of the same content"

        os.utime(target, ns=(10**9, 10**9))
        touched = ticks.tick()
        assert isinstance(touched, dg.SkipReason) and "no change" in touched.skip_message

        _write_npz(raw / "other_batch.npz", images[:4], labels[:4])
        other = ticks.tick()
        assert isinstance(other, dg.SkipReason)
        assert "other_batch.npz" in other.skip_message and "BC_SOURCE_PATH" in other.skip_message

        _write_npz(target, images[::-1], labels[::-1])
        second = _observed(ticks.tick())
        versions = ticks.versions()
        assert len(versions) == 2 and versions[-1] == second != versions[0], "one observation per content change"


def test_sensor_catches_changes_made_while_it_was_not_running(pbc_subset_dir: Path, tmp_path: Path):
    source = tmp_path / "data" / "raw" / "cells"
    shutil.copytree(pbc_subset_dir, source)
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(  # an observation from an earlier session (make run, say)
            dg.AssetObservation("raw_image_source", tags={"dagster/data_version": snapshot(source).version})
        )
        one = sorted(source.rglob("*.jpg"))[0]
        shutil.copy(one, one.with_name("added_" + one.name))  # while the daemon was down
        fresh = SensorTicks(tmp_path / "data", ImageSource(kind="folder", path=str(source)), instance)
        assert _observed(fresh.tick()) == snapshot(source).version, "the first tick compares with the instance"
        assert isinstance(fresh.tick(), dg.SkipReason)
