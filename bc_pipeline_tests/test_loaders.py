"""Loaders: good sources load into RGB uint8 at one size; each kind of bad source or item is
rejected (or skipped and recorded) with a message naming the file or index and the problem.

Images are real PBC images (``pbc_subset_arrays``, ``pbc96_files``) written into small npz files
and class folders under ``tmp_path``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.ingest.loaders import (
    MANIFEST_COLUMNS,
    SKIP_COLUMNS,
    ImageSourceError,
    image_id,
    load_bloodmnist,
    load_folder,
    load_npz,
    load_source,
    to_rgb_square,
)
from bc_pipeline_tests.conftest import pbc96_files


@pytest.fixture(scope="module")
def real(pbc_subset_arrays: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """12 real images spread over all classes (every 27th of the 320, so labels vary)."""
    images, labels = pbc_subset_arrays
    pick = np.arange(0, len(images), 27)[:12]
    return images[pick].copy(), labels[pick].copy()


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _name(path: Path) -> str:
    return re.escape(path.name)


# --- npz: good input ---------------------------------------------------------------------------


def test_npz_good_input_loads_unchanged(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "good.npz", images=images, labels=labels)

    loaded = load_npz(path)

    assert loaded.images.dtype == np.uint8
    assert loaded.images.shape == images.shape
    np.testing.assert_array_equal(loaded.images, images)
    manifest = loaded.manifest
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["label"].tolist() == labels.tolist()
    assert manifest["class_name"].tolist() == [CLASS_NAMES[label] for label in labels]
    assert manifest["source"].tolist() == [f"good.npz[{i}]" for i in range(len(images))]
    assert (manifest["orig_height"] == 96).all() and (manifest["orig_width"] == 96).all()
    assert manifest["image_id"].tolist() == [image_id(img) for img in images]
    assert loaded.skipped.empty and list(loaded.skipped.columns) == SKIP_COLUMNS


def test_npz_labels_n_by_1_accepted(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "col.npz", images=images, labels=labels.reshape(-1, 1).astype(np.uint8))

    loaded = load_npz(path)

    assert loaded.manifest["label"].tolist() == labels.tolist()
    assert loaded.manifest["label"].dtype == np.int64


def test_load_source_dispatches_and_rejects_unknown_kind(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "via_source.npz", images=images, labels=labels)
    assert len(load_source("npz", path).images) == len(images)
    with pytest.raises(ImageSourceError, match="unknown source kind 'zip'"):
        load_source("zip", path)  # type: ignore[arg-type]
    with pytest.raises(ImageSourceError, match="image_size must be at least 8"):
        load_source("npz", path, image_size=4)


# --- npz: bad arrays ---------------------------------------------------------------------------


def test_npz_float_dtype_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "floats.npz", images=images.astype(np.float32) / 255.0, labels=labels)
    with pytest.raises(ImageSourceError, match=_name(path) + r".*dtype is float32, expected uint8"):
        load_npz(path)


@pytest.mark.parametrize(
    "shape",
    [(3, 96, 96, 4), (3, 2, 96, 96, 3), (3, 96), (3, 96, 96, 2)],
    ids=["rgba", "5d", "2d", "2-channels"],
)
def test_npz_wrong_shape_rejected(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = _npz(tmp_path / "shape.npz", images=np.zeros(shape, np.uint8), labels=np.zeros(3, np.int64))
    expected = re.escape(f"shape is {shape}, expected (N, H, W, 3)")
    with pytest.raises(ImageSourceError, match=_name(path) + ".*" + expected):
        load_npz(path)


def test_npz_missing_labels_key_rejected(tmp_path: Path, real) -> None:
    images, _ = real
    path = _npz(tmp_path / "nolabels.npz", images=images, targets=np.zeros(len(images), np.int64))
    with pytest.raises(ImageSourceError, match=_name(path) + r".*no 'labels' array \(found: \['images', 'targets'\]\)"):
        load_npz(path)


def test_npz_missing_images_key_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "noimages.npz", x=images, labels=labels)
    with pytest.raises(ImageSourceError, match=_name(path) + r".*no 'images' array"):
        load_npz(path)


def test_npz_pickled_object_arrays_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    objects = np.empty(len(images), dtype=object)
    for i, img in enumerate(images):
        objects[i] = img
    path = _npz(tmp_path / "pickled.npz", images=objects, labels=labels)
    with pytest.raises(ImageSourceError, match=_name(path) + ".*pickled object arrays"):
        load_npz(path)


def test_npz_label_count_mismatch_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "count.npz", images=images, labels=labels[:-2])
    n = len(images)
    with pytest.raises(ImageSourceError, match=_name(path) + f".*{n - 2} labels for {n} images"):
        load_npz(path)


def test_npz_float_labels_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "flabels.npz", images=images, labels=labels.astype(np.float64))
    with pytest.raises(ImageSourceError, match=_name(path) + ".*labels.*dtype is float64, expected integer"):
        load_npz(path)


def test_npz_labels_wrong_shape_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    path = _npz(tmp_path / "l2d.npz", images=images, labels=np.stack([labels, labels], axis=1))
    with pytest.raises(ImageSourceError, match=_name(path) + r".*labels.*shape is \(12, 2\)"):
        load_npz(path)


def test_npz_label_out_of_range_is_skipped_and_recorded(tmp_path: Path, real) -> None:
    images, labels = real
    bad = labels.copy()
    bad[2] = 8
    bad[5] = -1
    path = _npz(tmp_path / "range.npz", images=images, labels=bad)

    loaded = load_npz(path)

    keep = [i for i in range(len(images)) if i not in (2, 5)]
    np.testing.assert_array_equal(loaded.images, images[keep])
    assert loaded.manifest["source"].tolist() == [f"range.npz[{i}]" for i in keep]
    assert loaded.manifest["label"].tolist() == labels[keep].tolist()
    assert loaded.skipped.to_dict("records") == [
        {"source": "range.npz[2]", "reason": "label 8 out of range 0..7"},
        {"source": "range.npz[5]", "reason": "label -1 out of range 0..7"},
    ]


def test_npz_label_out_of_range_fails_when_asked(tmp_path: Path, real) -> None:
    images, labels = real
    bad = labels.copy()
    bad[3] = 11
    path = _npz(tmp_path / "range_fail.npz", images=images, labels=bad)
    with pytest.raises(ImageSourceError, match=re.escape("range_fail.npz[3]: label 11 out of range 0..7")):
        load_npz(path, on_bad_item="fail")


def test_npz_all_labels_out_of_range_is_no_usable_images(tmp_path: Path, real) -> None:
    images, _ = real
    path = _npz(tmp_path / "allbad.npz", images=images, labels=np.full(len(images), 9))
    with pytest.raises(ImageSourceError, match=_name(path) + ".*no usable images.*12 items skipped"):
        load_npz(path)


def test_npz_with_zero_images_rejected(tmp_path: Path) -> None:
    path = _npz(tmp_path / "empty.npz", images=np.zeros((0, 96, 96, 3), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(ImageSourceError, match=_name(path) + r".*holds no images \(empty source\)"):
        load_npz(path)


def test_npz_with_no_arrays_rejected(tmp_path: Path) -> None:
    path = _npz(tmp_path / "nothing.npz")
    with pytest.raises(ImageSourceError, match=_name(path) + r".*no 'images' array \(found: nothing\)"):
        load_npz(path)


def test_npz_missing_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "absent.npz"
    with pytest.raises(ImageSourceError, match=_name(path) + ": file not found"):
        load_npz(path)
    with pytest.raises(ImageSourceError, match=_name(path) + ": file not found"):
        load_bloodmnist(path)


def test_npz_truncated_zip_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    good = _npz(tmp_path / "whole.npz", images=images, labels=labels)
    path = tmp_path / "torn.npz"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageSourceError, match=_name(path) + ".*not a readable .npz archive"):
        load_npz(path)


def test_npz_empty_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "zero_bytes.npz"
    path.write_bytes(b"")
    with pytest.raises(ImageSourceError, match=_name(path) + ".*not a readable .npz archive"):
        load_npz(path)


def test_npz_text_file_is_not_a_readable_archive(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays\n")
    with pytest.raises(ImageSourceError, match=_name(path) + ".*not a readable .npz archive"):
        load_npz(path)


def test_npz_plain_npy_file_rejected(tmp_path: Path, real) -> None:
    images, _ = real
    path = tmp_path / "single.npz"
    with open(path, "wb") as f:
        np.save(f, images)
    with pytest.raises(ImageSourceError, match=_name(path) + ".*not a zip file"):
        load_npz(path)


# --- npz: normalisation ------------------------------------------------------------------------


def test_npz_other_size_resized_to_image_size(tmp_path: Path, real) -> None:
    images, labels = real
    small = np.stack([np.asarray(Image.fromarray(img).resize((28, 28))) for img in images])
    path = _npz(tmp_path / "small.npz", images=small, labels=labels)

    loaded = load_npz(path, image_size=64)

    assert loaded.images.shape == (len(images), 64, 64, 3)
    assert loaded.images.dtype == np.uint8
    assert (loaded.manifest["orig_height"] == 28).all() and (loaded.manifest["orig_width"] == 28).all()
    expected = np.asarray(Image.fromarray(small[0]).resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(loaded.images[0], expected)


def test_npz_non_square_resized(tmp_path: Path, real) -> None:
    images, labels = real
    wide = images[:, 10:50, :, :]  # (N, 40, 96, 3)
    path = _npz(tmp_path / "wide.npz", images=np.ascontiguousarray(wide), labels=labels)

    loaded = load_npz(path, image_size=32)

    assert loaded.images.shape == (len(images), 32, 32, 3)
    assert loaded.manifest["orig_height"].tolist() == [40] * len(images)
    assert loaded.manifest["orig_width"].tolist() == [96] * len(images)


@pytest.mark.parametrize("layout", ["NHW", "NHW1"])
def test_npz_greyscale_becomes_rgb(tmp_path: Path, real, layout: str) -> None:
    images, labels = real
    grey = np.asarray([np.asarray(Image.fromarray(img).convert("L")) for img in images])
    stored = grey if layout == "NHW" else grey[..., None]
    path = _npz(tmp_path / f"grey_{layout}.npz", images=stored, labels=labels)

    loaded = load_npz(path)

    assert loaded.images.shape == (len(images), 96, 96, 3)
    assert loaded.images.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(loaded.images[..., channel], grey)


# --- bloodmnist layout -------------------------------------------------------------------------


def _bloodmnist_arrays(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    small = np.stack([np.asarray(Image.fromarray(img).resize((28, 28))) for img in images])
    col = labels.reshape(-1, 1).astype(np.uint8)
    return {
        "train_images": small[:5],
        "train_labels": col[:5],
        "val_images": small[5:9],
        "val_labels": col[5:9],
        "test_images": small[9:],
        "test_labels": col[9:],
    }


def test_bloodmnist_merges_train_val_test_in_order(tmp_path: Path, real) -> None:
    images, labels = real
    arrays = _bloodmnist_arrays(images, labels)
    # Store keys in a scrambled order: the merge order must come from the loader, not the file.
    path = _npz(tmp_path / "x.npz", **{k: arrays[k] for k in sorted(arrays, reverse=True)})

    loaded = load_bloodmnist(path, image_size=28)

    expected_sources = (
        [f"x.npz:train[{i}]" for i in range(5)]
        + [f"x.npz:val[{i}]" for i in range(4)]
        + [f"x.npz:test[{i}]" for i in range(3)]
    )
    assert loaded.manifest["source"].tolist() == expected_sources
    assert "x.npz:val[3]" in set(loaded.manifest["source"])
    assert loaded.manifest["label"].tolist() == labels.tolist()
    merged = np.concatenate([arrays["train_images"], arrays["val_images"], arrays["test_images"]])
    np.testing.assert_array_equal(loaded.images, merged)
    # Through load_source, resized to the default 96.
    via_source = load_source("bloodmnist", path)
    assert via_source.images.shape == (12, 96, 96, 3)
    assert (via_source.manifest["orig_height"] == 28).all()


def test_bloodmnist_missing_part_rejected(tmp_path: Path, real) -> None:
    images, labels = real
    arrays = _bloodmnist_arrays(images, labels)
    del arrays["val_labels"]
    path = _npz(tmp_path / "noval.npz", **arrays)
    with pytest.raises(ImageSourceError, match=_name(path) + ".*not a BloodMNIST file, missing 'val_images'/'val_labels'"):
        load_bloodmnist(path)


def test_bloodmnist_bad_label_skip_names_part_and_index(tmp_path: Path, real) -> None:
    images, labels = real
    arrays = _bloodmnist_arrays(images, labels)
    arrays["test_labels"] = arrays["test_labels"].copy()
    arrays["test_labels"][1, 0] = 200
    path = _npz(tmp_path / "bm.npz", **arrays)

    loaded = load_bloodmnist(path, image_size=28)

    assert loaded.skipped.to_dict("records") == [{"source": "bm.npz:test[1]", "reason": "label 200 out of range 0..7"}]
    assert len(loaded.images) == len(images) - 1
    with pytest.raises(ImageSourceError, match=re.escape("bm.npz:test[1]: label 200 out of range")):
        load_bloodmnist(path, on_bad_item="fail")


# --- image ids ---------------------------------------------------------------------------------


def test_image_id_equal_for_identical_pixels_different_otherwise(tmp_path: Path, real) -> None:
    images, labels = real
    copy = images[0].copy()
    assert image_id(copy) == image_id(images[0])
    changed = images[0].copy()
    changed[40, 40, 1] ^= 1
    assert image_id(changed) != image_id(images[0])
    # All twelve real images are distinct, so their ids are.
    assert len({image_id(img) for img in images}) == len(images)

    # The same pixels in two npz files (at different indices) get the same id.
    first = load_npz(_npz(tmp_path / "a.npz", images=images[:3], labels=labels[:3]))
    second = load_npz(_npz(tmp_path / "b.npz", images=images[[2, 0]], labels=labels[[2, 0]]))
    assert second.manifest["image_id"].tolist() == first.manifest["image_id"].iloc[[2, 0]].tolist()


def test_image_id_same_from_folder_and_npz(tmp_path: Path) -> None:
    (file, label), *_ = pbc96_files(per_class=1, seed=3)
    folder = tmp_path / "folder"
    (folder / CLASS_NAMES[label]).mkdir(parents=True)
    shutil.copy(file, folder / CLASS_NAMES[label] / file.name)
    from_folder = load_folder(folder)
    pixels = np.asarray(Image.open(file).convert("RGB"))
    from_npz = load_npz(_npz(tmp_path / "one.npz", images=pixels[None], labels=np.array([label])))
    assert from_folder.manifest["image_id"].iat[0] == from_npz.manifest["image_id"].iat[0]


# --- folder sources ----------------------------------------------------------------------------


def _make_folder(root: Path, per_class: int = 2, seed: int = 0) -> list[tuple[Path, int]]:
    files = pbc96_files(per_class=per_class, seed=seed)
    for file, label in files:
        target = root / CLASS_NAMES[label]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target / file.name)
    return files


def test_folder_good_input(tmp_path: Path) -> None:
    files = _make_folder(tmp_path / "pbc")

    loaded = load_folder(tmp_path / "pbc")

    assert loaded.images.shape == (len(files), 96, 96, 3) and loaded.images.dtype == np.uint8
    assert loaded.skipped.empty
    by_source = loaded.manifest.set_index("source")
    for file, label in files:
        source = f"{CLASS_NAMES[label]}/{file.name}"
        row = by_source.loc[source]
        assert row["label"] == label and row["class_name"] == CLASS_NAMES[label]
        position = loaded.manifest.index[loaded.manifest["source"] == source][0]
        np.testing.assert_array_equal(loaded.images[position], np.asarray(Image.open(file).convert("RGB")))


def test_folder_bad_files_skipped_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "pbc"
    files = _make_folder(root, per_class=1)
    broken = root / "neutrophil"
    data = files[0][0].read_bytes()
    (broken / "half.jpg").write_bytes(data[: len(data) // 2])
    (broken / "notes.txt").write_text("counted on 2024-03-01\n")
    (broken / "fake.jpg").write_text("this is text, not a JPEG\n")
    (root / "stray.jpg").write_bytes(data)  # outside any class folder

    loaded = load_folder(root)

    assert len(loaded.images) == len(files)
    reasons = dict(zip(loaded.skipped["source"], loaded.skipped["reason"]))
    assert set(reasons) == {"neutrophil/half.jpg", "neutrophil/notes.txt", "neutrophil/fake.jpg", "stray.jpg"}
    assert reasons["neutrophil/half.jpg"].startswith("unreadable or truncated image")
    assert "truncated" in reasons["neutrophil/half.jpg"]
    assert reasons["neutrophil/notes.txt"] == "not an image file (extension '.txt')"
    assert reasons["neutrophil/fake.jpg"] == "not a readable image (unknown or damaged format)"
    assert reasons["stray.jpg"] == "file outside any class folder"
    assert not set(reasons) & set(loaded.manifest["source"])


@pytest.mark.parametrize(
    ("name", "problem"),
    [("half.jpg", "unreadable or truncated image"), ("notes.txt", "not an image file"), ("fake.jpg", "not a readable image")],
)
def test_folder_bad_file_fails_when_asked(tmp_path: Path, name: str, problem: str) -> None:
    root = tmp_path / "pbc"
    files = _make_folder(root, per_class=1)
    data = files[0][0].read_bytes()
    content = {"half.jpg": data[: len(data) // 2], "notes.txt": b"notes", "fake.jpg": b"text"}[name]
    (root / "platelet" / name).write_bytes(content)
    with pytest.raises(ImageSourceError, match=re.escape(f"platelet/{name}: {problem}")):
        load_folder(root, on_bad_item="fail")


def test_folder_unknown_class_folder_rejected(tmp_path: Path) -> None:
    root = tmp_path / "pbc"
    files = _make_folder(root, per_class=1)
    (root / "monkey").mkdir()
    shutil.copy(files[0][0], root / "monkey" / "m.jpg")
    with pytest.raises(ImageSourceError, match=r"monkey: unknown class folder 'monkey'; expected one of \['basophil'"):
        load_folder(root)


def test_folder_all_files_bad_is_no_usable_images(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    (root / "basophil").mkdir(parents=True)
    (root / "basophil" / "a.txt").write_text("x")
    (root / "basophil" / "b.jpg").write_text("not a jpeg")
    with pytest.raises(ImageSourceError, match=_name(root) + r": no usable images \(empty source\); 2 items skipped"):
        load_folder(root)


def test_folder_without_files_rejected(tmp_path: Path) -> None:
    root = tmp_path / "hollow"
    (root / "basophil").mkdir(parents=True)
    with pytest.raises(ImageSourceError, match=_name(root) + ".*empty source"):
        load_folder(root)


def test_folder_missing_rejected(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(ImageSourceError, match=_name(root) + ": folder not found"):
        load_folder(root)
    with pytest.raises(ImageSourceError, match=_name(root) + ": folder not found"):
        load_source("folder", root)


def test_folder_resizes_and_converts_to_rgb(tmp_path: Path) -> None:
    root = tmp_path / "pbc"
    files = _make_folder(root, per_class=1)
    # A greyscale PNG of another, non-square size, made from a real image.
    grey = Image.open(files[0][0]).convert("L").resize((70, 50))
    grey.save(root / "basophil" / "grey.png")

    loaded = load_folder(root, image_size=64)

    assert loaded.images.shape == (len(files) + 1, 64, 64, 3) and loaded.images.dtype == np.uint8
    row = loaded.manifest.index[loaded.manifest["source"] == "basophil/grey.png"][0]
    assert loaded.manifest.loc[row, ["orig_height", "orig_width"]].tolist() == [50, 70]
    pixels = loaded.images[row]
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    expected = np.asarray(grey.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pixels, expected)
    assert isinstance(loaded.manifest, pd.DataFrame)


def test_degenerate_images_are_kept_with_a_note_and_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "pbc"
    files = _make_folder(root, per_class=1)
    real = np.asarray(Image.open(files[0][0]).convert("L"), dtype=np.uint16)  # a real cell, 96x96
    Image.fromarray(real * 257).save(root / "basophil" / "deep.png")  # 16-bit PNG, same picture
    rgba = Image.open(files[0][0]).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0).point(lambda _: 128))
    rgba.save(root / "basophil" / "alpha.png")
    Image.open(files[0][0]).resize((8, 8)).save(root / "basophil" / "tiny.png")
    Image.open(files[0][0]).resize((1100, 1100)).save(root / "basophil" / "huge.jpg")

    loaded = load_folder(root, image_size=64)
    plain = f"{CLASS_NAMES[files[0][1]]}/{files[0][0].name}"
    note = dict(zip(loaded.manifest["source"], loaded.manifest["note"]))
    assert note["basophil/deep.png"] == "16-bit image scaled to 8 bits"
    assert note["basophil/alpha.png"] == "transparency composited on white"
    assert note["basophil/tiny.png"] == "tiny 8x8 image upscaled 8x"
    assert note["basophil/huge.jpg"] == "huge 1100x1100 image downscaled 17x"
    assert note[plain] == ""  # an ordinary image has none
    row = {s: i for i, s in enumerate(loaded.manifest["source"])}
    deep = loaded.images[row["basophil/deep.png"]].astype(int)
    expected = to_rgb_square(np.repeat(real.astype(np.uint8)[..., None], 3, axis=2), 64).astype(int)
    assert np.abs(deep - expected).max() <= 1  # the same picture, not a white square
    half_white = loaded.images[row["basophil/alpha.png"]].astype(int)
    assert half_white.mean() > loaded.images[row[plain]].mean()
