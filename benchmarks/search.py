"""Approximate vs exact search on a million clustered 512-d unit vectors.

    python benchmarks/search.py                 # n = 1,000,000 (needs ~5 GB RAM, ~3 GB disk)
    python benchmarks/search.py --n 200000 --kinds auto,hnsw,ivfpq

The vectors imitate CLIP image embeddings (``make_embeddings``):

* a shared mean direction: every vector has cosine ~0.5 with it (CLIP embeddings live in a narrow
  cone; unrelated images still have cosine ~0.3-0.5);
* a low effective rank: all variation is drawn through a spectrum decaying as ``i**-0.8`` and
  then randomly rotated, so no axis is special (matters for product quantisation);
* two-level clustering: ``n/5000`` topics, each holding clusters (``n/500`` in all) whose sizes
  follow a log-normal law (sigma 1.2: a few clusters hold thousands of vectors, many hold a
  handful) and whose spreads vary (log-normal, sigma 0.35) - tight near-duplicate groups next
  to diffuse ones;
* queries are fresh draws from the same process (same clusters, new noise), never indexed.

Exact inner-product search (faiss ``IndexFlatIP``) gives the ground truth and the baseline latency.
Each other index is built by ``clipforge.search.index.build_index`` exactly as ``clipforge
index`` would (the calibrated search setting included), loaded memory-mapped, and queried one
query at a time through ``search_index``. Printed per kind: build time (training + adding +
calibration), memory - ``anon MB``: heap growth after loading and querying (the index is
memory-mapped, so this is what each server process really owns), ``file MB``: the index file whose
pages the kernel caches on demand, ``est MB``: the planner's estimate - recall@10 against exact on
held-out queries next to the ``expected`` recall the calibration promised, p50/p99 single-query
latency and the speed-up over exact search.
Targets (issue 5): auto index recall@10 >= 0.95 and p50 >= 20x faster than exact.

From ``--n 2000000`` up (or with ``--scale``) the run is the scale-out measurement of issue 14:
the vectors are never loaded at once (exact neighbours of the held-out queries are computed by
streaming over the shards), ``clipforge index --kind ivfpq --max-memory M`` runs in a child
process whose peak RSS is read from the kernel (``wait4``), and the figures printed are build
wall time, peak RSS, index size on disk (excluding / including the float16 copy of the vectors
used for re-scoring), recall@10 vs exact on held-out queries, p50/p99 single-query latency,
and the per-vector costs from which ``--project 100000000,1000000000`` extrapolates.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _spectrum(d: int, decay: float) -> np.ndarray:
    s = (1.0 + np.arange(d)) ** -decay
    return s / np.linalg.norm(s)


class EmbeddingModel:
    """The generative process; ``sample(n)`` draws database or query vectors from it."""

    def __init__(self, n: int, d: int = 512, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.d = d
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        self.rot = q.astype(np.float32)  # random rotation: the spectrum is not axis-aligned
        self.scale = _spectrum(d, 0.8).astype(np.float32) * np.sqrt(d)
        self.mean = self._unit(rng.standard_normal(d).astype(np.float32))
        n_topics = max(4, n // 5000)
        n_clusters = max(16, n // 500)
        topics = self._directions(rng, n_topics)
        topic_of = rng.integers(0, n_topics, n_clusters)
        offsets = self._directions(rng, n_clusters)
        # centre = shared mean + topic + cluster offset (cosine with the mean ~0.5)
        self.centres = self._unit(0.55 * self.mean + 0.55 * topics[topic_of] + 0.45 * offsets)
        w = rng.lognormal(0.0, 1.2, n_clusters)
        self.weights = w / w.sum()
        self.spread = (0.45 * rng.lognormal(0.0, 0.35, n_clusters)).astype(np.float32)

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def _directions(self, rng: np.random.Generator, n: int) -> np.ndarray:
        z = rng.standard_normal((n, self.d)).astype(np.float32) * self.scale
        return self._unit(z @ self.rot)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        c = rng.choice(len(self.centres), size=n, p=self.weights)
        noise = self._directions(rng, n) * self.spread[c, None]
        return self._unit(self.centres[c] + noise)


def write_embedding_dir(out: Path, gen: EmbeddingModel, n: int, seed: int, shard: int = 100_000) -> None:
    """Write vectors in the ``clipforge embed`` layout (float16 shards, metadata, manifest)."""
    from clipforge.search.tables import atomic_save_npy, atomic_write_json, write_table

    rng = np.random.default_rng(seed)
    shards = []
    for s, start in enumerate(range(0, n, shard)):
        rows = min(shard, n - start)
        atomic_save_npy(out / f"img_emb_{s:05d}.npy", gen.sample(rows, rng).astype(np.float16))
        shards.append({"image": f"img_emb_{s:05d}.npy", "rows": rows, "text": None})
    ids = list(range(n))
    write_table(
        out / "metadata.csv",
        {
            "id": ids,
            "path": [f"v{i}" for i in ids],
            "caption": [""] * n,
            "width": [0] * n,
            "height": [0] * n,
            "tar_offset": [-1] * n,
            "tar_size": [-1] * n,
        },
    )
    atomic_write_json(
        out / "embed_manifest.json",
        {
            "format": "clipforge-embeddings",
            "version": 1,
            "model": None,
            "pretrained": None,
            "dim": gen.d,
            "count": n,
            "skipped": 0,
            "dtype": "float16",
            "normalized": True,
            "has_text": False,
            "metadata": "metadata.csv",
            "shards": shards,
        },
    )


def rss() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes; memory-mapped index/embedding pages are the latter."""
    import ctypes

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so deltas mean something
    except OSError:
        pass
    m = psutil.Process().memory_info()
    return m.rss - m.shared, m.shared


def searcher_load(index_dir: Path, query: np.ndarray) -> dict[str, float]:
    """What a server pays to open the index: time and resident memory (nothing is parsed up front)."""
    from clipforge.search.searcher import Searcher

    r0 = rss()
    t0 = time.perf_counter()
    s = Searcher(index_dir, model=object(), tokenizer=object(), preprocess=object())
    t1 = time.perf_counter()
    hits = s.search_vectors(query[None], [10], [False])[0]
    t2 = time.perf_counter()
    assert len(hits) == 10 and hits[0].path
    r1 = rss()
    del s
    return {
        "open_s": t1 - t0,
        "first_query_ms": (t2 - t1) * 1000,
        "anon_mb": (r1[0] - r0[0]) / 1e6,
        "file_mb": (r1[1] - r0[1]) / 1e6,
    }


def latencies(fn, queries: np.ndarray) -> np.ndarray:
    out = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        fn(queries[i : i + 1])
        out[i] = time.perf_counter() - t0
    return out * 1000


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def stats(gen: EmbeddingModel, emb: np.ndarray) -> dict[str, float]:
    """How embedding-like the data is: cosines to the mean, to a random vector, to the 1st neighbour."""
    rng = np.random.default_rng(1)
    x = np.asarray(emb[rng.choice(len(emb), 2000, replace=False)], np.float32)
    pairs = (x[:1000] * x[1000:]).sum(1)
    return {"cos_to_mean": float((x @ gen.mean).mean()), "cos_random_pair": float(pairs.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    ap.add_argument("--latency-queries", type=int, default=300)
    ap.add_argument("--exact-latency-queries", type=int, default=60)
    ap.add_argument(
        "--kinds", default="auto,ivfpq", help="comma list of kinds to try (auto, flat, hnsw, ivf, ivfpq)"
    )
    ap.add_argument(
        "--pq-memory", default=None, help="--max-memory used for ivfpq (default: a quarter of ivf's)"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--scale", action="store_true", help="the streamed scale-out run (default from 2M)")
    ap.add_argument("--max-memory", default="3GB", help="scale run: clipforge index --max-memory")
    ap.add_argument("--project", default="100000000,1000000000", help="scale run: sizes to project to")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.WARNING, format="  %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("clipforge.search").setLevel(logging.INFO)
    # On a shared machine, spinning OpenMP threads waste the other core; passive waiting is
    # fairer and does not change single-query latency (faiss answers one query on one thread).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import faiss

    from clipforge.search.index import (
        build_index,
        estimate_memory,
        is_memory_mapped,
        load_index,
        search_index,
    )

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipforge-bench-"))
    emb_dir = work / "emb"
    emb_dir.mkdir(parents=True, exist_ok=True)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; workdir {work}")
    t0 = time.perf_counter()
    gen = EmbeddingModel(args.n, args.dim, seed=0)
    done = emb_dir / "embed_manifest.json"
    if done.is_file() and json.loads(done.read_text())["count"] == args.n:
        print(f"reusing the vectors in {emb_dir} (same generator and seeds)")  # a kept --workdir
    else:
        write_embedding_dir(emb_dir, gen, args.n, seed=1)
    queries = gen.sample(args.queries, np.random.default_rng(2))
    print(
        f"generated {args.n:,} x {args.dim} vectors ({len(gen.centres)} clusters) in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    if args.scale or args.n >= 2_000_000:
        scale_run(args, work, emb_dir, queries)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return

    # ---- exact baseline (on the float16-rounded vectors the indexes see)
    r0 = rss()[0]
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    for f in sorted(emb_dir.glob("img_emb_*.npy")):
        flat.add(np.load(f).astype(np.float32))
    build = time.perf_counter() - t0
    mem = rss()[0] - r0
    truth = flat.search(queries, 11)[1]
    nn_cos = flat.search(queries[:200], 1)[0].mean()
    s = stats(gen, np.load(sorted(emb_dir.glob("img_emb_*.npy"))[0], mmap_mode="r"))
    print(
        f"data: cos(x, mean) {s['cos_to_mean']:.3f}, cos(random pair) {s['cos_random_pair']:.3f}, "
        f"cos(query, nearest) {nn_cos:.3f}"
    )
    print(f"exact index built in {build:.1f}s", flush=True)
    lat_exact = latencies(lambda q, f=flat: f.search(q, 10), queries[: args.exact_latency_queries])
    rows = [
        {
            "kind": "flat (exact)",
            "build_s": build,
            "memory_mb": mem / 1e6,
            "file_mb": 0.0,
            "est_mb": args.n * args.dim * 4 / 1e6,
            "recall@10": 1.0,
            "p50_ms": float(np.median(lat_exact)),
            "p99_ms": float(np.percentile(lat_exact, 99)),
            "params": "",
        }
    ]
    truth = truth[:, :10]
    del flat
    gc.collect()

    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        out = work / f"index-{kind}"
        max_mem = None
        if kind == "ivfpq":
            max_mem = args.pq_memory or estimate_memory("ivf", args.n, args.dim) // 4
        t0 = time.perf_counter()
        m = build_index(emb_dir, out, kind=kind, max_memory=max_mem, progress=False)
        build = time.perf_counter() - t0
        print(f"built {kind} -> {m['kind']} in {build:.1f}s (incl. calibration)", flush=True)
        gc.collect()
        r0 = rss()
        index, manifest = load_index(out)
        emb = np.load(out / manifest["embeddings_file"], mmap_mode="r")
        params = manifest["search_params"]

        def one(q, index=index, manifest=manifest, emb=emb, params=params):
            return search_index(index, manifest["kind"], manifest["metric"], emb, q, 10, params)

        found = np.vstack([one(queries[i : i + 1])[1] for i in range(len(queries))])
        lat = latencies(one, queries[: args.latency_queries])
        r1 = rss()
        rows.append(
            {
                "kind": f"{kind} -> {m['kind']}",
                "build_s": build,
                "memory_mb": (r1[0] - r0[0]) / 1e6,
                "file_mb": (out / manifest["index_file"]).stat().st_size / 1e6,
                "est_mb": m["memory_bytes"] / 1e6,
                "recall@10": recall(found, truth),
                "calibrated_recall": m["expected_recall_at_10"],
                "p50_ms": float(np.median(lat)),
                "p99_ms": float(np.percentile(lat, 99)),
                "params": ", ".join(f"{k}={v}" for k, v in {**m["build_params"], **params}.items()),
                "mmapped": is_memory_mapped(index, manifest["kind"]),
            }
        )
        del index, emb
        gc.collect()
        rows[-1]["searcher"] = searcher_load(out, queries[0])
        print(
            "  Searcher (index + embeddings + metadata) opened in {open_s:.2f}s, first query "
            "{first_query_ms:.1f} ms, anon {anon_mb:+.0f} MB, file-backed {file_mb:+.0f} MB".format(
                **rows[-1]["searcher"]
            ),
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)

    base = rows[0]["p50_ms"]
    print(
        f"\n{'index':<18}{'build s':>9}{'anon MB':>9}{'file MB':>9}{'est MB':>9}{'recall@10':>11}{'expected':>9}{'p50 ms':>9}{'p99 ms':>9}{'speed-up':>10}  params"
    )
    for r in rows:
        print(
            f"{r['kind']:<18}{r['build_s']:>9.1f}{r['memory_mb']:>9.0f}{r['file_mb']:>9.0f}{r['est_mb']:>9.0f}{r['recall@10']:>11.4f}{r.get('calibrated_recall', 1.0):>9.4f}"
            f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{base / r['p50_ms']:>9.1f}x  {r['params']}"
            + ("" if r.get("mmapped", True) else "  (NOT memory-mapped)")
        )
    auto = next((r for r in rows if r["kind"].startswith("auto")), None)
    if auto:
        ok = auto["recall@10"] >= 0.95 and base / auto["p50_ms"] >= 20
        print(
            f"\nauto index: recall@10 {auto['recall@10']:.4f} (target >= 0.95), p50 speed-up "
            f"{base / auto['p50_ms']:.1f}x (target >= 20x): {'PASS' if ok else 'FAIL'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def streamed_truth(emb_dir: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k over all shards, one shard in memory at a time (the same code calibration uses)."""
    from clipforge.search.index import exact_neighbours

    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    start = 0
    for f in sorted(emb_dir.glob("img_emb_*.npy")):
        x = np.load(f, mmap_mode="r")
        ids = exact_neighbours(x, queries, k) + start
        s = np.einsum("qd,qkd->qk", queries, np.asarray(x[ids - start], np.float32))
        all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1)
        top = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
        start += x.shape[0]
        del x
    return best_i


def build_in_child(emb_dir: Path, out: Path, max_memory: str) -> tuple[float, int, str]:
    """``clipforge index`` in a child process: (wall seconds, peak RSS bytes from wait4, output)."""
    import subprocess
    import sys

    log = out.with_suffix(".log")
    cmd = [sys.executable, "-m", "clipforge", "index", str(emb_dir), "--out", str(out), "--kind", "ivfpq",
           "--max-memory", max_memory]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"index build failed:\n{log.read_text()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, log.read_text()


def scale_run(args: argparse.Namespace, work: Path, emb_dir: Path, queries: np.ndarray) -> None:
    from clipforge.search.index import load_index, read_manifest, search_index

    t0 = time.perf_counter()
    truth = streamed_truth(emb_dir, queries)
    print(
        f"exact neighbours of {len(queries)} held-out queries by streaming: {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    out = work / "index-scale"
    wall, peak, log = build_in_child(emb_dir, out, args.max_memory)
    m = read_manifest(out)
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    emb_bytes = files.get(m["embeddings_file"], 0)
    index_bytes = sum(files.values()) - emb_bytes
    index, manifest = load_index(out)
    emb = np.load(out / manifest["embeddings_file"], mmap_mode="r")
    params = manifest["search_params"]

    def one(q):
        return search_index(index, manifest["kind"], manifest["metric"], emb, q, 10, params)

    found = np.vstack([one(queries[i : i + 1])[1] for i in range(len(queries))])
    lat = latencies(one, queries[: args.latency_queries])
    r = {"n": args.n, "dim": args.dim, "build_wall_s": wall, "build_peak_rss": peak, "index_bytes": index_bytes,
         "embeddings_bytes": emb_bytes, "recall@10": recall(found, truth), "p50_ms": float(np.median(lat)),
         "p99_ms": float(np.percentile(lat, 99)), "params": {**m["build_params"], **params},
         "calibrated_recall": m["expected_recall_at_10"], "max_memory": args.max_memory,
         **phase_seconds(log)}  # fmt: skip
    print(log.strip().splitlines()[-2] if log.strip() else "")
    print(
        f"\nn={args.n:,} x {args.dim}: build {wall:.0f}s wall, peak RSS {peak / 2**30:.2f} GiB "
        f"(bound 4 GB: {'PASS' if peak < 4e9 else 'FAIL'}), index {index_bytes / 1e9:.2f} GB on disk "
        f"+ {emb_bytes / 1e9:.2f} GB float16 vectors for re-scoring; recall@10 {r['recall@10']:.4f} "
        f"(>= 0.90: {'PASS' if r['recall@10'] >= 0.9 else 'FAIL'}; calibration promised {r['calibrated_recall']:.4f}); "
        f"p50 {r['p50_ms']:.2f} ms (<= 10: {'PASS' if r['p50_ms'] <= 10 else 'FAIL'}), p99 {r['p99_ms']:.2f} ms; {r['params']}"
    )
    project(r, [int(x) for x in args.project.split(",") if x])
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))


def phase_seconds(log: str) -> dict[str, float]:
    """Training and calibration seconds from the build's log (``clipforge index`` logs both)."""
    import re

    out = {}
    for key, pattern in (
        ("train_s", r"trained \S+ on \d+ vectors in ([\d.]+)s"),
        ("calibrate_s", r"calibrated .* in ([\d.]+)s"),
    ):
        found = re.search(pattern, log)
        if found:
            out[key] = float(found.group(1))
    return out


def project(r: dict, sizes: list[int]) -> None:
    """Per-vector costs from this run scaled up. Under ``--max-memory`` training is a fixed cost
    (the budget caps its sample and hence nlist, whatever n), so build(N) = training + N x (the
    rest / n); calibration is counted in the rest (it grows with the list lengths, n / nlist)."""
    n = r["n"]
    train = r.get("train_s", 0.0)
    per_s, per_idx, per_emb = (r["build_wall_s"] - train) / n, r["index_bytes"] / n, r["embeddings_bytes"] / n
    print(f"per vector: build {per_s * 1e6:.1f} us after {train:.0f}s of training (this machine, all "
          f"cores), index {per_idx:.1f} B, re-scoring copy {per_emb:.0f} B")  # fmt: skip
    for size in sizes:
        print(f"  {size:>13,} vectors: build {(train + per_s * size) / 3600:.1f} h on one such machine, "
              f"index {per_idx * size / 1e9:.1f} GB + vectors {per_emb * size / 1e9:.0f} GB on disk")  # fmt: skip


if __name__ == "__main__":
    main()
