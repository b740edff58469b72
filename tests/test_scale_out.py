"""Beyond one process: ``embed`` and ``index`` under torchrun (gloo on CPU), resumption after a
killed rank, and an IVF build that never holds the vectors (under an address-space limit).

Every run is a subprocess with ``OMP_NUM_THREADS=1`` (what torchrun gives each rank), so the
single-process reference does the same arithmetic and outputs must be identical, not close.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from search_fixtures import COLOURS, SHAPES, draw, save_tiny_model

pytest.importorskip("faiss")

# a fixed mmap threshold: glibc's sliding one keeps freed chunks as heap, which would make the
# address-space test measure malloc's bookkeeping rather than the build
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _image(j: int):
    colours = list(COLOURS)
    return draw(
        SHAPES[j % len(SHAPES)],
        COLOURS[colours[(j // 5) % len(colours)]],
        (250, 250, 245),
        size=32,
        inset=j // 60,
    )


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _embed_cmd(model: Path, images: str, out: Path, *extra: str) -> list[str]:
    return ["-m", "clipforge", "embed", "--pretrained", str(model), "--images", images, "--out", str(out),
            "--batch-size", "4", "--workers", "0", "--device", "cpu", *extra]  # fmt: skip


def _assert_same_embeddings(a: Path, b: Path) -> None:
    """Same manifest (but for who wrote each shard), same vectors bit for bit, same metadata."""
    from clipforge.search.tables import find_table, read_table

    ma, mb = (json.loads((d / "embed_manifest.json").read_text()) for d in (a, b))
    strip = [{k: v for k, v in s.items() if k != "rank"} for s in ma["shards"]]
    assert strip == [{k: v for k, v in s.items() if k != "rank"} for s in mb["shards"]]
    assert {k: v for k, v in ma.items() if k != "shards"} == {k: v for k, v in mb.items() if k != "shards"}
    for shard in ma["shards"]:
        for name in (shard["image"], shard["text"]):
            if name:
                x, y = np.load(a / name), np.load(b / name)
                assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert read_table(find_table(a, "metadata")) == read_table(find_table(b, "metadata"))
    assert (a / "skipped.csv").read_bytes() == (b / "skipped.csv").read_bytes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_torchrun_embed_over_shards_equals_one_process(model_dir, tmp_path):
    """4 webdataset shards (24 images each, captions) -> 12 output shards of <= 10; two ranks take
    two whole input shards each, and the files equal a single-process run's."""
    shards = []
    for t in range(4):
        tar = tmp_path / f"part-{t:03d}.tar"
        with tarfile.open(tar, "w") as tf:
            for i in range(24):
                j = 24 * t + i
                img, txt = tmp_path / f"{j}.png", tmp_path / f"{j}.txt"
                _image(j).save(img)
                txt.write_text(f"picture {j}")
                tf.add(img, arcname=f"{j:05d}.png")
                tf.add(txt, arcname=f"{j:05d}.txt")
        shards.append(tar)
    spec = str(tmp_path / "part-{000..003}.tar")
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, *_embed_cmd(model_dir, spec, one, "--shard-size", "10")])
    proc = _run([*TORCHRUN, "2", *_embed_cmd(model_dir, spec, two, "--shard-size", "10")])
    assert "2 ranks (gloo)" in proc.stdout
    _assert_same_embeddings(one, two)
    manifest = json.loads((two / "embed_manifest.json").read_text())
    assert manifest["count"] == 96 and len(manifest["shards"]) == 12 and manifest["has_text"]
    by_input: dict[str, set[int]] = {}
    for s in manifest["shards"]:
        assert len(s["inputs"]) == 1
        by_input.setdefault(s["inputs"][0], set()).add(s["rank"])
    assert sorted(by_input) == sorted(str(p.resolve()) for p in shards)
    assert [by_input[str(p.resolve())] for p in shards] == [{0}, {0}, {1}, {1}]  # whole inputs per rank
    single = json.loads((one / "embed_manifest.json").read_text())
    assert {s["rank"] for s in single["shards"]} == {0}


def _rank_pid(proc: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "clipforge" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def test_killed_rank_rerun_finishes_only_what_is_missing(model_dir, tmp_path):
    """One folder (contiguous ranges): rank 1 is stuck on a FIFO in its third shard, gets SIGKILLed;
    a rerun with one process embeds only the missing shards and matches an uninterrupted run."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for j in range(80):
        if j != 61:
            _image(j).save(folder / f"img{j:03d}.png")
    # item 61: second batch of shard 7 (8 per shard, batches of 4), so rank 1 has written shards
    # 5 and 6 (a shard is written when the next one's first batch arrives) and blocks reading it
    os.mkfifo(folder / "img061.png")
    out = tmp_path / "emb"
    cmd = [*TORCHRUN, "2", *_embed_cmd(model_dir, str(folder), out, "--shard-size", "8", "--no-captions")]
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=ENV)
    want = [out / f"img_emb_{s:05d}.npy" for s in range(7)]  # rank 0: 0-4, rank 1: 5, 6 (then stuck)
    try:
        deadline = time.monotonic() + 300
        while not all(p.exists() for p in want) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = _rank_pid(proc, 1)
        if pid is not None and all(p.exists() for p in want):
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            for child in __import__("psutil").Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
        try:  # unblock a reader left behind, if any (no reader: ENXIO, nothing to do)
            os.close(os.open(folder / "img061.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    log = log_path.read_text()
    assert all(p.exists() for p in want) and pid is not None, log[-3000:]
    assert proc.returncode != 0, log[-2000:]
    assert not (out / "embed_manifest.json").exists() and not (out / "img_emb_00007.npy").exists()
    records = [json.loads((out / f"shard_{s:05d}.json").read_text()) for s in range(7)]
    assert [r["rank"] for r in records] == [0, 0, 0, 0, 0, 1, 1]
    before = {p.name: p.stat().st_mtime_ns for p in want}

    (folder / "img061.png").unlink()
    _image(61).save(folder / "img061.png")
    _run([sys.executable, *_embed_cmd(model_dir, str(folder), out, "--shard-size", "8", "--no-captions")])
    assert {p.name: p.stat().st_mtime_ns for p in want} == before  # finished shards were not redone
    manifest = json.loads((out / "embed_manifest.json").read_text())
    assert [s["rank"] for s in manifest["shards"]] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert manifest["count"] == 80 and manifest["shards"][7]["items"] == [56, 64]
    ref = tmp_path / "ref"
    _run([sys.executable, *_embed_cmd(model_dir, str(folder), ref, "--shard-size", "8", "--no-captions")])
    _assert_same_embeddings(out, ref)


# ----------------------------------------------------------------------------- index
def _write_vectors(
    out: Path, n: int, dim: int, seed: int, shard: int = 5000, first_path: int = 0
) -> np.ndarray:
    """An embedding folder in ``clipforge embed``'s layout: clustered unit float16 vectors."""
    from clipforge.search.tables import atomic_save_npy, atomic_write_json, write_table

    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((64, dim)).astype(np.float32)
    basis = np.random.default_rng(98).standard_normal((16, dim)).astype(np.float32) / 4
    # noise of low rank, as in real embeddings: neighbours are well defined (isotropic noise in
    # many dimensions would put every point of a cluster at nearly the same distance)
    x = centres[rng.integers(0, 64, n)] + rng.standard_normal((n, 16)).astype(np.float32) @ basis
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    shards = []
    for s, b in enumerate(range(0, n, shard)):
        atomic_save_npy(out / f"img_emb_{s:05d}.npy", x[b : b + shard])
        shards.append({"image": f"img_emb_{s:05d}.npy", "rows": len(x[b : b + shard]), "text": None})
    ids = list(range(n))
    write_table(out / "metadata.csv", {"id": ids, "path": [f"v{first_path + i}" for i in ids],
                "caption": [f"caption {i}" for i in ids], "width": [1] * n, "height": [2] * n,
                "tar_offset": [-1] * n, "tar_size": [-1] * n})  # fmt: skip
    manifest = {"format": "clipforge-embeddings", "version": 1, "model": None, "pretrained": None, "dim": dim,
                "count": n, "skipped": 0, "dtype": "float16", "normalized": True, "has_text": False,
                "metadata": "metadata.csv", "shards": shards}  # fmt: skip
    atomic_write_json(out / "embed_manifest.json", manifest)
    return x


def test_two_rank_index_build_equals_one_process_and_grows(tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.search.index import add_to_index, search_index
    from clipforge.search.searcher import Searcher
    from clipforge.search.server import create_app

    x = _write_vectors(tmp_path / "emb", 30_000, 64, seed=0)
    index = ["-m", "clipforge", "index", str(tmp_path / "emb"), "--kind", "ivfpq", "--part-size", "8000"]
    _run([sys.executable, *index, "--out", str(tmp_path / "one")])
    _run([*TORCHRUN, "2", *index, "--out", str(tmp_path / "two")])
    one, two = (
        Searcher(tmp_path / d, model=object(), tokenizer=object(), preprocess=object())
        for d in ("one", "two")
    )
    assert two.manifest["build"]["ranks"] == 2 and one.manifest["build"]["ranks"] == 1
    assert one.manifest["search_params"] == two.manifest["search_params"]
    assert (tmp_path / "one/index-1.ivfdata").read_bytes() == (tmp_path / "two/index-1.ivfdata").read_bytes()
    queries = np.random.default_rng(5).standard_normal((50, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = [
        search_index(s.index, "ivfpq", "ip", s.embeddings, queries, 10, s.manifest["search_params"])
        for s in (one, two)
    ]
    assert np.array_equal(got[0][1], got[1][1]) and np.array_equal(got[0][0], got[1][0])
    assert (got[0][1] >= 0).all()

    # the server answers from the merged on-disk index with the same API
    client = TestClient(create_app(two))
    hit = client.get("/search", params={"image_id": 123, "k": 3}).json()["results"][0]
    assert hit["id"] == 123 and hit["name"] == "v123" and hit["caption"] == "caption 123"

    # index --add: new parts of the saved trained index, merged after the old lists
    extra = _write_vectors(tmp_path / "new", 6_000, 64, seed=1, first_path=30_000)
    m = add_to_index(tmp_path / "one", tmp_path / "new", progress=False)
    assert m["count"] == 36_000 and m["generation"] == 2 and m["added_after_build"] == 6_000
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "embeddings-2.npy", "index-2.faiss", "index-2.ivfdata", "index-2.trained", "manifest.json",
        "metadata-2.cftable"]  # fmt: skip
    grown = Searcher(tmp_path / "one", model=object(), tokenizer=object(), preprocess=object())
    assert np.array_equal(np.asarray(grown.embeddings[30_000:]), extra)
    assert np.array_equal(np.asarray(grown.embeddings[:30_000]), x)
    for i in (30_000, 33_333, 35_999, 7):
        top = grown.search(image_id=i, k=1)[0]
        assert top.id == i and top.path == f"v{i}" and top.score == pytest.approx(1.0, abs=2e-3)


LIMITED_BUILD = r"""
import json, mmap, resource, sys
import numpy as np
from clipforge.search.index import build_index  # imports faiss, numpy, torch: the fixed cost
from clipforge.search.searcher import Searcher
import pyarrow.parquet  # noqa: F401  (the metadata reader, if parquet)
import faiss, tqdm, clipforge.checkpoints.io, torch.distributed  # noqa: F401,E401  (imported lazily by the build)
faiss.omp_set_num_threads(1)
warm = np.random.default_rng(0).random((2048, 256), np.float32)
faiss.Kmeans(256, 16, niter=1).train(warm)  # OpenBLAS maps ~150 MB of buffers once, whatever the data
np.dot(warm, warm.T)

def vm(key: str = "VmSize") -> int:
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

# headroom: what the build may use; lists: the finished inverted lists, which the built index
# maps (allowed on top); too_big: bytes that must not fit (else the test proves nothing)
emb, out, headroom, too_big = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kind, max_memory, lists, part_rows = sys.argv[5], int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
base = vm()
resource.setrlimit(resource.RLIMIT_AS, (base + headroom + lists, resource.RLIM_INFINITY))
try:  # mmap, not numpy: a failed malloc leaves glibc a 64 MiB arena reserved, eating the headroom
    mmap.mmap(-1, too_big).close()
    print(json.dumps({"limit_bites": False}))
    sys.exit(0)
except OSError:
    pass
m = build_index(emb, out, kind=kind, max_memory=max_memory, progress=False, part_rows=part_rows or None)
peak = vm("VmPeak") - base
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # query time maps files
s = Searcher(out, model=object(), tokenizer=object(), preprocess=object())
hits = [s.search(image_id=i, k=1)[0].id for i in (0, 4321, 199_999)]
print(json.dumps({"limit_bites": True, "count": m["count"], "hits": hits, "nlist": m["build_params"]["nlist"],
                  "peak_vm": peak, "recall": m["expected_recall_at_10"]}))
"""


def test_index_build_under_an_address_space_limit(tmp_path):
    """200k x 256 vectors (205 MB in float32, 102 MB on disk) indexed by a process whose address
    space may grow by 64 MiB only: nothing maps or holds the collection, and the index works."""
    n, dim = 200_000, 256
    _write_vectors(tmp_path / "emb", n, dim, seed=0, shard=20_000)
    headroom, vectors = 64 * 2**20, n * dim * 4
    result = _limited_build(tmp_path, headroom, vectors, "ivfpq", headroom // 2)
    assert result["limit_bites"], "the limit must be smaller than the vectors for this test to mean anything"
    assert result["count"] == n and result["hits"] == [0, 4321, 199_999]
    assert result["recall"] >= 0.9
    assert headroom < vectors / 3


def _limited_build(
    tmp_path: Path,
    headroom: int,
    too_big: int,
    kind: str,
    max_memory: int,
    lists: int = 0,
    part_rows: int = 0,
) -> dict:
    """Run LIMITED_BUILD on ``tmp_path/emb``: the build's address space may grow by ``headroom``
    plus ``lists`` (the finished lists, mapped by the index it returns); ``too_big`` must not fit."""
    script = tmp_path / "limited.py"
    script.write_text(LIMITED_BUILD)
    args = [tmp_path / "emb", tmp_path / "index", headroom, too_big, kind, max_memory, lists, part_rows]
    proc = _run([sys.executable, str(script), *map(str, args)], timeout=600)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_maps_neither_the_parts_nor_a_second_copy_of_the_lists(tmp_path):
    """An ``ivf`` build (flat codes: the lists weigh 1,032 B a vector here) whose lists are larger
    than the headroom: the address space may grow by the headroom (adding a chunk of 16k vectors
    to 1,024 lists takes ~64 MB of distances) plus one copy of the lists (the finished index maps
    them), not two. A merge that maps the parts it reads (faiss's
    ``merge_from_multiple`` maps all of them) or holds memory proportional to the collection runs
    out of address space."""
    n, dim = 200_000, 256
    _write_vectors(tmp_path / "emb", n, dim, seed=0, shard=20_000)
    headroom, lists = 160 * 2**20, n * (dim * 4 + 8)
    assert lists > headroom  # the lists in any second form cannot hide in the headroom
    result = _limited_build(tmp_path, headroom, 2 * lists, "ivf", 2 * lists, lists, part_rows=10_000)
    assert result["limit_bites"], "two copies of the lists must not fit, or the test proves nothing"
    assert result["count"] == n and result["hits"] == [0, 4321, 199_999]
    assert result["recall"] >= 0.9
    assert (tmp_path / "index/index-1.ivfdata").stat().st_size == lists


def _rss_file() -> int:
    return next(
        int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssFile")
    )


def test_calibration_searches_release_the_pages_of_the_lists(tmp_path, monkeypatch):
    """Searching mapped lists makes their pages resident in the process; calibration searches in
    batches and drops them after each (else a build's RSS grows by the whole index), with the
    same results as one search of all queries (batches of at least 20: faiss's arithmetic)."""
    from clipforge.search import build as streamed
    from clipforge.search.index import _search_released, build_index, load_index, search_index

    x = _write_vectors(tmp_path / "emb", 30_000, 64, seed=0)
    build_index(tmp_path / "emb", tmp_path / "index", kind="ivf", progress=False, part_rows=7_000)
    index, manifest = load_index(tmp_path / "index")
    size = (tmp_path / "index" / manifest["ivfdata_file"]).stat().st_size
    nlist = manifest["build_params"]["nlist"]
    queries = x[::60].astype(np.float32)  # 500 queries
    before = _rss_file()
    whole = search_index(index, "ivf", "ip", x, queries, 10, {"nprobe": nlist})[1]
    assert _rss_file() - before > 0.8 * size  # every list was scanned: the whole file is mapped in
    streamed.release_pages(index)
    assert _rss_file() - before < 0.2 * size

    monkeypatch.setattr(streamed, "RESIDENT_LISTS", 1)  # smallest batches
    assert streamed.query_batch(index, nlist, len(queries)) == streamed.MIN_QUERY_BATCH
    for nprobe in (1, 8, nlist):
        one = search_index(index, "ivf", "ip", x, queries, 11, {"nprobe": nprobe})[1]
        assert np.array_equal(_search_released(index, "ivf", "ip", x, queries, 11, {"nprobe": nprobe}), one)
    assert _rss_file() - before < 0.2 * size
    assert np.array_equal(whole, one[:, :10])
