"""Vectorised perceptual hashes: bit-for-bit equal to imagehash, the same with a process pool,
and cached by image id so that only new pixel content is ever hashed."""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bc_pipeline.core import chunks
from bc_pipeline.core.storage import save_parquet
from bc_pipeline.ingest.loaders import image_id
from bc_pipeline.quality import hashing
from bc_pipeline.quality.hashing import (
    compute_hashes,
    greyscale,
    hamming,
    hash_batch,
    hash_hex,
    hash_with_cache,
)


def _reference(image: np.ndarray) -> tuple[str, str]:
    pil = Image.fromarray(image)
    return str(imagehash.phash(pil)), str(imagehash.dhash(pil))


def _mismatches(images: np.ndarray, phash: np.ndarray, dhash: np.ndarray) -> list[tuple[int, str, str]]:
    wrong = []
    for i, image in enumerate(images):
        ref_p, ref_d = _reference(image)
        if hash_hex(phash[i]) != ref_p:
            wrong.append((i, "phash", f"{hash_hex(phash[i])} != {ref_p}"))
        if hash_hex(dhash[i]) != ref_d:
            wrong.append((i, "dhash", f"{hash_hex(dhash[i])} != {ref_d}"))
    return wrong


def _noise(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# --- bit-for-bit equality with imagehash -------------------------------------------------------


def test_hashes_match_imagehash_on_real_images(pbc_subset_arrays) -> None:
    images, _ = pbc_subset_arrays
    assert images.shape == (320, 96, 96, 3)
    phash, dhash = compute_hashes(images, workers=1)
    assert phash.dtype == np.uint64 and dhash.dtype == np.uint64
    assert _mismatches(images, phash, dhash) == []
    # Real, distinct cells give (almost all) distinct hashes: a constant output would fail here.
    assert len(set(phash.tolist())) > 300 and len(set(dhash.tolist())) > 300


@pytest.mark.parametrize(
    "shape", [(96, 96, 3), (28, 28, 3), (64, 64, 3), (40, 70, 3), (9, 8, 3)], ids=lambda s: "x".join(map(str, s))
)
def test_hashes_match_imagehash_on_noise_and_other_sizes(shape: tuple[int, ...]) -> None:
    images = _noise(40, shape, seed=sum(shape))
    phash, dhash = hash_batch(images)
    assert _mismatches(images, phash, dhash) == []
    p2, d2 = compute_hashes(images, workers=1, batch_size=16)
    np.testing.assert_array_equal(p2, phash)
    np.testing.assert_array_equal(d2, dhash)


def test_hashes_match_imagehash_on_flat_and_smooth_images() -> None:
    """Degenerate content: constant images (all DCT AC terms zero, many ties) and gradients."""
    flat = np.stack([np.full((96, 96, 3), v, np.uint8) for v in (0, 1, 127, 255)])
    ramp = np.broadcast_to(np.arange(96, dtype=np.uint8)[None, :, None], (96, 96, 3))
    gradients = np.stack([ramp, ramp.transpose(1, 0, 2), 255 - ramp])
    images = np.concatenate([flat, gradients])
    phash, dhash = hash_batch(images)
    assert _mismatches(images, phash, dhash) == []


def test_hash_batch_accepts_greyscale_batches(pbc_subset_arrays) -> None:
    images, _ = pbc_subset_arrays
    grey = greyscale(images[:30])
    phash, dhash = hash_batch(grey)
    for i in range(len(grey)):
        pil = Image.fromarray(grey[i])
        assert hash_hex(phash[i]) == str(imagehash.phash(pil))
        assert hash_hex(dhash[i]) == str(imagehash.dhash(pil))
    # ... and greyscale input hashes like the RGB it came from.
    p_rgb, d_rgb = hash_batch(images[:30])
    np.testing.assert_array_equal(phash, p_rgb)
    np.testing.assert_array_equal(dhash, d_rgb)


# --- greyscale ---------------------------------------------------------------------------------


def test_greyscale_equals_pil_on_real_images(pbc_subset_arrays) -> None:
    images, _ = pbc_subset_arrays
    ours = greyscale(images)
    assert ours.dtype == np.uint8 and ours.shape == images.shape[:3]
    for i in range(0, len(images), 7):
        np.testing.assert_array_equal(ours[i], np.asarray(Image.fromarray(images[i]).convert("L")))


def test_greyscale_equals_pil_on_random_images() -> None:
    images = _noise(20, (50, 60, 3), seed=7)
    ours = greyscale(images)
    for i in range(len(images)):
        np.testing.assert_array_equal(ours[i], np.asarray(Image.fromarray(images[i]).convert("L")))


def test_greyscale_equals_pil_on_every_rgb_colour() -> None:
    """All 2**24 colours, one 256x256 plane (all G, B for one R) at a time."""
    g, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    plane = np.empty((256, 256, 3), np.uint8)
    plane[..., 1], plane[..., 2] = g, b
    for r in range(256):
        plane[..., 0] = r
        expected = np.asarray(Image.fromarray(plane).convert("L"))
        np.testing.assert_array_equal(greyscale(plane[None])[0], expected, err_msg=f"R={r}")


# --- process pool ------------------------------------------------------------------------------


def test_process_pool_gives_the_same_hashes(pbc_subset_arrays, monkeypatch: pytest.MonkeyPatch) -> None:
    images, _ = pbc_subset_arrays
    images = np.concatenate([images[:150], _noise(30, (96, 96, 3), seed=3)])

    pools = []

    class RecordingPool(chunks.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs) -> None:
            pools.append(kwargs.get("max_workers", args[0] if args else None))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(chunks, "ProcessPoolExecutor", RecordingPool)

    serial = compute_hashes(images, workers=1, batch_size=40)
    assert pools == []  # one worker stays in this process

    progress: list[tuple[int, int]] = []
    pooled = compute_hashes(images, workers=2, batch_size=40, progress=lambda done, total: progress.append((done, total)))

    assert pools == [2], "workers=2 with several batches must use a process pool of 2"
    np.testing.assert_array_equal(pooled[0], serial[0])
    np.testing.assert_array_equal(pooled[1], serial[1])
    assert progress == [(40, 180), (80, 180), (120, 180), (160, 180), (180, 180)]
    assert _mismatches(images[::9], pooled[0][::9], pooled[1][::9]) == []


def test_compute_hashes_small_and_empty_inputs() -> None:
    one = _noise(1, (96, 96, 3), seed=11)
    p, d = compute_hashes(one)
    assert _mismatches(one, p, d) == []
    empty_p, empty_d = compute_hashes(np.zeros((0, 96, 96, 3), np.uint8))
    assert empty_p.shape == (0,) and empty_d.shape == (0,)


# --- cache -------------------------------------------------------------------------------------


@pytest.fixture
def cache_images(pbc_subset_arrays) -> tuple[np.ndarray, list[str]]:
    """40 distinct real images plus exact copies of images 3 and 17 (42 images, 40 unique ids)."""
    images, _ = pbc_subset_arrays
    base = images[::8][:40]
    stacked = np.concatenate([base, base[[3, 17]]])
    return stacked, [image_id(img) for img in stacked]


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Number of images each compute_hashes call inside hash_with_cache was asked to hash."""
    calls: list[int] = []
    real = hashing.compute_hashes

    def spy(images: np.ndarray, **kwargs):
        rows = kwargs.get("rows")
        calls.append(len(images) if rows is None else len(rows))
        return real(images, **kwargs)

    monkeypatch.setattr(hashing, "compute_hashes", spy)
    return calls


def test_hash_with_cache_empty_cache_hashes_unique_ids_once(cache_images, counted) -> None:
    images, ids = cache_images
    assert len(set(ids)) == 40 and len(ids) == 42

    hashes, cache, computed = hash_with_cache(images, ids, None)

    assert computed == 40
    assert counted == [40], "exact duplicates must be hashed once"
    assert list(hashes.columns) == ["image_id", "phash", "dhash"]
    assert hashes["image_id"].tolist() == ids
    assert hashes["phash"].dtype == np.uint64 and hashes["dhash"].dtype == np.uint64
    expected_p, expected_d = compute_hashes(images, workers=1)
    np.testing.assert_array_equal(hashes["phash"].to_numpy(), expected_p)
    np.testing.assert_array_equal(hashes["dhash"].to_numpy(), expected_d)
    assert len(cache) == 40 and cache["image_id"].is_unique
    assert set(cache["image_id"]) == set(ids)


def test_hash_with_cache_warm_cache_computes_nothing(cache_images, counted, tmp_path: Path) -> None:
    images, ids = cache_images
    first, cache, _ = hash_with_cache(images, ids, None)
    counted.clear()

    again, cache2, computed = hash_with_cache(images, ids, cache)

    assert computed == 0 and counted == []
    pd.testing.assert_frame_equal(again, first)
    assert len(cache2) == len(cache)

    # The cache survives a Parquet roundtrip (as the pipeline stores it) and still hits.
    path = save_parquet(tmp_path / "hash_cache.parquet", cache2)
    stored = pd.read_parquet(path)
    from_disk, _, computed = hash_with_cache(images, ids, stored)
    assert computed == 0 and counted == []
    np.testing.assert_array_equal(from_disk["phash"].to_numpy(), first["phash"].to_numpy())


def test_hash_with_cache_new_images_are_the_only_ones_hashed(cache_images, counted, pbc_subset_arrays) -> None:
    images, ids = cache_images
    _, cache, _ = hash_with_cache(images, ids, None)
    counted.clear()

    real, _ = pbc_subset_arrays
    new = real[1::8][:5]  # five real images not among the first 40
    assert not {image_id(img) for img in new} & set(ids)
    # Shuffle the new images in among the old ones, and repeat one of them.
    all_images = np.concatenate([new[:2], images, new[2:], new[:1]])
    all_ids = [image_id(img) for img in all_images]

    hashes, cache2, computed = hash_with_cache(all_images, all_ids, cache)

    assert computed == 5 and counted == [5]
    assert len(cache2) == 45
    expected_p, expected_d = compute_hashes(all_images, workers=1)
    np.testing.assert_array_equal(hashes["phash"].to_numpy(), expected_p)
    np.testing.assert_array_equal(hashes["dhash"].to_numpy(), expected_d)
    assert hashes["image_id"].tolist() == all_ids


def test_hash_with_cache_trusts_cached_values_by_id(cache_images) -> None:
    """A cached hash is reused for its id without recomputing (so the cache really is read)."""
    images, ids = cache_images
    fake = pd.DataFrame(
        {
            "image_id": pd.Series([ids[0]], dtype="string"),
            "phash": pd.Series([123], dtype="uint64"),
            "dhash": pd.Series([456], dtype="uint64"),
        }
    )
    hashes, _, computed = hash_with_cache(images[:2], ids[:2], fake)
    assert computed == 1
    assert hashes["phash"].tolist()[0] == 123 and hashes["dhash"].tolist()[0] == 456
    assert hash_hex(hashes["phash"].iat[1]) == _reference(images[1])[0]


# --- helpers -----------------------------------------------------------------------------------


def test_hamming_known_values() -> None:
    a = np.array([0, 0, 0b1011, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001], dtype=np.uint64)
    b = np.array([0, 0xFFFF_FFFF_FFFF_FFFF, 0b0001, 0xFFFF_FFFF_FFFF_FFFE, 0x0000_0000_0000_0001], dtype=np.uint64)
    np.testing.assert_array_equal(hamming(a, b), [0, 64, 2, 1, 1])
    # Broadcasting gives the full distance matrix, symmetric with a zero diagonal.
    matrix = hamming(a[:, None], a[None, :])
    assert matrix.shape == (5, 5)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), 0)
    assert matrix[0, 3] == 64 and matrix[2, 4] == 3  # 0b1011 ^ (bit 63 | bit 0)


def test_hash_hex_is_imagehash_string_form() -> None:
    assert hash_hex(np.uint64(1)) == "0000000000000001"
    assert hash_hex(0xFFFF_FFFF_FFFF_FFFF) == "ffffffffffffffff"
    assert hash_hex(np.uint64(0x8000_0000_0000_0000)) == "8000000000000000"


def test_workers_map_a_stored_image_file_themselves_and_give_the_same_hashes(pbc_subset_arrays, tmp_path) -> None:
    images = pbc_subset_arrays[0][:300]
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    assert chunks.mapped_array(mapped).filename == str(tmp_path / "images.npy")
    assert chunks.mapped_array(mapped[10:]) is None and chunks.mapped_array(images) is None  # part of it / in memory
    rows = np.array([5, 3, 299, 0, 150])
    expected = compute_hashes(images, rows=rows, workers=1)
    got = compute_hashes(mapped, rows=rows, workers=2, batch_size=2)  # three batches: the pool, reading the file
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(compute_hashes(images[rows], workers=1)[0], expected[0])


def test_a_stored_file_replaced_while_hashing_falls_back_to_this_process_s_map(pbc_subset_arrays, tmp_path, monkeypatch) -> None:
    images = pbc_subset_arrays[0][:64]
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    np.save(tmp_path / "other.npy", images[::-1].copy())
    (tmp_path / "other.npy").replace(tmp_path / "images.npy")  # another run rewrote the asset: same name, other pixels
    got = compute_hashes(mapped, workers=2, batch_size=16)
    np.testing.assert_array_equal(got[0], compute_hashes(images, workers=1)[0])
    (tmp_path / "images.npy").unlink()  # and with the name gone altogether
    np.testing.assert_array_equal(compute_hashes(mapped, workers=2, batch_size=16)[0], got[0])
