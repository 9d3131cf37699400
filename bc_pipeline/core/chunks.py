"""Work on image arrays larger than memory: in chunks, over worker processes, into files.

Three pieces shared by the data stages that must hold at a million images (ingest, hashing,
colour statistics):

- :func:`parallel_map` runs a function over jobs in order, in worker processes with only
  a few jobs in flight, so results never pile up in memory however slow the consumer is;
- :func:`map_rows` applies a function to ``images[rows]`` batch by batch. When ``images`` maps a
  file as a whole (a stored ``images.npy``, an uncompressed ``.npz`` member) the workers map the
  file themselves and receive row numbers only: no pixels go through this process, whose serial
  share is what keeps two processes from being twice as fast as one;
- :class:`NpyWriter` appends rows to an ``.npy`` file whose final count is known only at the end
  (images that turn out unreadable are skipped), so ingest writes each decoded chunk and forgets it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import multiprocessing
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_workers() -> int:
    """All cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


#: What every worker needs, imported once by the fork server rather than by each worker.
WORKER_PRELOAD = ["numpy", "PIL.Image", "bc_pipeline.core.chunks", "bc_pipeline.ingest.decode", "bc_pipeline.quality.colour",
                  "bc_pipeline.quality.hashing"]  # fmt: skip


def _worker_context() -> multiprocessing.context.BaseContext:
    """The "forkserver" start method where there is one, else "spawn".

    Both keep workers clean of whatever threads the calling process (Dagster, TensorFlow) holds,
    unlike "fork". A "spawn" worker imports the caller's main module again (all of Dagster, 1.8 s,
    under ``python -m bc_pipeline.run``); a fork server is started once, imports
    :data:`WORKER_PRELOAD`, and forks each worker from itself in milliseconds.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # takes effect when the server starts (once per process)
    return context


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``workers`` processes to share between several maps (None for one worker)."""
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
        yield pool


def parallel_map(
    func: Callable[[Job], Result], jobs: Iterable[Job], *, workers: int, pool: ProcessPoolExecutor | None = None
) -> Iterator[Result]:
    """``func(job)`` for each job, in order; over ``workers`` processes (or ``pool``) when more than one.

    At most ``2 * workers`` jobs are submitted ahead of the one being returned, so memory holds a
    few results, not all of them. ``func`` must be a module-level function (or a partial of one).
    """
    if pool is None and workers > 1:
        with worker_pool(workers) as own:
            yield from parallel_map(func, jobs, workers=workers, pool=own)
        return
    if pool is None:
        yield from map(func, jobs)
        return
    pending: collections.deque = collections.deque()
    for job in jobs:
        pending.append(pool.submit(func, job))
        if len(pending) >= 2 * max(workers, 1):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def every_tenth(report: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that passes on only each further tenth of the work, and the end:
    ten log lines for a long stage, whatever the number of chunks."""
    next_share = [0.1]

    def progress(done: int, total: int) -> None:
        if done == total or (total and done / total >= next_share[0]):
            report(done, total)
            next_share[0] = done / max(total, 1) + 0.1

    return progress


@dataclass(frozen=True)
class MappedArray:
    """Where a memory-mapped array lies in its file, so another process can map the same bytes.

    ``device``/``inode`` identify the file seen when the description was made: a worker refuses
    (``OSError``) a file that has since been replaced under the same name (another run rewrote the
    asset) instead of reading other pixels.
    """

    filename: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    device: int
    inode: int

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` from a map of just the rows' span, released with the result.

        A worker that kept the whole file mapped would hold every page it ever touched (1.7 GB
        after 100k images); this one holds a batch. Consecutive rows come back as a view of the
        map (no copy), others as a copy of the rows asked for.
        """
        rows = np.asarray(rows, dtype=np.int64)
        dtype, row_shape = np.dtype(self.dtype), self.shape[1:]
        if len(rows) == 0:
            return np.empty((0, *row_shape), dtype)
        first, last = int(rows.min()), int(rows.max()) + 1
        row_bytes = int(np.prod(row_shape)) * dtype.itemsize
        start = self.offset + first * row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        region = mmap.mmap(_open_file(self), start - aligned + (last - first) * row_bytes, access=mmap.ACCESS_READ, offset=aligned)
        span = np.frombuffer(region, dtype, count=(last - first) * row_bytes // dtype.itemsize, offset=start - aligned)
        span = span.reshape(last - first, *row_shape)
        contiguous = rows[0] == first and np.array_equal(rows, np.arange(first, last))
        return span if contiguous else span[rows - first]

    def _check(self, status: os.stat_result) -> None:
        if (status.st_dev, status.st_ino) != (self.device, self.inode):
            raise FileNotFoundError(f"{self.filename} was replaced since it was mapped")


def mapped_array(images: np.ndarray) -> MappedArray | None:
    """The file region ``images`` maps as a whole, or None (in memory, or a view of part of a map).

    A map made by ``np.memmap``/``np.load(mmap_mode=...)`` has the ``mmap`` object itself as its
    base; any slice of it has the map it came from, which is how a part is told from the whole.
    The file's identity is the one actually mapped (from ``/proc/self/maps`` where there is one),
    not whatever carries its name now.
    """
    if not isinstance(images, np.memmap) or not isinstance(images.base, mmap.mmap):
        return None
    if not images.filename or not images.flags.c_contiguous or images.size == 0:
        return None
    identity = _mapped_identity(images.ctypes.data)
    if identity is None:
        try:
            status = os.stat(images.filename)
        except OSError:
            return None
        identity = status.st_dev, status.st_ino
    return MappedArray(str(images.filename), int(images.offset), images.dtype.str, tuple(images.shape), *identity)


def _mapped_identity(address: int) -> tuple[int, int] | None:
    """(device, inode) of the file mapped at ``address`` in this process, if the system says."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        start, _, end = fields[0].partition("-")
        if int(start, 16) <= address < int(end, 16) and len(fields) >= 5:
            major, _, minor = fields[3].partition(":")
            return os.makedev(int(major, 16), int(minor, 16)), int(fields[4])
    return None


@functools.lru_cache(maxsize=4)
def _open_file(where: MappedArray) -> int:
    """A read descriptor of ``where``'s file, checked to be the file described (kept for the worker's life)."""
    descriptor = os.open(where.filename, os.O_RDONLY)
    try:
        where._check(os.fstat(descriptor))
    except OSError:
        os.close(descriptor)
        raise
    return descriptor


def _apply_to_mapped_rows(func: Callable[..., Result], where: MappedArray, job: tuple[int | None, np.ndarray]) -> Result:
    start, rows = job
    return func(where.read_rows(rows)) if start is None else func(start, where.read_rows(rows))


def _apply_indexed(func: Callable[..., Result], job: tuple[int, np.ndarray]) -> Result:
    return func(*job)


def map_rows(
    func: Callable[[np.ndarray], Result],
    images: np.ndarray,
    rows: np.ndarray,
    *,
    batch_size: int,
    workers: int,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    pool: ProcessPoolExecutor | None = None,
    indexed: bool = False,
) -> Iterator[tuple[int, Result]]:
    """``(start, func(images[rows[start:start + batch_size]]))`` for each batch, in order.

    ``indexed``: call ``func(start, batch)`` instead, for work that puts its result at the batch's
    place itself (see :class:`RowTarget`).

    Workers map ``images``' file themselves when it is mapped as a whole (see :func:`mapped_array`);
    otherwise they receive each batch, after ``prepare`` (which may shrink it, e.g. to greyscale;
    ``func`` must accept both forms). A file replaced while its rows are being worked on falls back
    to sending the rest from this process's map, which still holds the old file.
    """
    rows = np.asarray(rows)
    starts = list(range(0, len(rows), batch_size))
    chunks = [rows[start : start + batch_size] for start in starts]
    workers = min(workers, len(starts))
    pool = pool if workers > 1 else None  # one batch: here, not in a worker
    where = mapped_array(images) if workers > 1 else None
    done = 0
    if where is not None:
        try:
            mapped = functools.partial(_apply_to_mapped_rows, func, where)
            jobs = [(start if indexed else None, chunk) for start, chunk in zip(starts, chunks)]
            for result in parallel_map(mapped, jobs, workers=workers, pool=pool):
                yield starts[done], result
                done += 1
            return
        except OSError:
            pass
    batches = (images[chunk] if prepare is None else prepare(images[chunk]) for chunk in chunks[done:])
    if indexed:
        func, batches = functools.partial(_apply_indexed, func), zip(starts[done:], batches)
    for result in parallel_map(func, batches, workers=workers, pool=pool):
        yield starts[done], result
        done += 1


# --- appending to an .npy file ------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # format version 1.0: a 2-byte little-endian header length follows
_NPY_ALIGN = 64


def npy_header(shape: tuple[int, ...], dtype: np.dtype, length: int | None = None) -> bytes:
    """An ``.npy`` (version 1.0) header for a C-ordered array, padded with spaces to ``length`` bytes.

    numpy pads its headers the same way (to a multiple of 64); padding to a given length lets a
    header for fewer rows overwrite the one written for the capacity.
    """
    text = f"{{'descr': {np.lib.format.dtype_to_descr(np.dtype(dtype))!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    minimum = len(_NPY_MAGIC) + 2 + len(text) + 1
    length = length or -(-minimum // _NPY_ALIGN) * _NPY_ALIGN
    if length < minimum:
        raise ValueError(f"an .npy header for shape {shape} needs {minimum} bytes, more than {length}")
    body = text.ljust(length - len(_NPY_MAGIC) - 2 - 1) + "\n"
    return _NPY_MAGIC + struct.pack("<H", len(body)) + body.encode("latin1")


@dataclass(frozen=True)
class RowTarget:
    """Where worker processes write rows of an :class:`NpyWriter`'s file themselves, at known places.

    Sending each converted image back to one process costs about what converting it does when the
    work per image is small (array sources); writing it in place costs a ``pwrite``.
    """

    filename: str
    offset: int
    row_bytes: int

    def write(self, first_row: int, rows: np.ndarray) -> None:
        """Rows ``first_row, first_row + 1, ...``."""
        self.write_rows(list(range(first_row, first_row + len(rows))), list(rows))

    def write_rows(self, places: list[int], rows: list[np.ndarray]) -> None:
        """Each of ``rows`` at its row number in ``places``."""
        descriptor = os.open(self.filename, os.O_WRONLY)
        try:
            for place, row in zip(places, rows):
                data = np.ascontiguousarray(row).tobytes()
                if len(data) != self.row_bytes:
                    raise ValueError(f"{self.filename}: a row of {len(data)} bytes, expected {self.row_bytes}")
                _pwrite_all(descriptor, data, self.offset + place * self.row_bytes)
        finally:
            os.close(descriptor)


def _pwrite_all(descriptor: int, data: bytes | memoryview, position: int) -> None:
    view, written = memoryview(data), 0
    while written < len(view):
        written += os.pwrite(descriptor, view[written:], position + written)


class NpyWriter:
    """Append rows of shape ``row_shape`` to ``path``; :meth:`finish` fixes the count and maps the file.

    At most ``capacity`` rows; the header reserves room for that count, so it can be rewritten in
    place for the number actually written. Writes go through the file, not a map, so pages already
    written do not count in this process's memory. Rows come either from :meth:`append` here or
    from workers writing through :meth:`target`, not both.
    """

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: Any, capacity: int) -> None:
        self.path, self.row_shape, self.dtype = Path(path), tuple(row_shape), np.dtype(dtype)
        self.capacity, self.count = capacity, 0
        self._header_length = len(npy_header((capacity, *self.row_shape), self.dtype))
        self._file = open(self.path, "w+b")  # read too: compact() moves rows within it
        self._file.write(npy_header((0, *self.row_shape), self.dtype, self._header_length))

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape or rows.dtype != self.dtype:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]} {rows.dtype}, expected {self.row_shape} {self.dtype}")
        if self.count + len(rows) > self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows reserved")
        self._file.write(np.ascontiguousarray(rows).tobytes())
        self.count += len(rows)

    def target(self) -> RowTarget:
        """Where workers may write rows themselves; call :meth:`written` for each batch they wrote."""
        self._file.flush()
        return RowTarget(str(self.path), self._header_length, int(np.prod(self.row_shape)) * self.dtype.itemsize)

    def written(self, rows: int) -> None:
        """Count ``rows`` written through :meth:`target` (at rows ``count .. count + rows - 1``)."""
        if self.count + rows > self.capacity:
            raise ValueError(f"{self.path}: more than the {self.capacity} rows reserved")
        self.count += rows

    def compact(self, keep: np.ndarray) -> None:
        """Drop the rows where ``keep`` is False (rows left unwritten, say), moving the rest up in place.

        Only the rows after the first gap move, a run of kept rows (up to 64 MB) at a time.
        """
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != self.count:
            raise ValueError(f"{self.path}: {len(keep)} flags for {self.count} rows")
        if keep.all():
            return
        self._file.flush()
        descriptor, row_bytes = self._file.fileno(), int(np.prod(self.row_shape)) * self.dtype.itemsize
        step = max(1, (64 << 20) // max(row_bytes, 1))
        target = int(np.argmin(keep))
        kept = np.flatnonzero(keep)
        kept = kept[kept > target]
        breaks = np.flatnonzero(np.diff(kept) != 1) + 1
        for run in np.split(kept, breaks):
            for start in range(0, len(run), step):
                first, count = int(run[start]), min(step, len(run) - start)
                data = os.pread(descriptor, count * row_bytes, self._header_length + first * row_bytes)
                _pwrite_all(descriptor, data, self._header_length + target * row_bytes)
                target += count
        self.count = target
        os.ftruncate(descriptor, self._header_length + target * row_bytes)

    def finish(self) -> np.ndarray:
        """Write the header for the rows written, close, and return the file memory-mapped read-only."""
        self._file.seek(0)
        self._file.write(npy_header((self.count, *self.row_shape), self.dtype, self._header_length))
        self._file.close()
        if self.count == 0:  # nothing to map (mmap refuses an empty region)
            return np.empty((0, *self.row_shape), self.dtype)
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def close(self) -> None:
        """Close without finishing (the file is left for its caller to remove)."""
        self._file.close()
