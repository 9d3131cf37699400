"""Streaming building blocks: ordered process maps, whole-file maps told from parts, and an .npy
file appended to before its final row count is known. Loaders built on them must give the same
images and manifest streamed to a file over two processes as in memory in one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from bc_pipeline.core import chunks
from bc_pipeline.ingest.loaders import ImageSourceError, load_source
from bc_pipeline_tests.conftest import pbc96_files


def _square(value: int) -> int:
    return value * value


def test_parallel_map_keeps_the_order_of_the_jobs_in_one_and_in_two_processes() -> None:
    jobs = list(range(23))
    assert list(chunks.parallel_map(_square, jobs, workers=1)) == [j * j for j in jobs]
    assert list(chunks.parallel_map(_square, iter(jobs), workers=2)) == [j * j for j in jobs]


@pytest.mark.parametrize("shape", [(3, 4), (7,), (120, 96, 96, 3), (0, 5)])
def test_npy_header_is_byte_for_byte_numpy_s_own(shape: tuple[int, ...]) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, np.uint8))
    header = chunks.npy_header(shape, np.dtype(np.uint8))
    assert buffer.getvalue()[: len(header)] == header


def test_npy_writer_rewrites_the_header_for_the_rows_actually_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 255, (n, 5, 5, 3), dtype=np.uint8) for n in (4, 0, 3)]
    writer = chunks.NpyWriter(tmp_path / "a.npy", (5, 5, 3), np.uint8, capacity=100_000)  # a longer count than written
    for part in parts:
        writer.append(part)
    with pytest.raises(ValueError, match="rows of shape"):
        writer.append(np.zeros((1, 4, 5, 3), np.uint8))
    mapped = writer.finish()
    np.testing.assert_array_equal(mapped, np.concatenate(parts))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.concatenate(parts))  # numpy reads it as its own
    assert chunks.mapped_array(mapped) is not None
    full = chunks.NpyWriter(tmp_path / "b.npy", (2,), np.uint8, capacity=1)
    full.append(np.ones((1, 2), np.uint8))
    with pytest.raises(ValueError, match="more than the 1 rows"):
        full.append(np.ones((1, 2), np.uint8))


def test_mapped_array_describes_whole_maps_only_and_refuses_a_replaced_file(tmp_path: Path) -> None:
    data = np.arange(60, dtype=np.uint8).reshape(10, 6)
    np.save(tmp_path / "x.npy", data)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    where = chunks.mapped_array(mapped)
    np.testing.assert_array_equal(where.read_rows(np.arange(10)), data)
    np.testing.assert_array_equal(where.read_rows(np.array([7, 2, 9])), data[[7, 2, 9]])
    assert chunks.mapped_array(mapped[2:]) is None and chunks.mapped_array(data) is None
    np.save(tmp_path / "y.npy", data[::-1].copy())
    (tmp_path / "y.npy").replace(tmp_path / "x.npy")
    chunks._open_file.cache_clear()  # a worker that had not opened it yet
    with pytest.raises(OSError, match="replaced"):
        where.read_rows(np.arange(3))
    assert chunks.mapped_array(mapped).inode == where.inode  # still the file this process maps, not the new one


def test_every_tenth_reports_ten_times_and_the_end() -> None:
    seen: list[int] = []
    progress = chunks.every_tenth(lambda done, total: seen.append(done))
    for done in range(1, 1001):
        progress(done, 1000)
    assert len(seen) == 10 and seen[-1] == 1000


# --- loaders on top ----------------------------------------------------------------------------


def test_a_folder_streamed_to_a_file_over_two_processes_equals_one_loaded_in_memory(pbc_subset_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "source"
    import shutil

    shutil.copytree(pbc_subset_dir, root)
    (root / "basophil" / "broken.jpg").write_bytes(b"not a jpeg")  # one skip in the middle of a chunk
    seen: list[tuple[int, int]] = []
    in_memory = load_source("folder", root, workers=1)
    out = tmp_path / "out"
    out.mkdir()
    streamed = load_source("folder", root, workers=2, out_dir=out, progress=lambda d, t: seen.append((d, t)))
    assert streamed.images_file == out / "images.npy" and isinstance(streamed.images, np.memmap)
    assert in_memory.images_file is None and not isinstance(in_memory.images, np.memmap)
    np.testing.assert_array_equal(streamed.images, in_memory.images)
    assert streamed.manifest.equals(in_memory.manifest) and streamed.skipped.equals(in_memory.skipped)
    assert len(streamed.skipped) == 1 and len(streamed.images) == 320
    assert seen[-1] == (321, 321) and len(seen) == 2  # two chunks of 256 files


def test_a_failed_streamed_load_leaves_no_images_file(tmp_path: Path) -> None:
    root = tmp_path / "source" / "basophil"
    root.mkdir(parents=True)
    for file, _ in pbc96_files(per_class=1)[:3]:
        (root / file.name).write_bytes(file.read_bytes())
    (root / "zz.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ImageSourceError, match="zz.jpg: not a readable image"):
        load_source("folder", root.parent, on_bad_item="fail", out_dir=out)
    assert list(out.iterdir()) == []


def test_uncompressed_npz_members_are_memory_mapped_and_load_the_same(pbc_subset_arrays, tmp_path: Path) -> None:
    images, labels = pbc_subset_arrays
    labels = labels.copy()
    labels[5] = 99  # one out-of-range label, skipped
    np.savez(tmp_path / "plain.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "packed.npz", images=images, labels=labels)
    from bc_pipeline.ingest.loaders import _open_npz

    assert isinstance(_open_npz(tmp_path / "plain.npz")["images"], np.memmap)
    assert not isinstance(_open_npz(tmp_path / "packed.npz")["images"], np.memmap)
    out = tmp_path / "out"
    out.mkdir()
    streamed = load_source("npz", tmp_path / "plain.npz", workers=2, out_dir=out)
    packed = load_source("npz", tmp_path / "packed.npz", workers=1)
    np.testing.assert_array_equal(streamed.images, np.delete(images, 5, axis=0))
    np.testing.assert_array_equal(packed.images, streamed.images)
    assert list(streamed.skipped["source"]) == ["plain.npz[5]"] and list(packed.skipped["source"]) == ["packed.npz[5]"]
    assert streamed.manifest.drop(columns="source").equals(packed.manifest.drop(columns="source"))


def test_npy_writer_compacts_away_rows_that_were_never_written(tmp_path: Path) -> None:
    rows = np.arange(10 * 6, dtype=np.uint8).reshape(10, 2, 3)
    writer = chunks.NpyWriter(tmp_path / "c.npy", (2, 3), np.uint8, capacity=10)
    target = writer.target()
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=bool)  # gaps inside and at the end
    target.write_rows([int(i) for i in np.flatnonzero(keep)], list(rows[keep]))  # as workers would
    writer.written(10)
    writer.compact(keep)
    np.testing.assert_array_equal(writer.finish(), rows[keep])
    assert (tmp_path / "c.npy").stat().st_size == len(chunks.npy_header((10, 2, 3), np.dtype(np.uint8))) + keep.sum() * 6
