"""Perceptual hashes (phash, dhash) for whole image arrays, bit-for-bit equal to imagehash.

Per image, imagehash converts to greyscale, resizes twice with LANCZOS, runs a 2-D DCT through
scipy.fftpack and builds a bit string. The resizes are most of the cost and stay PIL's own
(reproducing PIL's fixed-point resampling in NumPy would not be bit-exact); everything else runs
once per batch: the greyscale conversion (PIL's fixed-point formula, vectorised), the DCT, the
medians and the bit packing. Large inputs are spread over worker processes (the resize holds the
GIL, so threads would not help). The biggest saving is not recomputing at all: hashes are cached
by content id (:func:`hash_with_cache`). ``bench/bench_hashing.py`` measures each of these.

Hashes are stored as uint64 with the first bit of imagehash's flattened array as the most
significant bit, so ``f"{h:016x}"`` equals ``str(imagehash.phash(image))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from bc_pipeline.core import chunks

if TYPE_CHECKING:  # pandas only where tables are built: hashing workers start without it
    import pandas as pd

HASH_NAMES: tuple[str, ...] = ("phash", "dhash")
HASH_BITS = 64
#: Bump when the hashing changes, so cached hashes from an older algorithm are not reused.
HASH_ALGORITHM_VERSION = "phash8-dhash8-v1"

_HASH_SIZE = 8
_PHASH_SIDE = _HASH_SIZE * 4  # imagehash's highfreq_factor=4


def greyscale(images: np.ndarray) -> np.ndarray:
    """PIL's RGB -> "L" conversion, vectorised: the same fixed-point weights, so the same bytes."""
    rgb = images.astype(np.uint32)
    weighted = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return (weighted >> 16).astype(np.uint8)


def _as_grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W) greyscale batches pass through; (N, H, W, 3) RGB ones are converted."""
    return np.ascontiguousarray(images) if images.ndim == 3 else greyscale(images)


def _thumbnails(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """32x32 (for phash) and 9x8 (for dhash) LANCZOS thumbnails, as imagehash makes them."""
    n = grey.shape[0]
    phash_px = np.empty((n, _PHASH_SIDE, _PHASH_SIDE), dtype=np.uint8)
    dhash_px = np.empty((n, _HASH_SIZE, _HASH_SIZE + 1), dtype=np.uint8)
    for i in range(n):
        image = Image.fromarray(grey[i])
        phash_px[i] = np.asarray(image.resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS))
        dhash_px[i] = np.asarray(image.resize((_HASH_SIZE + 1, _HASH_SIZE), Image.Resampling.LANCZOS))
    return phash_px, dhash_px


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, 8, 8) booleans -> (N,) uint64, row-major, first bit most significant."""
    packed = np.packbits(bits.reshape(bits.shape[0], HASH_BITS), axis=1)
    return packed.view(">u8").astype(np.uint64).ravel()


def hash_batch(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """phash and dhash of an (N, H, W, 3) RGB or (N, H, W) greyscale uint8 batch, as (N,) uint64."""
    import scipy.fftpack  # imagehash's DCT; imported here to keep module import cheap

    grey = _as_grey(images)
    phash_px, dhash_px = _thumbnails(grey)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(phash_px, axis=1), axis=2)
    low = dct[:, :_HASH_SIZE, :_HASH_SIZE]
    median = np.median(low.reshape(low.shape[0], -1), axis=1)
    phash = _pack_bits(low > median[:, None, None])
    dhash = _pack_bits(dhash_px[:, :, 1:] > dhash_px[:, :, :-1])
    return phash, dhash


def compute_hashes(
    images: np.ndarray,
    *,
    rows: np.ndarray | None = None,
    batch_size: int = 1024,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Hash ``images[rows]`` (default: every image) in batches; ``progress(done, total)`` after each.

    Inputs of several batches use ``workers`` processes (default: all cores); small ones stay in
    this process, where starting workers would cost more than it saves. Only one batch is in
    memory at a time here; when ``images`` is a whole memory-mapped ``.npy`` (what a stored image
    set is), the workers map the file themselves and receive row numbers only, so neither the
    pixels nor their greyscale conversion go through this process (that serial part kept two
    processes at 1.4x one); otherwise they receive greyscale batches, a third of the bytes
    (:func:`bc_pipeline.core.chunks.map_rows`).
    """
    rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows)
    n = len(rows)
    phash = np.zeros(n, dtype=np.uint64)
    dhash = np.zeros(n, dtype=np.uint64)
    workers = workers or chunks.default_workers()
    done = 0
    batches = chunks.map_rows(hash_batch, images, rows, batch_size=batch_size, workers=workers, prepare=_as_grey)
    for start, (p, d) in batches:
        phash[start : start + len(p)] = p
        dhash[start : start + len(d)] = d
        done += len(p)
        if progress is not None:
            progress(done, n)
    return phash, dhash


def hash_with_cache(
    images: np.ndarray,
    image_ids: pd.Series | list[str],
    cache: pd.DataFrame | None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Hashes for every image, computing only those whose image id is not in ``cache``.

    Image ids come from pixel content, so a cached hash is valid for any image with that id.
    Returns (hashes in image order with columns image_id/phash/dhash, updated cache,
    number of images actually hashed).
    """
    import pandas as pd

    ids = pd.Series(list(image_ids), dtype="string")
    cache = _empty_cache() if cache is None else cache
    known = cache.drop_duplicates("image_id").set_index("image_id")
    missing_mask = ~ids.isin(known.index).to_numpy()
    # Hash each missing id once, even when it occurs several times (exact duplicates).
    missing_ids = ids[missing_mask].drop_duplicates()
    rows = missing_ids.index.to_numpy()
    if len(rows):
        phash, dhash = compute_hashes(images, rows=rows, progress=progress)
        fresh = pd.DataFrame({"image_id": missing_ids.to_numpy(), "phash": phash, "dhash": dhash})
        known = pd.concat([known, fresh.set_index("image_id")])
    hashes = known.loc[ids.to_numpy(), ["phash", "dhash"]].reset_index()
    hashes = hashes.astype({"image_id": "string", "phash": "uint64", "dhash": "uint64"})
    updated_cache = known.reset_index().astype({"phash": "uint64", "dhash": "uint64"})
    return hashes, updated_cache, len(rows)


def _empty_cache() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(
        {
            "image_id": pd.Series(dtype="string"),
            "phash": pd.Series(dtype="uint64"),
            "dhash": pd.Series(dtype="uint64"),
        }
    )


def hash_hex(value: int | np.uint64) -> str:
    """imagehash's string form of a 64-bit hash."""
    return f"{int(value):016x}"


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hash arrays (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b))
