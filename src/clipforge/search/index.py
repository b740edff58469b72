"""Build, save, load and extend a faiss index over an embedding folder.

Choosing the index (``kind="auto"``):

- fewer than ``FLAT_MAX`` vectors: exact inner product (``flat``) - it is fast enough and exact;
- up to ``HNSW_MAX``: ``hnsw`` (graph; lowest latency, builds in a minute or two on a laptop);
- beyond: ``ivf`` (inverted lists, flat codes; builds in minutes even at millions of vectors);
- when ``max_memory`` rules the preferred kind out: ``ivfpq`` with the largest product-quantizer
  code that fits. Its candidates are re-scored exactly from the memory-mapped float16 embeddings,
  so compression costs little recall (the re-scoring reads disk pages, not resident memory).

After building, the search knob (``nprobe`` / ``efSearch``) is *calibrated*: a sample of indexed
vectors is used as queries (each one excluded from its own results, which mimics a held-out query
from the same distribution), exact neighbours are computed by brute force, and the smallest knob
value reaching ``target_recall`` (+ a small margin) is saved in the manifest. The measured recall
is what ``clipforge index`` prints as the expected recall. ``add_to_index`` re-calibrates.

``load_index`` memory-maps the bulk of the index (IVF inverted lists; the vectors of ``flat`` and
``hnsw``), and the Searcher memory-maps the embeddings, so a server's resident memory stays small
and several processes share the page cache.

Index folder layout (generation ``g`` increments on every rewrite; ``manifest.json`` is written
last and names the live files, so a crash at any point leaves a consistent index):
``index-g.faiss``, ``embeddings-g.npy`` (the embed dtype; for query-by-id, dedup and re-scoring),
``metadata-g.cftable`` (memory-mapped columns, see ``tables.write_mapped_table``), ``manifest.json``.

IVF kinds (``ivf``, ``ivfpq``) are built shard by shard (:mod:`clipforge.search.build`): trained on
a sample, filled in parts (in parallel under ``torchrun``), merged into on-disk inverted lists
``index-g.ivfdata`` beside ``index-g.faiss``, plus ``index-g.trained`` (the empty trained index
``index --add`` fills new parts from). No step holds all vectors; ``--max-memory`` bounds the
training sample, the part size and, with the planner's choice, the index at query time. From one
million vectors ``ivfpq`` adds an OPQ rotation, and from 8,192 lists the coarse quantizer is an
HNSW graph (assigning a vector then costs ~log(nlist), not nlist, distance computations).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.column_tables import (
    atomic_write_json,
    find_table,
    iter_table_chunks,
    read_json,
)
from clipforge.data.embeddings import iter_embedding_chunks, load_manifest
from clipforge.errors import ClipforgeError, DataError
from clipforge.search import build as streamed
from clipforge.search import sharding
from clipforge.search.faiss_lib import load_faiss
from clipforge.search.tables import MAPPED_SUFFIX, open_metadata, write_mapped_table_chunks

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
FLAT_MAX = 50_000
HNSW_MAX = 250_000
HNSW_M = 32
RERANKS = (8, 16, 32)  # ivfpq: candidates fetched per result (then re-scored exactly), tried in turn
CALIBRATION_QUERIES = 500
CALIBRATION_K = 10
CALIBRATION_MARGIN = {"hnsw": 0.035}  # others: 0.02 (see calibrate)
SMALL_PARALLEL = 20_000
STREAMED_KINDS = ("ivf", "ivfpq")  # built shard by shard into on-disk inverted lists
OPQ_MIN = 1_000_000  # ivfpq learns a rotation first: PQ sub-spaces then carry equal variance
HNSW_QUANTIZER_MIN = 8192  # lists from which the coarse quantizer is a graph, not a flat scan
MANIFEST = "manifest.json"
INDEX_FORMAT_VERSION = 1


class SearchIndexError(ClipforgeError):
    """The index folder is missing, corrupt, or does not fit the request."""


@dataclass
class IndexPlan:
    """What will be built and why; ``memory_bytes`` is the resident size of the faiss index."""

    kind: str
    memory_bytes: int
    reason: str
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- planning
def parse_memory(value: str | int | float | None) -> int | None:
    """``"2GB"``, ``"512MiB"``, ``"1.5G"``, ``3e9`` -> bytes (decimal and binary units)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*", value.lower())
    if not m:
        raise ClipforgeError(f"cannot parse memory size {value!r}; use e.g. 2GB, 512MB, 1.5GiB")
    num, unit, binary, _ = m.groups()
    base = 1024 if binary else 1000
    return int(float(num) * base ** "_kmgt".index(unit or "_"))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _nlist(n: int, dim: int = 0, budget: int | None = None) -> int:
    """About 4*sqrt(n) lists (a power of two), and at least ~39 training points per list; under a
    memory budget, no more lists than the training sample the budget allows can train."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    cap = n // 39
    if budget and dim:
        cap = min(cap, max(1, max_training_rows(dim, budget) // 39))
        nlist = 2 ** int(math.log2(max(1, min(nlist, cap))))
    return int(max(1, min(nlist, cap, 65536)))


def max_training_rows(dim: int, budget: int | None) -> int:
    """Training points (float32) in an eighth of ``budget`` (k-means and PQ training hold about
    four copies of the sample: residuals, sub-space slices, assignments), at most ``TRAIN_MAX``."""
    if not budget:
        return streamed.TRAIN_MAX
    return int(min(streamed.TRAIN_MAX, budget // 8 // (dim * 4)))


def _pq_choices(dim: int) -> list[int]:
    """Code sizes tried, largest first. No more than dim/8 bytes: candidates are re-scored exactly
    from the stored embeddings, so finer codes buy little recall and cost much training time."""
    return [m for m in (dim // 8, dim // 16, dim // 32) if m >= 1 and dim % m == 0] or [1]


def _pq_nbits(n: int) -> int:
    # 8-bit codes need ~10k training points; tiny collections get coarser (still valid) codes.
    return int(min(8, max(4, math.floor(math.log2(max(n, 16) / 39)))))


def estimate_memory(kind: str, n: int, dim: int, **params: Any) -> int:
    nlist = params.get("nlist", _nlist(n))
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        m = params.get("hnsw_m", HNSW_M)
        return int(n * (dim * 4 + m * 2 * 4 * 1.1 + 16))
    if kind == "ivf":
        return n * (dim * 4 + 8) + nlist * dim * 4
    if kind == "ivfpq":
        m = params.get("pq_m", _pq_choices(dim)[0])
        return n * (m + 8) + nlist * dim * 4 + dim * 2 ** params.get("pq_nbits", 8) * 4
    raise SearchIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


def plan_index(n: int, dim: int, kind: str = "auto", max_memory: int | str | None = None) -> IndexPlan:
    """Pick the index kind and its build parameters for ``n`` vectors of ``dim`` dimensions."""
    budget = parse_memory(max_memory)
    if kind not in KINDS:
        raise SearchIndexError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if kind == "auto":
        size_pref = ["flat"] if n < FLAT_MAX else ["hnsw", "ivf"] if n < HNSW_MAX else ["ivf"]
        candidates = size_pref + ["ivfpq"]
    else:
        candidates = [kind]
    for k in candidates:
        options = [{"pq_m": m} for m in _pq_choices(dim)] if k == "ivfpq" else [{}]
        for opt in options:
            params = {"nlist": _nlist(n, dim, budget), **opt} if k in ("ivf", "ivfpq") else dict(opt)
            if k == "hnsw":
                params["hnsw_m"] = HNSW_M
            if k in ("ivf", "ivfpq"):
                params["quantizer"] = "hnsw" if params["nlist"] >= HNSW_QUANTIZER_MIN else "flat"
            if k == "ivfpq":
                params["pq_nbits"] = _pq_nbits(n)
                params["opq"] = n >= OPQ_MIN
            mem = estimate_memory(k, n, dim, **params)
            if budget is None or mem <= budget:
                why = (
                    f"{n:,} vectors: exact search is fast enough"
                    if k == "flat"
                    else f"{n:,} vectors: graph index for low latency"
                    if k == "hnsw"
                    else f"{n:,} vectors: inverted lists over {params['nlist']} clusters"
                    if k == "ivf"
                    else f"compressed to {params['pq_m']} bytes/vector to fit memory"
                )
                if kind != "auto":
                    why = f"requested kind {kind!r}"
                elif k != size_pref[0]:
                    why += f" ({size_pref[0]} would need {_fmt_bytes(estimate_memory(size_pref[0], n, dim))})"
                return IndexPlan(k, mem, why, params)
    need = min(estimate_memory(k, n, dim) for k in candidates)
    raise SearchIndexError(
        f"no index kind among {candidates} fits --max-memory {_fmt_bytes(budget or 0)} "
        f"for {n:,} x {dim} vectors (smallest needs ~{_fmt_bytes(need)})"
    )


# --------------------------------------------------------------------------- building
def _metric(metric: str):
    faiss = load_faiss()
    if metric not in ("ip", "l2"):
        raise SearchIndexError(f"metric must be 'ip' or 'l2', got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _new_index(plan: IndexPlan, dim: int, metric: str):
    faiss = load_faiss()
    mt = _metric(metric)
    p = plan.params
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["hnsw_m"], mt)
        index.hnsw.efConstruction = 64
        return index
    if p.get("quantizer") == "hnsw":
        quantizer = faiss.IndexHNSWFlat(dim, 32, mt)
        quantizer.hnsw.efConstruction, quantizer.hnsw.efSearch = 40, 64
    else:
        quantizer = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    if plan.kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, p["nlist"], mt)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["pq_m"], p["pq_nbits"], mt)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.niter = 12
    index.cp.min_points_per_centroid = 5  # we size nlist/nbits for the data; skip faiss's warning
    if plan.kind == "ivfpq":
        index.pq.cp.min_points_per_centroid = 5
    if plan.kind == "ivfpq" and p.get("opq"):
        opq = faiss.OPQMatrix(dim, p["pq_m"])
        opq.niter, opq.max_train_points = 20, 65_536  # the rotation converges long before faiss's 50
        wrapped = faiss.IndexPreTransform(opq, index)
        wrapped.own_fields = True
        opq.this.disown()
        index.this.disown()
        return wrapped
    return index


@contextlib.contextmanager
def omp_threads(n_vectors: int):
    """One OpenMP thread for small collections: on a busy machine faiss's spinning threads cost
    far more than they save when each parallel region only holds microseconds of work."""
    faiss = load_faiss()
    before = faiss.omp_get_max_threads()
    if n_vectors < SMALL_PARALLEL:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _chunks(arrays: Iterable[np.ndarray], size: int = 65_536) -> Iterable[np.ndarray]:
    """Float32 chunks of at most ``size`` rows from (possibly float16, memory-mapped) arrays."""
    for arr in arrays:
        for start in range(0, arr.shape[0], size):
            yield np.ascontiguousarray(arr[start : start + size], dtype=np.float32)


def _training_sample(emb: Any, plan: IndexPlan, seed: int, budget: int | None = None) -> np.ndarray:
    """A seeded random sample of rows: 30 per list (20k at least; 64 per PQ centroid for ivfpq),
    no more than :func:`max_training_rows` allows."""
    n = emb.shape[0]
    if plan.kind in STREAMED_KINDS:
        rows = _training_rows_for(emb, plan, seed, budget)
    else:
        rows = streamed.training_rows(n, n, seed)
    return np.ascontiguousarray(emb[rows], dtype=np.float32)


def build_index(
    emb_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str = "auto",
    max_memory: int | str | None = None,
    metric: str = "ip",
    target_recall: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    part_rows: int | None = None,
) -> dict[str, Any]:
    """Build an index over ``emb_dir`` (from ``clipforge embed``) into ``out_dir``; returns the manifest.

    Called on every rank of an initialised process group (``clipforge index`` under torchrun),
    the parts of an IVF build are split over the ranks and rank 0 merges them; every rank
    returns the manifest. ``part_rows`` sets the vectors per part (default: from the budget).
    """
    load_faiss()  # fail before any work if faiss is missing
    emb_manifest, plan = _load_and_plan(emb_dir, kind, max_memory)
    n, dim = int(emb_manifest["count"]), int(emb_manifest["dim"])
    budget = parse_memory(max_memory)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = emb_manifest.get("dtype", "float16")
    t0 = time.perf_counter()

    def prepare() -> int:  # rank 0: the new generation's copy of the vectors, streamed
        gen = _next_generation(out)
        _write_embeddings(out / f"embeddings-{gen}.npy", iter_embedding_chunks(emb_dir), n, dim, dtype)
        return gen

    gen = sharding.agree(prepare)
    emb_path = out / f"embeddings-{gen}.npy"
    rank = sharding.world()[0]
    if plan.kind in STREAMED_KINDS:
        index = _build_streamed(out, gen, emb_path, plan, metric, seed, budget, progress, part_rows)
    elif rank == 0:
        index = _build_in_memory(emb_path, plan, metric, seed, progress)
    if rank != 0:
        sharding.wait_all()  # rank 0 calibrates and saves
        return read_manifest(out)
    build_s = time.perf_counter() - t0
    rows = streamed.RowReader(emb_path)
    with omp_threads(n):
        params, recall = calibrate(index, plan.kind, rows, metric, target_recall=target_recall, seed=seed)
    log.info("calibrated %s in %.1fs", params, time.perf_counter() - t0 - build_s)
    manifest = _index_manifest(
        emb_manifest, plan, gen, metric, int(index.ntotal), dtype, (params, recall, target_recall), build_s
    )
    if plan.kind in STREAMED_KINDS:
        manifest |= _streamed_fields(
            gen, len(_training_rows_for(rows, plan, seed, budget)), budget, part_rows
        )
    _save(out, index, iter_table_chunks(find_table(Path(emb_dir), "metadata")), manifest)
    summary = f"{plan.kind}, expected recall@10 {recall:.3f}, {_fmt_bytes(plan.memory_bytes)}"
    log.info("index built in %.1fs: %s", build_s, summary)
    sharding.wait_all()
    return manifest


def _load_and_plan(
    emb_dir: str | os.PathLike, kind: str, max_memory: Any
) -> tuple[dict[str, Any], IndexPlan]:
    """The embed folder's manifest and the index planned for it; an empty collection is an error."""
    emb_manifest = load_manifest(emb_dir)
    n, dim = int(emb_manifest["count"]), int(emb_manifest["dim"])
    if n == 0:
        raise DataError(f"{emb_dir}: no embeddings to index (all images skipped?)")
    plan = plan_index(n, dim, kind, max_memory)
    log.info("index: %s, ~%s in memory (%s)", plan.kind, _fmt_bytes(plan.memory_bytes), plan.reason)
    return emb_manifest, plan


def _streamed_fields(gen: int, train_rows: int, budget: int | None, part_rows: int | None) -> dict[str, Any]:
    """What an index built shard by shard adds to its manifest: its extra files and how it was built."""
    return {
        "ivfdata_file": f"index-{gen}.ivfdata",
        "trained_file": f"index-{gen}.trained",
        "build": {
            "ranks": sharding.world()[1],
            "max_memory": budget,
            "part_rows": part_rows,
            "train_rows": train_rows,
        },
    }


def _index_manifest(
    emb_manifest: dict[str, Any],
    plan: IndexPlan,
    gen: int,
    metric: str,
    count: int,
    dtype: str,
    calibration: tuple[dict[str, Any], float, float],
    build_s: float,
) -> dict[str, Any]:
    """The manifest of generation ``gen``: what was built, how to search it (``calibration``:
    params, expected recall, target), which model embedded it and the generation's file names."""
    params, recall, target_recall = calibration
    return {
        "format": "clipforge-index",
        "version": INDEX_FORMAT_VERSION,
        "generation": gen,
        "kind": plan.kind,
        "metric": metric,
        "count": count,
        "dim": int(emb_manifest["dim"]),
        "dtype": dtype,
        "build_params": plan.params,
        "search_params": params,
        "expected_recall_at_10": recall,
        "target_recall": target_recall,
        "memory_bytes": plan.memory_bytes,
        "reason": plan.reason,
        "build_seconds": round(build_s, 3),
        "model": {
            "name": emb_manifest.get("model"),
            "pretrained": emb_manifest.get("pretrained"),
            "config": emb_manifest.get("model_config"),  # the architecture itself, to rebuild it exactly
            "preprocess": emb_manifest.get("preprocess"),  # image queries get the same convention
        },
        "index_file": f"index-{gen}.faiss",
        "embeddings_file": f"embeddings-{gen}.npy",
        "metadata_file": f"metadata-{gen}{MAPPED_SUFFIX}",
    }


def _build_in_memory(emb_path: Path, plan: IndexPlan, metric: str, seed: int, progress: bool) -> Any:
    """flat / hnsw: these hold every vector in memory by nature (the planner sizes them)."""
    emb = np.load(emb_path, mmap_mode="r")
    index = _new_index(plan, emb.shape[1], metric)
    with omp_threads(emb.shape[0]):
        if not index.is_trained:
            index.train(_training_sample(emb, plan, seed))
        _add_with_progress(index, _chunks([emb]), emb.shape[0], progress)
    return index


def _training_rows_for(rows: Any, plan: IndexPlan, seed: int, budget: int | None) -> np.ndarray:
    n, dim = rows.shape
    want = min(n, max(30 * plan.params["nlist"], 20_000))
    if plan.kind == "ivfpq":
        want = min(n, max(want, 64 * 2 ** plan.params["pq_nbits"]))
    # the budget never cuts the sample below 1,024 points (2 MiB at 512-d): codebooks need them
    return streamed.training_rows(n, min(want, max(max_training_rows(dim, budget), 1024)), seed)


def _build_streamed(
    out: Path,
    gen: int,
    emb_path: Path,
    plan: IndexPlan,
    metric: str,
    seed: int,
    budget: int | None,
    progress: bool,
    part_rows: int | None = None,
) -> Any:
    """Train (rank 0), fill the parts (every rank), merge (rank 0; ``None`` elsewhere)."""
    rows = streamed.RowReader(emb_path)
    work, trained = out / f"build-{gen}", out / f"index-{gen}.trained"

    def train() -> None:
        streamed.fresh_dir(work)
        t0 = time.perf_counter()
        sample = np.ascontiguousarray(rows[_training_rows_for(rows, plan, seed, budget)], dtype=np.float32)
        with omp_threads(len(rows)):
            streamed.train_to(trained, _new_index(plan, rows.shape[1], metric), sample)
        log.info("trained %s on %d vectors in %.1fs", plan.kind, len(sample), time.perf_counter() - t0)

    sharding.agree(train)
    with omp_threads(len(rows)):
        parts = streamed.build_parts(trained, rows, 0, work, budget, progress, part_rows)
    sharding.wait_all()
    if sharding.world()[0] != 0:
        return None
    index = streamed.merge_parts(trained, parts, out / f"index-{gen}.ivfdata")
    shutil.rmtree(work, ignore_errors=True)
    return index


def _add_with_progress(index: Any, chunks: Iterable[np.ndarray], total: int, progress: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="vec", desc="index", disable=not progress) as bar:
        for chunk in chunks:
            index.add(chunk)
            bar.update(len(chunk))


def _write_embeddings(
    path: Path, chunks: Iterable[np.ndarray], n: int, dim: int, dtype: str = "float16"
) -> None:
    """Stream chunks into one ``.npy`` (temp file, then rename): never all in RAM nor mapped."""
    streamed.write_npy(path, chunks, n, dim, dtype)


def _next_generation(out: Path) -> int:
    mf = out / MANIFEST
    return int(read_json(mf).get("generation", 0)) + 1 if mf.is_file() else 1


def _save(out: Path, index: Any, meta: Iterable[dict[str, list[Any]]], manifest: dict[str, Any]) -> None:
    """Write index + metadata (row chunks) of the new generation, then the manifest, then drop
    old files (an on-disk index's ``.ivfdata`` was written by the merge and is live already)."""
    faiss = load_faiss()
    from clipforge.atomic import atomic_path

    with atomic_path(out / manifest["index_file"]) as tmp:
        faiss.write_index(index, str(tmp))
    chunks = iter(meta)
    first = next(chunks)
    write_mapped_table_chunks(
        out / manifest["metadata_file"], list(first), manifest["count"], itertools.chain([first], chunks)
    )
    atomic_write_json(out / MANIFEST, manifest)
    live = {manifest[k] for k in ("index_file", "embeddings_file", "metadata_file", "ivfdata_file",
                                  "trained_file") if manifest.get(k)} | {MANIFEST}  # fmt: skip
    for p in out.iterdir():
        if (
            p.is_file()
            and re.fullmatch(r"(index|embeddings|metadata)-\d+\.\w+", p.name)
            and p.name not in live
        ):
            with contextlib.suppress(OSError):
                p.unlink()


# --------------------------------------------------------------------------- search + calibration
def set_search_params(index: Any, params: dict[str, Any]) -> None:
    faiss = load_faiss()
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])


def search_index(
    index: Any,
    kind: str,
    metric: str,
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    params: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (cosine scores, ids) for unit ``queries``; ``ivfpq`` candidates are re-scored exactly."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = k * int(params.get("rerank", 1)) if kind == "ivfpq" else k
    fetch = max(1, min(fetch, index.ntotal))
    scores, ids = index.search(queries, fetch)
    if kind == "ivfpq":
        scores = np.full(ids.shape, -np.inf, np.float32)
        for r in range(len(queries)):
            ok = ids[r] >= 0
            rows = np.sort(ids[r][ok])
            exact = np.asarray(embeddings[rows], dtype=np.float32) @ queries[r]
            order = np.argsort(-exact)
            ids[r] = -1
            ids[r][: len(rows)] = rows[order]
            scores[r][: len(rows)] = exact[order]
    elif metric == "l2":
        scores = 1.0 - scores / 2.0  # unit vectors: |a-b|^2 = 2 - 2 cos
    return scores[:, :k], ids[:, :k]


def exact_neighbours(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-``k`` ids by inner product, streaming over ``embeddings`` in chunks."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    start = 0
    for chunk in _chunks([embeddings], 2048):  # memory: a few (queries x 2048) arrays at any size
        s = q @ chunk.T
        kk = min(k, s.shape[1])
        cand = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # the chunk's own top-k first
        all_s = np.concatenate([best_s, np.take_along_axis(s, cand, 1)], axis=1)
        all_i = np.concatenate([best_i, cand + start], axis=1)
        top = np.argpartition(-all_s, min(k, all_s.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, 1)
        best_i = np.take_along_axis(all_i, top, 1)
        start += len(chunk)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) for f, t in zip(found, truth))
    return hits / max(1, (truth >= 0).sum() if k else 1)


def calibrate(
    index: Any,
    kind: str,
    embeddings: np.ndarray,
    metric: str,
    *,
    target_recall: float = 0.95,
    seed: int = 0,
    margin: float | None = None,
) -> tuple[dict[str, Any], float]:
    """Smallest search knob reaching ``target_recall + margin`` on self-excluded sample queries.

    An indexed vector is an easier query than a new one, most of all for a graph: the greedy walk
    can land on the vector's own node, whose links *are* its neighbours. On the benchmark's data
    (100k vectors) self-queries overstate held-out recall by ~0.02 for ``hnsw`` at small
    ``efSearch`` and by < 0.005 for IVF at the settings chosen, hence the per-kind default margin.
    """
    if margin is None:
        margin = CALIBRATION_MARGIN.get(kind, 0.02)
    n = embeddings.shape[0]
    if kind == "flat":
        return {}, 1.0
    k = min(CALIBRATION_K, n - 1)
    rng = np.random.default_rng(seed + 1)
    qids = np.sort(rng.choice(n, size=min(CALIBRATION_QUERIES, n), replace=False))
    queries = np.asarray(embeddings[qids], dtype=np.float32)
    truth = _drop_self(exact_neighbours(embeddings, queries, k + 1), qids, k)
    knob, values = _knob_values(index, kind)
    # ivfpq: the compressed codes only rank candidates, which are then re-scored exactly; when more
    # probes stop helping, the true neighbours are being lost in the ranking, so fetch more of them
    bases = [{"rerank": r} for r in RERANKS] if kind == "ivfpq" else [{}]
    sample, goal = (queries, qids, truth), target_recall + margin
    best: tuple[dict[str, Any], float] = ({}, 0.0)
    for base in bases:
        found = _sweep(index, kind, metric, embeddings, sample, base, knob, values, goal)
        if found[1] > best[1]:
            best = found
        if best[1] >= goal:
            break
    set_search_params(index, best[0])
    if best[1] < target_recall:
        log.warning(
            "calibrated recall@%d is %.3f, below the %.2f target (%s)", k, best[1], target_recall, kind
        )
    return best[0], round(float(best[1]), 4)


def _knob_values(index: Any, kind: str) -> tuple[str, list[int]]:
    """The search knob of ``kind`` and the values tried, smallest (fastest) first."""
    if kind == "hnsw":
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    nlist = load_faiss().extract_index_ivf(index).nlist
    steps = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
    return "nprobe", sorted({v for v in steps if v < nlist} | {nlist})


def _sweep(
    index: Any,
    kind: str,
    metric: str,
    embeddings: Any,
    sample: tuple[np.ndarray, np.ndarray, np.ndarray],
    base: dict[str, Any],
    knob: str,
    values: list[int],
    goal: float,
) -> tuple[dict[str, Any], float]:
    """Raise ``knob`` (over ``base``) until the recall of the sample ``(queries, qids, truth)``
    reaches ``goal`` or, for ivfpq, stops growing; returns the best (params, recall) seen."""
    queries, qids, truth = sample
    k = truth.shape[1]
    best: tuple[dict[str, Any], float] = ({}, 0.0)
    prev = -1.0
    for v in values:
        params = {**base, knob: v}
        set_search_params(index, params)
        ids = _search_released(index, kind, metric, embeddings, queries, k + 1, params)
        r = recall_at_k(_drop_self(ids, qids, k), truth)
        if r > best[1]:
            best = (params, r)
        if r >= goal:
            break
        if kind == "ivfpq" and prev >= 0 and r - prev < 0.002 and v >= 32:
            break  # plateau: more probes will not reach the target at this rerank depth
        prev = r
    return best


def _search_released(
    index: Any, kind: str, metric: str, embeddings: Any, queries: np.ndarray, k: int, params: dict[str, Any]
) -> np.ndarray:
    """The ids of :func:`search_index`, in batches after each of which the on-disk lists' pages
    are released: calibrating a build then keeps resident only what one batch touched."""
    step = streamed.query_batch(index, int(params.get("nprobe", 1)), len(queries))
    found = []
    for b in range(0, len(queries), step):
        found.append(search_index(index, kind, metric, embeddings, queries[b : b + step], k, params)[1])
        streamed.release_pages(index)
    return np.concatenate(found)


def _drop_self(ids: np.ndarray, qids: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(ids), k), -1, np.int64)
    for r, (row, q) in enumerate(zip(ids, qids)):
        row = row[row != q][:k]
        out[r, : len(row)] = row
    return out


# --------------------------------------------------------------------------- loading + adding
def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise SearchIndexError(
            f"{index_dir}: no {MANIFEST}; build one with `clipforge index EMB --out {index_dir}`"
        )
    manifest = read_json(path)
    if manifest.get("format") != "clipforge-index":
        raise SearchIndexError(f"{path}: not a clipforge index manifest")
    if int(manifest.get("version", 0)) > INDEX_FORMAT_VERSION:
        raise SearchIndexError(
            f"{path}: index format version {manifest['version']} is newer than this "
            f"clipforge supports ({INDEX_FORMAT_VERSION}); upgrade clipforge"
        )
    return manifest


def load_index(index_dir: str | os.PathLike, *, mmap: bool = True) -> tuple[Any, dict[str, Any]]:
    """The faiss index (memory-mapped where faiss supports it) with search params applied."""
    faiss = load_faiss()
    manifest = read_manifest(index_dir)
    path = str(Path(index_dir) / manifest["index_file"])
    if not os.path.isfile(path):
        raise SearchIndexError(f"{path}: index file missing (manifest names it)")
    index = None
    if manifest.get("ivfdata_file"):  # built shard by shard: the lists are always on disk
        try:
            index = streamed.read_ondisk(Path(path), Path(index_dir) / manifest["ivfdata_file"])
        except (RuntimeError, DataError) as e:
            raise SearchIndexError(f"{path}: cannot read on-disk index ({_first_line(e)})") from e
    elif mmap:
        try:
            index = faiss.read_index(path, _mmap_flags(faiss, manifest["kind"]))
        except RuntimeError as e:
            log.warning("memory-mapped read of %s failed (%s); reading it into memory", path, _first_line(e))
    if index is None:
        try:
            index = faiss.read_index(path)
        except RuntimeError as e:
            raise SearchIndexError(f"{path}: cannot read faiss index ({str(e).splitlines()[0]})") from e
    if index.ntotal != manifest["count"]:
        raise SearchIndexError(
            f"{path}: holds {index.ntotal} vectors but {MANIFEST} says {manifest['count']}"
        )
    set_search_params(index, manifest.get("search_params", {}))
    return index, manifest


def _mmap_flags(faiss: Any, kind: str) -> int:
    """faiss has two memory-mapping mechanisms and they do not mix: inverted lists are mapped by
    ``IO_FLAG_MMAP`` alone (adding ``IO_FLAG_MMAP_IFC`` makes the IVF read fail), while flat codes
    (``flat``, the storage of ``hnsw``) are only mapped when ``IO_FLAG_MMAP_IFC`` is set too."""
    if kind in ("ivf", "ivfpq"):
        return faiss.IO_FLAG_MMAP
    return faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_READ_ONLY", 0)


def is_memory_mapped(index: Any, kind: str) -> bool:
    """Whether the bulk of ``index`` (vectors / inverted lists) is backed by the file, not the heap."""
    faiss = load_faiss()
    if kind in ("ivf", "ivfpq"):
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        return type(invlists).__name__ == "OnDiskInvertedLists"
    storage = index if kind == "flat" else faiss.downcast_index(index.storage)
    codes = getattr(storage, "codes", None)
    return codes is not None and hasattr(codes, "is_owned") and not codes.is_owned


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def add_to_index(
    index_dir: str | os.PathLike, new_emb_dir: str | os.PathLike, *, progress: bool = True
) -> dict[str, Any]:
    """Append the embeddings of ``new_emb_dir`` (same model) to an existing index; ids continue."""
    out = Path(index_dir)
    index, manifest = load_index(out, mmap=False)
    new = load_manifest(new_emb_dir)
    _check_same_model(manifest, new, new_emb_dir)
    if manifest.get("ivfdata_file"):
        return _add_streamed(out, index, manifest, Path(new_emb_dir), int(new["count"]), progress)
    return _add_in_memory(out, index, manifest, Path(new_emb_dir), int(new["count"]), progress)


def _check_same_model(manifest: dict[str, Any], new: dict[str, Any], new_emb_dir: Any) -> None:
    """Embeddings of another model (name, config or width) cannot join the index."""
    if int(new["dim"]) != manifest["dim"] and new["count"]:
        raise SearchIndexError(
            f"{new_emb_dir}: embeddings have dim {new['dim']}, the index has {manifest['dim']}"
        )
    old_model = manifest.get("model") or {}
    same_name = not (new.get("model") and old_model.get("name")) or new["model"] == old_model["name"]
    same_config = (
        not (new.get("model_config") and old_model.get("config"))
        or new["model_config"] == old_model["config"]
    )
    if not (same_name and same_config):
        raise SearchIndexError(
            f"{new_emb_dir}: embedded with model {new['model']!r}, the index uses "
            f"{old_model['name']!r}; embeddings of different models cannot be mixed"
        )


def _add_in_memory(
    out: Path, index: Any, manifest: dict[str, Any], new_dir: Path, n_new: int, progress: bool
) -> dict[str, Any]:
    """``index --add`` for a flat / hnsw / in-memory IVF index: add, then save a new generation."""
    n_old, dim, gen = manifest["count"], manifest["dim"], int(manifest["generation"]) + 1
    old_emb = np.load(out / manifest["embeddings_file"], mmap_mode="r")
    emb_path = out / f"embeddings-{gen}.npy"
    _write_embeddings(
        emb_path,
        [*_chunks([old_emb]), *iter_embedding_chunks(new_dir)] if n_new else _chunks([old_emb]),
        n_old + n_new,
        dim,
        manifest.get("dtype", "float16"),
    )
    if n_new:
        _add_with_progress(index, _chunks(iter_embedding_chunks(new_dir)), n_new, progress)
    # The saved knob was tuned for the old collection; lists grow and new regions appear, so the
    # setting (and the recall it promises) is re-derived on the grown index.
    target = float(manifest.get("target_recall", 0.95))
    with omp_threads(n_old + n_new):
        params, recall = calibrate(
            index,
            manifest["kind"],
            np.load(emb_path, mmap_mode="r"),
            manifest["metric"],
            target_recall=target,
        )
    old_meta = open_metadata(out / manifest["metadata_file"])
    meta = _grown_metadata(old_meta, n_old, new_dir)
    manifest = _grown_manifest(manifest, gen, int(index.ntotal), n_new, params, recall, emb_path)
    if manifest["kind"] == "flat" and manifest["count"] >= FLAT_MAX:
        log.warning(
            "flat index now holds %d vectors; rebuild with `clipforge index` for a faster kind",
            manifest["count"],
        )
    _save(out, index, meta, manifest)
    return manifest


def _grown_manifest(
    manifest: dict[str, Any], gen: int, count: int, n_new: int, params: Any, recall: float, emb_path: Path
) -> dict[str, Any]:
    """The manifest of generation ``gen`` after ``index --add`` (both index layouts)."""
    return {
        **manifest,
        "generation": gen,
        "count": count,
        "memory_bytes": estimate_memory(manifest["kind"], count, manifest["dim"], **manifest["build_params"]),
        "added_after_build": int(manifest.get("added_after_build", 0)) + n_new,
        "search_params": params,
        "expected_recall_at_10": recall,
        "index_file": f"index-{gen}.faiss",
        "embeddings_file": emb_path.name,
        "metadata_file": f"metadata-{gen}{MAPPED_SUFFIX}",
    }


def _add_streamed(
    out: Path, index: Any, manifest: dict[str, Any], new_dir: Path, n_new: int, progress: bool
) -> dict[str, Any]:
    """``index --add`` for an index built shard by shard: the new vectors go into parts of the
    saved trained index, merged after the old lists into the next generation's ``.ivfdata``."""
    n_old, dim, gen = manifest["count"], manifest["dim"], int(manifest["generation"]) + 1
    old_rows = streamed.RowReader(out / manifest["embeddings_file"])
    emb_path = out / f"embeddings-{gen}.npy"
    chunks = (
        [*streamed.float_chunks(old_rows), *iter_embedding_chunks(new_dir)]
        if n_new
        else streamed.float_chunks(old_rows)
    )
    _write_embeddings(emb_path, chunks, n_old + n_new, dim, manifest.get("dtype", "float16"))
    rows = streamed.RowReader(emb_path)
    trained = out / f"index-{gen}.trained"
    shutil.copyfile(out / manifest["trained_file"], trained)
    work = streamed.fresh_dir(out / f"build-{gen}")
    with omp_threads(n_old + n_new):
        build = manifest.get("build", {})
        parts = streamed.build_parts(
            trained, rows, n_old, work, build.get("max_memory"), progress, build.get("part_rows")
        )
        merged = streamed.merge_parts(trained, parts, out / f"index-{gen}.ivfdata", before=index)
        shutil.rmtree(work, ignore_errors=True)
        params, recall = calibrate(merged, manifest["kind"], rows, manifest["metric"],
                                   target_recall=float(manifest.get("target_recall", 0.95)))  # fmt: skip
    old_meta = open_metadata(out / manifest["metadata_file"])
    manifest = {
        **_grown_manifest(manifest, gen, int(merged.ntotal), n_new, params, recall, emb_path),
        "ivfdata_file": f"index-{gen}.ivfdata",
        "trained_file": trained.name,
    }
    _save(out, merged, _grown_metadata(old_meta, n_old, new_dir), manifest)
    return manifest


def _grown_metadata(
    old: Any, n_old: int, new_dir: Path, rows: int = 65_536
) -> Iterable[dict[str, list[Any]]]:
    """The old (memory-mapped) metadata then the new embeddings' rows, ids continuing, in chunks."""
    names = list(old)
    for b in range(0, n_old, rows):
        yield {k: old[k][b : min(b + rows, n_old)] for k in names}
    for chunk in iter_table_chunks(find_table(new_dir, "metadata")):
        size = len(chunk["id"])
        yield {k: [i + n_old for i in chunk["id"]] if k == "id" else chunk.get(k, [""] * size) for k in names}


def describe(manifest: dict[str, Any]) -> str:
    """One line for the console: kind, size, memory, expected recall, search params."""
    p = ", ".join(f"{k}={v}" for k, v in manifest.get("search_params", {}).items())
    return (
        f"{manifest['kind']} index of {manifest['count']:,} x {manifest['dim']} vectors, "
        f"~{_fmt_bytes(manifest['memory_bytes'])} in memory, expected recall@10 "
        f"{manifest['expected_recall_at_10']:.3f}{f' ({p})' if p else ''}: {manifest['reason']}"
        + (f" (+{manifest['added_after_build']:,} added since)" if manifest.get("added_after_build") else "")
    )


__all__ = [
    "IndexPlan",
    "add_to_index",
    "build_index",
    "describe",
    "load_index",
    "plan_index",
    "parse_memory",
    "read_manifest",
    "search_index",
]
