"""Inverted-file indexes built shard by shard, never holding all vectors in memory.

Why: ``clipforge index`` used to map every vector into one array and ``add`` it to an in-memory
index, so the largest collection it could index was bounded by RAM. Here an IVF / IVF-PQ /
OPQ+IVF-PQ index is

1. **trained** on a random sample (rank 0), saved as an empty trained index;
2. **filled in parts**: part ``j`` holds rows ``[j*P, (j+1)*P)`` of the collection, added to a
   copy of the trained index and written to disk; under ``torchrun`` the parts are split over
   the ranks (contiguous runs, :func:`clipforge.search.sharding.contiguous_split`);
3. **merged**: the parts' inverted lists are concatenated, in part order, into one on-disk
   inverted-list file (faiss ``OnDiskInvertedLists``), which the server memory-maps; the bytes
   are copied file to file, one part at a time, so the merge holds ``O(nlist)`` memory.

Each list holds its vectors in row order whatever the part size or the number of ranks, so a
build by many ranks is the same index as a build by one. Vectors are read with ``pread``
(:class:`RowReader`), not memory-mapped, so the build's address space holds one chunk, the
training sample, one part and the mapping of the finished lists, not the collection nor the
parts (tested under ``RLIMIT_AS``); calibration drops the pages of the lists it has searched
(:func:`release_pages`), so resident memory does not grow with the index either.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import DataError
from clipforge.search import sharding
from clipforge.search.faiss_lib import load_faiss

log = logging.getLogger(__name__)

CHUNK_ROWS = 16_384  # vectors converted to float32 at a time (32 MiB at 512-d)
PART_MEMORY = 256 * 2**20  # codes one part may hold when no --max-memory is given
TRAIN_MAX = 262_144  # training points at most: kmeans time grows with points x lists
COPY_CHUNK = 16 * 2**20  # merge buffer where the kernel cannot copy file to file
RESIDENT_LISTS = 256 * 2**20  # list pages a batch of calibration queries may map before release
MIN_QUERY_BATCH = 20  # faiss's flat quantizer switches to BLAS at 20 queries: same arithmetic
MADV_DONTNEED = 4


class RowReader:
    """Rows of a 2-D ``.npy`` file read with ``pread``: random access without mapping the file.

    Quacks like the read-only array the index code needs (``shape``, ``dtype``, ``len``, slices,
    integer arrays of rows), so calibration and re-scoring run on it during a build while the
    address space holds only the rows asked for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if fortran or len(shape) != 2:
            raise DataError(f"{self.path}: expected a C-ordered 2-D array, got shape {shape}")
        self.shape, self.dtype = tuple(int(x) for x in shape), np.dtype(dtype)
        self._row = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        n = max(0, stop - start)
        buf = os.pread(self._fd, n * self._row, self._offset + start * self._row)
        return np.frombuffer(buf, self.dtype).reshape(n, self.shape[1])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            rows = self._read(start, stop)
            return rows if step == 1 else rows[::step]
        if isinstance(key, (int, np.integer)):
            return self._read(int(key) % self.shape[0], int(key) % self.shape[0] + 1)[0]
        rows = np.asarray(key, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        for j, r in enumerate(rows):
            out[j] = self._read(int(r), int(r) + 1)[0]
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __del__(self) -> None:
        self.close()


def write_npy(path: Path, chunks: Iterable[np.ndarray], n: int, dim: int, dtype: str = "float16") -> None:
    """Stream chunks into one ``.npy`` (temp file, then rename) with plain writes: neither all
    rows in RAM nor a mapping of the whole file in the address space."""
    from clipforge.atomic import atomic_path

    dt = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, dim)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        pos = 0
        for chunk in chunks:
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise DataError(f"{path}: embedding shard has shape {chunk.shape}, expected (*, {dim})")
            f.write(np.ascontiguousarray(chunk, dtype=dt).tobytes())
            pos += len(chunk)
        if pos != n:
            raise DataError(f"embedding shards hold {pos} rows but the manifest says {n}")


def float_chunks(
    rows: Any, start: int = 0, stop: int | None = None, size: int = CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """Float32 chunks of rows ``[start, stop)`` of an array or :class:`RowReader`."""
    stop = rows.shape[0] if stop is None else stop
    for b in range(start, stop, size):
        yield np.ascontiguousarray(rows[b : min(b + size, stop)], dtype=np.float32)


def part_rows(code_size: int, budget: int | None) -> int:
    """Rows per part: a part's codes and ids take at most a quarter of the budget (or 256 MiB)."""
    share = budget // 4 if budget else PART_MEMORY
    return int(max(4096, min(1 << 22, share // (code_size + 8))))


def training_rows(n: int, want: int, seed: int) -> np.ndarray:
    """Sorted random rows for training (the same on every rank and run for one seed)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n, want), replace=False))


# --------------------------------------------------------------------------- the three steps
def train_to(path: Path, index: Any, sample: np.ndarray) -> None:
    """Train the empty ``index`` on ``sample`` and save it (step 1, rank 0)."""
    from clipforge.atomic import atomic_path

    faiss = load_faiss()
    index.train(sample)
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def build_parts(
    trained: Path,
    rows: Any,
    start: int,
    part_dir: Path,
    budget: int | None = None,
    progress: bool = True,
    size: int | None = None,
) -> list[Path]:
    """Add this rank's parts of ``rows[start:]`` (id = row number) to copies of the trained index.

    Every rank calls this; the parts are a pure function of the row count and part size, and
    each rank writes only its own (step 2)."""
    from tqdm import tqdm

    from clipforge.atomic import atomic_path

    faiss = load_faiss()
    base = faiss.read_index(str(trained))
    size = size or part_rows(faiss.extract_index_ivf(base).code_size, budget)
    bounds = [(b, min(b + size, len(rows))) for b in range(start, len(rows), size)]
    rank, world = sharding.world()
    owners = sharding.contiguous_split([b - a for a, b in bounds], world)
    mine = [j for j, r in enumerate(owners) if r == rank]
    desc = "index" if world == 1 else f"index rank {rank}/{world}"
    with tqdm(total=sum(bounds[j][1] - bounds[j][0] for j in mine), unit="vec", desc=desc,
              disable=not progress, position=rank) as bar:  # fmt: skip
        for j in mine:
            part = faiss.clone_index(base)
            a, b = bounds[j]
            for k, chunk in enumerate(float_chunks(rows, a, b)):
                first = a + k * CHUNK_ROWS
                part.add_with_ids(chunk, np.arange(first, first + len(chunk), dtype=np.int64))
                bar.update(len(chunk))
            with atomic_path(part_dir / f"part_{j:05d}.faiss") as tmp:
                faiss.write_index(part, str(tmp))
            del part
    return [part_dir / f"part_{j:05d}.faiss" for j in range(len(bounds))]


def merge_parts(trained: Path, parts: Sequence[Path], ivfdata: Path, before: Any = None) -> Any:
    """One index whose inverted lists (in ``ivfdata``) concatenate ``before``'s lists (an existing
    index, for ``index --add``) and the parts', in that order (step 3, rank 0).

    The layout is faiss's ``merge_from_multiple`` (list ``j``: its codes then its ids, lists
    packed in order), but the bytes move file to file (``copy_file_range``), one source at a
    time: the merge neither maps the parts nor writes through the output's mapping, so its
    memory is ``O(nlist)`` whatever the number of vectors (faiss's merge mapped every part and
    dirtied every page of the output: resident memory grew by twice the index size).
    """
    faiss = load_faiss()
    index = faiss.read_index(str(trained))
    ivf = faiss.extract_index_ivf(index)
    nlist, code_size = int(ivf.nlist), int(ivf.code_size)
    sources: list[Any] = ([before] if before is not None else []) + list(parts)
    sizes = np.zeros(nlist, np.uint64)
    for src in sources:
        with _source_lists(src, nlist, code_size) as (_, layout):
            sizes += layout[:, 0].astype(np.uint64)
    counts = sizes.astype(np.int64)
    starts = np.zeros(nlist + 1, np.int64)  # byte offset of each list in the output
    np.cumsum(counts * (code_size + 8), out=starts[1:])
    ondisk = faiss.OnDiskInvertedLists(nlist, code_size, str(ivfdata))
    ondisk.prefetch_nthread = 0  # see read_ondisk
    with _quiet_stdout():  # faiss prints every file resize
        ondisk.update_totsize(int(starts[-1]))  # creates the file at its final size and maps it
    ondisk.set_all_lists_sizes(faiss.swig_ptr(sizes))  # offsets: lists packed in order, as above
    filled = np.zeros(nlist, np.int64)
    dst = os.open(ivfdata, os.O_WRONLY)
    try:
        for src in sources:
            with _source_lists(src, nlist, code_size) as (fd, layout):
                _copy_lists(fd, layout, dst, starts, counts, filled, code_size)
        os.fsync(dst)
    finally:
        os.close(dst)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns it now
    ivf.ntotal = index.ntotal = int(counts.sum())
    return index


def _copy_lists(
    fd: int, layout: np.ndarray, dst: int, starts: np.ndarray, sizes: np.ndarray, filled: np.ndarray,
    code_size: int,
) -> None:  # fmt: skip
    """Append one source's lists (``layout`` rows: size, capacity, byte offset in ``fd``) after
    what earlier sources put in each output list (``filled`` vectors, updated)."""
    for j in np.flatnonzero(layout[:, 0]):
        n, cap, off = (int(v) for v in layout[j])
        done = int(filled[j])
        _copy_bytes(fd, off, dst, int(starts[j]) + done * code_size, n * code_size)
        ids_at = int(starts[j]) + int(sizes[j]) * code_size + done * 8
        _copy_bytes(fd, off + cap * code_size, dst, ids_at, n * 8)
        filled[j] += n


@contextlib.contextmanager
def _source_lists(src: Any, nlist: int, code_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(file descriptor, per-list size / capacity / byte offset) of a merge source: a part file
    (opened only for as long as it is copied) or an index whose lists are already on disk."""
    faiss = load_faiss()
    index = faiss.read_index(str(src), faiss.IO_FLAG_MMAP) if isinstance(src, Path) else src
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    name = src if isinstance(src, Path) else Path(lists.filename)
    if type(lists).__name__ != "OnDiskInvertedLists" or lists.nlist != nlist or lists.code_size != code_size:
        raise DataError(f"{name}: not inverted lists of this index ({type(lists).__name__})")
    entries = lists.lists
    layout = np.array([(e.size, e.capacity, e.offset) for e in map(entries.at, range(nlist))], np.int64)
    fd = os.open(name, os.O_RDONLY)
    try:
        yield fd, layout.reshape(nlist, 3)
    finally:
        os.close(fd)
        del lists, index  # a part's mapping goes with its index


def _copy_bytes(src: int, src_at: int, dst: int, dst_at: int, n: int) -> None:
    """``n`` bytes from ``src`` at ``src_at`` to ``dst`` at ``dst_at``, kernel to kernel where the
    file system allows it, else through a bounded buffer."""
    while n > 0:
        try:
            done = os.copy_file_range(src, dst, n, src_at, dst_at)
        except OSError as e:  # EXDEV, ENOSYS, EOPNOTSUPP, EINVAL: copy through user space
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            done = os.pwrite(dst, os.pread(src, min(n, COPY_CHUNK), src_at), dst_at)
        if done <= 0:
            raise DataError(f"inverted lists end early: {n} bytes missing at offset {src_at}")
        src_at, dst_at, n = src_at + done, dst_at + done, n - done


def read_ondisk(path: Path, ivfdata: Path) -> Any:
    """Read an index whose lists live in ``ivfdata`` (memory-mapped read-only), wherever the folder
    was moved: the file name stored inside the index is replaced by the real one."""
    faiss = load_faiss()
    index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if type(lists).__name__ != "OnDiskInvertedLists":
        raise DataError(f"{path}: expected on-disk inverted lists, found {type(lists).__name__}")
    lists.filename = str(ivfdata)
    lists.read_only = True
    # faiss starts 32 prefetch threads per search by default (each with its stack and malloc
    # arena: ~400 MB of address space); the lists are mapped pages, the kernel reads them ahead
    lists.prefetch_nthread = 0
    lists.do_mmap()
    return index


def _ondisk_lists(index: Any) -> Any:
    """The ``OnDiskInvertedLists`` of an IVF index, or ``None`` (other kinds, in-memory lists)."""
    faiss = load_faiss()
    try:
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:  # not an IVF index
        return None
    return lists if type(lists).__name__ == "OnDiskInvertedLists" and lists.totsize else None


def query_batch(index: Any, nprobe: int, n_queries: int) -> int:
    """Queries per search call such that the list pages they touch stay near ``RESIDENT_LISTS``
    (at least ``MIN_QUERY_BATCH``; all of them for in-memory lists or a small index).

    The floor sets the limit of the bound: 20 queries x ``nprobe`` lists, which grows with the
    mean list (n / nlist) once ``--max-memory`` caps nlist (4,096 lists at 3 GB: ~0.45 GB at
    10M vectors, ~2.3 GB at 100M; file-backed pages the kernel may drop, but counted in RSS)."""
    lists = _ondisk_lists(index)
    if lists is None:
        return max(1, n_queries)
    per_query = 2 * nprobe * int(lists.totsize) // max(1, int(lists.nlist))  # x2: big lists are hit more
    return int(min(max(1, n_queries), max(MIN_QUERY_BATCH, RESIDENT_LISTS // max(1, per_query))))


def release_pages(index: Any) -> None:
    """Drop this process's resident pages of ``index``'s on-disk lists (no-op for other indexes).

    Why: a searched list's mapped pages count in the process's resident set until unmapped, and
    calibration probes nearly every list, so a build's peak RSS would grow by the whole index.
    ``MADV_DONTNEED`` on a shared file mapping loses nothing: the pages stay in the page cache
    and the next search maps them again."""
    import ctypes

    lists = _ondisk_lists(index)
    if lists is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(int(lists.ptr), int(lists.totsize), MADV_DONTNEED) != 0:
        log.debug("madvise failed (errno %d); list pages stay resident", ctypes.get_errno())


# --------------------------------------------------------------------------- helpers
def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level writes to stdout (faiss's progress printf) without touching Python's."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
