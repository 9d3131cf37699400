"""Atomic writes (no torn files, no temp leftovers, the old artifact survives a failed write),
content fingerprints, and artifact roundtrips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from bc_pipeline.core.artifacts import ArtifactNotFoundError, ImageSet, read_artifact, write_artifact
from bc_pipeline.core.storage import (
    atomic_path,
    fingerprint,
    save_bytes,
    save_json,
    save_npy,
    save_parquet,
    write_atomic,
)


def _listing(folder: Path) -> list[str]:
    """Every entry below ``folder``, hidden ones included, relative."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _no_temps(folder: Path) -> None:
    leftovers = [name for name in _listing(folder) if ".tmp-" in name]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


@pytest.fixture
def image_set(pbc_subset_arrays) -> ImageSet:
    images, labels = pbc_subset_arrays
    pick = np.arange(0, len(images), 40)  # 8 real images, one per class
    manifest = pd.DataFrame(
        {
            "image_id": [f"id{i}" for i in pick],
            "label": labels[pick].astype(np.int64),
            "source": [f"src/{i}.jpg" for i in pick],
        }
    )
    skipped = pd.DataFrame({"source": ["bad.jpg"], "reason": ["truncated"]})
    duplicates = pd.DataFrame({"index": np.arange(8), "exact_group": np.arange(8) // 2})
    return ImageSet(images=images[pick].copy(), manifest=manifest, tables={"skipped": skipped, "duplicates": duplicates})


# --- atomic writes -----------------------------------------------------------------------------


def test_atomic_path_writes_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out" / "value.txt"  # parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.name.startswith(".value.txt.tmp-")
        tmp.write_text("complete")
        assert not target.exists(), "the target must not appear before the block ends"
    assert target.read_text() == "complete"
    assert _listing(tmp_path / "out") == ["value.txt"]


def test_save_functions_leave_no_temp_files(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)
    frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    save_npy(tmp_path / "a.npy", array)
    save_parquet(tmp_path / "f.parquet", frame)
    save_json(tmp_path / "j.json", {"n": np.int64(3), "v": np.arange(2), "p": Path("/x")})
    save_bytes(tmp_path / "b.bin", b"\x00\x01")
    # Overwriting works the same way.
    save_npy(tmp_path / "a.npy", array * 2)
    save_parquet(tmp_path / "f.parquet", frame.iloc[:2])

    assert _listing(tmp_path) == ["a.npy", "b.bin", "f.parquet", "j.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), array * 2)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f.parquet"), frame.iloc[:2])
    assert json.loads((tmp_path / "j.json").read_text()) == {"n": 3, "v": [0, 1], "p": "/x"}
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_failed_writer_keeps_previous_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.npy"
    save_npy(target, np.arange(5))

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"\x93NUMPY torn")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half_then_fail)

    np.testing.assert_array_equal(np.load(target), np.arange(5))
    assert _listing(tmp_path) == ["data.npy"]


def test_failed_parquet_write_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    good = pd.DataFrame({"x": [1, 2]})
    save_parquet(target, good)
    unwritable = pd.DataFrame({"x": [object(), object()]})  # pyarrow cannot convert these
    with pytest.raises(pa.ArrowInvalid):
        save_parquet(target, unwritable)
    pd.testing.assert_frame_equal(pd.read_parquet(target), good)
    assert _listing(tmp_path) == ["table.parquet"]


def test_failed_writer_without_previous_file_leaves_nothing(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_text("partial")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_atomic(tmp_path / "new.txt", fail)
    assert _listing(tmp_path) == []


def test_failed_image_set_write_keeps_previous_directory(tmp_path: Path, image_set: ImageSet) -> None:
    base = tmp_path / "assets" / "clean_images"
    write_artifact(base, image_set)
    before = _listing(tmp_path)

    # Images and manifest get written into the temporary directory, then a side table fails.
    broken = ImageSet(
        images=image_set.images[::-1].copy(),
        manifest=image_set.manifest.iloc[::-1].reset_index(drop=True),
        tables={"zz_bad": pd.DataFrame({"x": [object()]})},
    )
    with pytest.raises(pa.ArrowInvalid):
        write_artifact(base, broken)

    assert _listing(tmp_path) == before
    _no_temps(tmp_path)
    back = read_artifact(base)
    np.testing.assert_array_equal(back.images, image_set.images)
    pd.testing.assert_frame_equal(back.manifest, image_set.manifest)
    assert sorted(back.tables) == ["duplicates", "skipped"]


def test_image_set_overwrite_replaces_whole_directory(tmp_path: Path, image_set: ImageSet) -> None:
    base = tmp_path / "clean_images"
    write_artifact(base, image_set)
    smaller = ImageSet(images=image_set.images[:3], manifest=image_set.manifest.iloc[:3].reset_index(drop=True))
    write_artifact(base, smaller)

    assert _listing(tmp_path) == ["clean_images", "clean_images/images.npy", "clean_images/manifest.parquet"]
    back = read_artifact(base)
    assert back.images.shape == (3, 96, 96, 3)
    assert back.tables == {}  # the old side tables are gone with the old directory


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_equal_for_equal_content(pbc_subset_arrays) -> None:
    images, _ = pbc_subset_arrays
    a = images[:10]
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) == fingerprint(np.asfortranarray(a))  # memory layout does not matter
    frame = pd.DataFrame({"id": ["a", "b"], "label": [1, 2]})
    assert fingerprint(frame) == fingerprint(frame.copy())
    assert fingerprint(frame) == fingerprint(frame.set_index(pd.Index([10, 11])))  # index ignored
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint("x", a, frame) == fingerprint("x", a.copy(), frame.copy())
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint(a))


def test_fingerprint_changes_with_one_pixel(pbc_subset_arrays) -> None:
    images, _ = pbc_subset_arrays
    a = images[:10].copy()
    b = a.copy()
    b[7, 50, 13, 2] ^= 1
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_changes_with_dtype_shape_and_frames() -> None:
    zeros = np.zeros(12, np.uint8)
    assert fingerprint(zeros) != fingerprint(zeros.view(np.int8))
    assert fingerprint(zeros) != fingerprint(zeros.reshape(3, 4))
    frame = pd.DataFrame({"id": ["a", "b"], "label": [1, 2]})
    assert fingerprint(frame) != fingerprint(frame.assign(label=[1, 3]))
    assert fingerprint(frame) != fingerprint(frame.rename(columns={"label": "y"}))
    assert fingerprint(frame) != fingerprint(frame.iloc[::-1])
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


# --- roundtrips --------------------------------------------------------------------------------


def test_image_set_roundtrip_with_side_tables(tmp_path: Path, image_set: ImageSet) -> None:
    base = tmp_path / "raw_images"
    written = write_artifact(base, image_set)
    assert written == base and base.is_dir()
    assert _listing(base) == ["duplicates.parquet", "images.npy", "manifest.parquet", "skipped.parquet"]

    back = read_artifact(base)

    assert isinstance(back, ImageSet)
    assert back.images.dtype == np.uint8 and back.images.shape == image_set.images.shape
    np.testing.assert_array_equal(back.images, image_set.images)
    pd.testing.assert_frame_equal(back.manifest, image_set.manifest)
    assert sorted(back.tables) == ["duplicates", "skipped"]
    for name, table in image_set.tables.items():
        pd.testing.assert_frame_equal(back.tables[name], table)
    assert fingerprint(np.asarray(back.images), back.manifest) == fingerprint(image_set.images, image_set.manifest)
    _no_temps(tmp_path)


def test_image_set_carries_its_class_names(tmp_path: Path, image_set: ImageSet) -> None:
    """Class names are stored with the images, so a stage downstream reads them from the data."""
    names = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
    write_artifact(tmp_path / "named", ImageSet(image_set.images, image_set.manifest, class_names=names))
    assert read_artifact(tmp_path / "named").class_names == names
    assert json.loads((tmp_path / "named" / "class_names.json").read_text()) == list(names)
    write_artifact(tmp_path / "unnamed", image_set)  # perturbed copies and the like: no names file
    assert read_artifact(tmp_path / "unnamed").class_names == () and not (tmp_path / "unnamed" / "class_names.json").exists()


def test_image_set_rejects_mismatched_manifest(image_set: ImageSet) -> None:
    with pytest.raises(ValueError, match="8 images but 7 manifest rows"):
        ImageSet(images=image_set.images, manifest=image_set.manifest.iloc[:7])


def test_dataframe_roundtrip(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "image_id": pd.Series(["a", "b", "c"], dtype="string"),
            "phash": np.array([1, 2**63 + 5, 0], dtype=np.uint64),
            "split": ["train", "val", "test"],
            "score": [0.5, np.nan, 1.0],
        }
    )
    path = write_artifact(tmp_path / "hashes", frame)
    assert path == tmp_path / "hashes.parquet"
    pd.testing.assert_frame_equal(read_artifact(tmp_path / "hashes"), frame)


def test_ndarray_roundtrip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    path = write_artifact(tmp_path / "logits", array)
    assert path == tmp_path / "logits.npy"
    back = read_artifact(tmp_path / "logits")
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, array)


def test_dict_roundtrip(tmp_path: Path) -> None:
    payload = {"accuracy": np.float64(0.93), "counts": {"train": 10, "test": 2}, "classes": ["a", "b"], "n": np.int64(3)}
    path = write_artifact(tmp_path / "metrics", payload)
    assert path == tmp_path / "metrics.json"
    assert read_artifact(tmp_path / "metrics") == {
        "accuracy": 0.93,
        "counts": {"train": 10, "test": 2},
        "classes": ["a", "b"],
        "n": 3,
    }


def test_unsupported_type_rejected(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no artifact format for set"):
        write_artifact(tmp_path / "thing", {1, 2})
    assert _listing(tmp_path) == []


def test_read_missing_artifact_names_the_path(tmp_path: Path) -> None:
    base = tmp_path / "assets" / "never_made"
    with pytest.raises(ArtifactNotFoundError, match=re.escape(str(base))) as info:
        read_artifact(base, what="clean_images")
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value).startswith("clean_images: nothing stored at ")
    # An empty directory at the path is still "nothing stored".
    base.mkdir(parents=True)
    with pytest.raises(ArtifactNotFoundError, match=re.escape(str(base))):
        read_artifact(base)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize("damaged", ["images.npy", "manifest.parquet", "class_names.json", "counts.parquet"])
def test_a_damaged_image_set_file_names_the_file_and_the_asset_to_rematerialize(tmp_path: Path, image_set: ImageSet, damaged: str) -> None:
    from bc_pipeline.core.artifacts import ArtifactDamagedError

    base = tmp_path / "assets" / "clean_images"
    write_artifact(base, ImageSet(images=image_set.images, manifest=image_set.manifest, class_names=("a", "b"),
                                  tables={"counts": pd.DataFrame({"n": [1, 2]})}))  # fmt: skip
    _truncate(base / damaged)
    with pytest.raises(ArtifactDamagedError) as caught:
        read_artifact(base, what="clean_images")
    message = str(caught.value)
    assert str(base / damaged) in message and "damaged or truncated: materialize clean_images again" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1


@pytest.mark.parametrize("suffix", [".parquet", ".npy", ".json"])
def test_a_damaged_single_file_artifact_is_explained_too(tmp_path: Path, suffix: str) -> None:
    from bc_pipeline.core.artifacts import ArtifactDamagedError

    value = {".parquet": pd.DataFrame({"x": range(100)}), ".npy": np.arange(1000), ".json": {"a": list(range(50))}}[suffix]
    path = write_artifact(tmp_path / "data_splits", value)
    _truncate(path)
    with pytest.raises(ArtifactDamagedError, match=r"data_splits\[custom_cnn\]: .* damaged or truncated: materialize data_splits again"):
        read_artifact(tmp_path / "data_splits", what="data_splits[custom_cnn]")


def test_a_damaged_model_and_a_damaged_checkpoint(tmp_path: Path) -> None:
    import keras

    from bc_pipeline.core.artifacts import ArtifactDamagedError, ModelFolder
    from bc_pipeline.training.model_folder import ModelRecordError, load_trained_model
    from bc_pipeline.training.worker.checkpoint import Checkpoint

    folder = tmp_path / "trained_model" / "custom_cnn"
    folder.mkdir(parents=True)
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(folder / "model.keras")
    pd.DataFrame({"epoch": [1]}).to_parquet(folder / "history.parquet")
    (folder / "info.json").write_text("{}")
    assert read_artifact(folder, what="trained_model[custom_cnn]") == ModelFolder(folder)  # read without Keras
    with pytest.raises(ModelRecordError, match=r"info.json: a version 1 model record .* it has no class_names.* materialize trained_model"):
        load_trained_model(folder)
    (folder / "info.json").write_text('{"class_names": ["a", "b"], "weights_fingerprint": "w", "parameters": 10}')
    assert load_trained_model(folder).record.class_names == ("a", "b")
    (folder / "info.json").write_text('{"class_names": ')
    with pytest.raises(ArtifactDamagedError, match=r"info.json: not valid JSON .* materialize trained_model again"):
        load_trained_model(folder)
    (folder / "info.json").write_text('{"class_names": ["a", "b"], "weights_fingerprint": "w", "parameters": 10}')
    _truncate(folder / "model.keras")
    with pytest.raises(ArtifactDamagedError, match=r"model.keras cannot be read .* materialize trained_model again"):
        load_trained_model(folder)

    checkpoint = tmp_path / "checkpoints"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text('{"key": "k", "model": "epoch')  # cut while copying by hand
    said: list = []
    assert Checkpoint(checkpoint, key="k").load(said.append) is None  # trains from scratch
    assert said[0].kind == "discarded" and "it is damaged (JSONDecodeError" in said[0].values["reason"]
    assert not checkpoint.exists()


# --- a real kill -9 in the middle of a write ----------------------------------------------------

_WRITER = """
import sys
import numpy as np, pandas as pd
from pathlib import Path
from bc_pipeline.core.artifacts import write_artifact
base, kind = Path(sys.argv[1]), sys.argv[2]
rows = 2_000_000
for round in range(1, 1000):
    if kind == "parquet":
        value = pd.DataFrame({"round": np.full(rows, round), "x": np.random.default_rng(round).random(rows)})
    else:
        value = np.full((rows, 8), round, dtype=np.int64)
    write_artifact(base, value)
"""


@pytest.mark.parametrize("kind", ["parquet", "npy"])
def test_a_writer_killed_with_kill_9_mid_write_leaves_the_previous_artifact_loadable(kind: str, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    base = tmp_path / "assets" / "table"
    first = pd.DataFrame({"round": [0, 0], "x": [0.5, 0.25]}) if kind == "parquet" else np.zeros((2, 8), np.int64)
    write_artifact(base, first)
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(base), kind])
    deadline, hit = time.monotonic() + 120, False
    while time.monotonic() < deadline and process.poll() is None:
        if list(base.parent.glob(f".{base.name}.{kind}.tmp-*")):  # a write is under way: kill it there
            os.kill(process.pid, signal.SIGKILL)
            hit = True
            break
        time.sleep(0.005)
    process.wait(timeout=30)
    assert hit, "never saw a write under way"
    stored = read_artifact(base)  # the previous complete artifact (the first, or a later complete round)
    rounds = set(stored["round"]) if kind == "parquet" else set(np.unique(stored))
    assert len(rounds) == 1 and len(stored) in (2, 2_000_000)
    write_artifact(base, first)  # and the next write goes through, left-over temporary file or not
    assert len(read_artifact(base)) == 2
