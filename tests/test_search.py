"""End-to-end search: embed a generated image set, index it, query via Python, CLI and HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from search_fixtures import UvicornThread, build_setup, load_model, make_images

pytest.importorskip("faiss")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def searcher(setup):
    from clipforge.search.searcher import Searcher

    # dedup threshold: copies are identical, while the random tiny model puts distinct images up to
    # ~0.9986 apart (a trained model spreads them out; 0.98 is the default)
    return Searcher(setup.index_dir, dedup_threshold=0.9995)  # rebuilds the model from the manifest


def _ids(results):
    return [r["id"] if isinstance(r, dict) else r.id for r in results]


def _scores(results):
    return np.array([r["score"] if isinstance(r, dict) else r.score for r in results])


def _assert_same_ranking(got, want, atol=1e-5):
    """Same scores rank by rank; ids may only differ where two results tie within float noise."""
    np.testing.assert_allclose(_scores(got), _scores(want), atol=atol)
    want_score = dict(zip(_ids(want), _scores(want)))
    for i, s in zip(_ids(got), _scores(got)):
        assert i in want_score or abs(s - _scores(want)[-1]) <= atol, (i, s)
        if i in want_score:
            assert abs(want_score[i] - s) <= atol, (i, s, want_score[i])


# ----------------------------------------------------------------------------- embed
def test_embed_outputs(setup):
    from clipforge.search.embed import load_manifest
    from clipforge.search.tables import read_table

    m = load_manifest(setup.emb_dir)
    assert m["count"] == 62 and m["skipped"] == 1 and m["dim"] == 64  # 60 + 2 copies; broken.jpg skipped
    assert m["model"] == "tiny-vit" and m["pretrained"] == str(setup.model_dir) and m["has_text"]
    assert [s["image"] for s in m["shards"]] == [
        "img_emb_00000.npy",
        "img_emb_00001.npy",
        "img_emb_00002.npy",
    ]
    meta = read_table(setup.emb_dir / m["metadata"])
    assert meta["id"] == list(range(62))
    # order preserved: the sorted listing of the folder, minus the broken file
    listing = sorted(p for p in (setup.root / "images").rglob("*") if p.suffix in (".png", ".jpg"))
    assert meta["path"] == [str(p.resolve()) for p in listing if p.name != "broken.jpg"]
    assert set(meta["width"]) == {48} and set(meta["height"]) == {48}
    i = meta["path"].index(str(setup.images[7].resolve()))
    assert meta["caption"][i] == (setup.images[7].with_suffix(".txt")).read_text()
    skipped = read_table(setup.emb_dir / "skipped.csv")
    assert [Path(p).name for p in skipped["path"]] == ["broken.jpg"] and "not_an_image" in skipped["reason"][
        0
    ]
    img = np.concatenate([np.load(setup.emb_dir / s["image"]) for s in m["shards"]])
    txt = np.concatenate([np.load(setup.emb_dir / s["text"]) for s in m["shards"]])
    assert img.dtype == np.float32 and img.shape == (62, 64) and txt.shape == (62, 64)
    np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
    has_caption = np.array([bool(c) for c in meta["caption"]])
    assert has_caption.sum() == 60  # the two copies have no .txt: their caption rows stay zero
    np.testing.assert_allclose(
        np.linalg.norm(txt.astype(np.float32), axis=1), has_caption.astype(float), atol=2e-3
    )


def test_embeddings_match_direct_encoding(setup):
    import torch

    from clipforge.data.images import load_image
    from clipforge.search.tables import find_table, read_table

    model, preprocess, _ = load_model(setup.model_dir)
    meta = read_table(find_table(setup.emb_dir, "metadata"))
    rows = [0, 17, 61]
    x = torch.stack([preprocess(load_image(meta["path"][r])) for r in rows])
    with torch.no_grad():
        want = model.encode_image(x, normalize=True).numpy()
    got = np.concatenate([np.load(setup.emb_dir / f"img_emb_{s:05d}.npy") for s in range(3)])[rows]
    np.testing.assert_allclose(got.astype(np.float32), want, atol=3e-3)


def test_embed_resumes_and_refuses_foreign_folder(setup, tmp_path):
    from clipforge.errors import DataError
    from clipforge.search.embed import embed_images

    emb = tmp_path / "emb"
    shutil.copytree(setup.emb_dir, emb)
    (emb / "img_emb_00001.npy").unlink()  # as if interrupted while writing shard 1
    (emb / "embed_manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in emb.glob("*_00000.*")}
    model, preprocess, tokenizer = load_model(setup.model_dir)
    m = embed_images(
        model,
        preprocess,
        setup.root / "images",
        emb,
        batch_size=8,
        num_workers=0,
        shard_size=25,
        dtype="float32",
        tokenizer=tokenizer,
        model_name="tiny-vit",
        pretrained=str(setup.model_dir),
        progress=False,
    )
    assert {p.name: p.stat().st_mtime_ns for p in emb.glob("*_00000.*")} == before  # shard 0 not redone
    assert m["count"] == 62
    np.testing.assert_allclose(
        np.load(emb / "img_emb_00001.npy").astype(np.float32),
        np.load(setup.emb_dir / "img_emb_00001.npy").astype(np.float32),
        atol=2e-3,
    )
    from clipforge.search.tables import find_table, read_table

    assert read_table(find_table(emb, "metadata")) == read_table(find_table(setup.emb_dir, "metadata"))
    with pytest.raises(DataError, match="shard_size"):
        embed_images(
            model,
            preprocess,
            setup.root / "images",
            emb,
            shard_size=10,
            dtype="float32",
            model_name="tiny-vit",
            pretrained=str(setup.model_dir),
            num_workers=0,
            progress=False,
        )


def test_embed_from_table_and_tar(setup, tmp_path):
    import tarfile

    from clipforge.search.embed import embed_images, list_items

    table = tmp_path / "pairs.csv"
    rel = [os.path.relpath(p, tmp_path) for p in setup.images[:5]]
    table.write_text("filepath,caption\n" + "".join(f"{r},caption {i}\n" for i, r in enumerate(rel)))
    items = list_items(table)
    assert [it.caption for it in items] == [f"caption {i}" for i in range(5)]
    assert [it.path for it in items] == [str(p.resolve()) for p in setup.images[:5]]
    tar = tmp_path / "shard-000.tar"
    with tarfile.open(tar, "w") as tf:
        for i, p in enumerate(setup.images[:4]):
            tf.add(p, arcname=f"{i:04d}{p.suffix}")
            tf.add(p.with_suffix(".txt"), arcname=f"{i:04d}.txt")
    model, preprocess, tokenizer = load_model(setup.model_dir)
    a = embed_images(model, preprocess, table, tmp_path / "e1", num_workers=0, progress=False)  # float16
    assert np.load(tmp_path / "e1/img_emb_00000.npy").dtype == np.float16
    b = embed_images(
        model,
        preprocess,
        str(tmp_path / "shard-{000..000}.tar"),
        tmp_path / "e2",
        num_workers=0,
        progress=False,
        tokenizer=tokenizer,
    )
    assert a["count"] == 5 and b["count"] == 4 and b["has_text"]
    ea, eb = np.load(tmp_path / "e1/img_emb_00000.npy"), np.load(tmp_path / "e2/img_emb_00000.npy")
    np.testing.assert_allclose(ea[:4].astype(np.float32), eb.astype(np.float32), atol=2e-3)


# ----------------------------------------------------------------------------- index
def test_plan_choice_by_size_and_memory():
    from clipforge.errors import ClipforgeError
    from clipforge.search.index import parse_memory, plan_index

    assert plan_index(1_000, 512).kind == "flat"
    assert plan_index(100_000, 512).kind == "hnsw"
    big = plan_index(1_000_000, 512)
    assert big.kind == "ivf" and big.params["nlist"] == 4096
    pq = plan_index(1_000_000, 512, max_memory="1GB")
    assert pq.kind == "ivfpq" and pq.memory_bytes <= 1e9 and pq.params["pq_m"] == 64
    assert plan_index(1_000_000, 512, max_memory="50MB").params["pq_m"] == 32
    with pytest.raises(ClipforgeError, match="max-memory"):
        plan_index(1_000_000, 512, max_memory="10MB")
    with pytest.raises(ClipforgeError, match="max-memory"):
        plan_index(1_000, 512, kind="flat", max_memory=1000)
    assert parse_memory("2GB") == 2_000_000_000 and parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5G") == 1_500_000_000 and parse_memory(None) is None
    with pytest.raises(ClipforgeError, match="memory size"):
        parse_memory("lots")


def test_index_manifest_and_files(setup):
    from clipforge.search.index import read_manifest

    m = read_manifest(setup.index_dir)
    assert m["kind"] == "flat" and m["count"] == 62 and m["expected_recall_at_10"] == 1.0
    from clipforge.model.registry import get_model_config

    tiny = get_model_config("tiny-vit").to_dict()  # the architecture itself is recorded, not only its name
    from clipforge.factory import create_model

    pre = create_model(pretrained=setup.model_dir).preprocess_cfg.to_dict()  # image queries get these pixels
    assert m["model"] == {
        "name": "tiny-vit",
        "pretrained": str(setup.model_dir),
        "config": tiny,
        "preprocess": pre,
    }
    names = sorted(p.name for p in setup.index_dir.iterdir())
    assert names == ["embeddings-1.npy", "index-1.faiss", "manifest.json", "metadata-1.cftable"]


def test_mapped_table_round_trip_and_corruption(tmp_path):
    from clipforge.errors import DataError
    from clipforge.search.tables import MappedTable, open_metadata, write_mapped_table

    cols = {
        "id": [0, 1, 2, 3],
        "path": ["/a/b.jpg", "", "/\u4e2d\u6587/\U0001f600.png", 'x,y\n"z"'],
        "caption": ["a red circle", "caf\u00e9", "", "nul\x00gone"],
        "width": [48, 0, 2**40, -1],
    }
    path = write_mapped_table(tmp_path / "m.cftable", cols)
    t = open_metadata(path)
    assert isinstance(t, MappedTable) and t.rows == 4 and list(t) == ["id", "width", "path", "caption"]
    want = {**cols, "caption": ["a red circle", "caf\u00e9", "", "nulgone"]}  # NUL dropped, as in CSV
    assert t.to_columns() == {k: want[k] for k in t}
    assert t["path"][2] == cols["path"][2] and t["path"][-1] == cols["path"][3] and t["width"][2] == 2**40
    assert t["path"].index("/a/b.jpg") == 0 and t["caption"][1:3] == ["caf\u00e9", ""]
    with pytest.raises(IndexError):
        t["caption"][4]
    empty = MappedTable(write_mapped_table(tmp_path / "e.cftable", {"id": [], "path": []}))
    assert empty.rows == 0 and list(empty["path"]) == []
    data = path.read_bytes()
    (tmp_path / "cut.cftable").write_bytes(data[:-3])
    with pytest.raises(DataError, match="truncated"):
        MappedTable(tmp_path / "cut.cftable")
    (tmp_path / "bad.cftable").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(DataError, match="magic"):
        MappedTable(tmp_path / "bad.cftable")


def test_loaded_index_and_metadata_are_memory_mapped(searcher, setup):
    from clipforge.search.index import is_memory_mapped
    from clipforge.search.tables import MappedTable, find_table, read_table

    assert is_memory_mapped(searcher.index, "flat")
    assert isinstance(searcher.embeddings, np.memmap)
    assert isinstance(searcher.metadata, MappedTable)
    want = read_table(find_table(setup.emb_dir, "metadata"))
    assert searcher.metadata.to_columns() == want  # same rows as the embed step's table


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_other_index_kinds_find_self(setup, tmp_path, kind):
    from clipforge.search.index import build_index, is_memory_mapped
    from clipforge.search.searcher import Searcher

    m = build_index(setup.emb_dir, tmp_path / kind, kind=kind, progress=False)
    assert m["kind"] == kind and m["search_params"] and 0.5 < m["expected_recall_at_10"] <= 1.0
    s = Searcher(tmp_path / kind, model=object(), tokenizer=object(), preprocess=object())  # no model needed
    assert is_memory_mapped(s.index, kind)  # inverted lists / graph storage stay on disk
    for i in (3, 31, 55):  # (30 is img000, which has two identical copies)
        top = s.search(image_id=i, k=3)
        assert top[0].id == i and top[0].score == pytest.approx(1.0, abs=2e-3)


def test_add_to_index(setup, tmp_path):
    from clipforge.search.embed import embed_images
    from clipforge.search.index import add_to_index, build_index, read_manifest
    from clipforge.search.searcher import Searcher
    from clipforge.search.tables import atomic_write_json, read_json

    index = tmp_path / "index"
    shutil.copytree(setup.index_dir, index)
    new = make_images(tmp_path / "new", 5, start=60, broken=False, duplicates=0)
    model, preprocess, tokenizer = load_model(setup.model_dir)
    embed_images(
        model,
        preprocess,
        tmp_path / "new",
        tmp_path / "emb_new",
        num_workers=0,
        dtype="float32",
        tokenizer=tokenizer,
        model_name="tiny-vit",
        pretrained=str(setup.model_dir),
        progress=False,
    )
    before = Searcher(index, model=model, tokenizer=tokenizer, preprocess=preprocess).search(
        text="a red circle", k=5
    )
    m = add_to_index(index, tmp_path / "emb_new", progress=False)
    assert m["count"] == 67 and m["generation"] == 2 and read_manifest(index)["count"] == 67
    assert m["memory_bytes"] == 67 * 64 * 4 and m["added_after_build"] == 5  # flat: float32 vectors
    assert sorted(p.name for p in index.iterdir()) == [
        "embeddings-2.npy",
        "index-2.faiss",
        "manifest.json",
        "metadata-2.cftable",
    ]
    s = Searcher(index, model=model, tokenizer=tokenizer, preprocess=preprocess)
    order = sorted(new)  # listing order of the new folder
    for j, p in enumerate(order):
        hit = s.search(image=p, k=1)[0]
        assert hit.id == 62 + j and hit.path == str(p.resolve()) and hit.score > 0.99
    old = [r.id for r in s.search(text="a red circle", k=5) if r.id < 62]
    assert old == [r.id for r in before][: len(old)]  # old entries keep their ids and order

    # an approximate index: the search setting is re-calibrated on the grown collection (a stale,
    # deliberately bad setting in the manifest must not survive the add)
    hnsw = tmp_path / "hnsw"
    build_index(setup.emb_dir, hnsw, kind="hnsw", progress=False)
    mf = read_json(hnsw / "manifest.json")
    atomic_write_json(
        hnsw / "manifest.json", {**mf, "search_params": {"efSearch": 1}, "expected_recall_at_10": 0.1}
    )
    m = add_to_index(hnsw, tmp_path / "emb_new", progress=False)
    assert m["count"] == 67 and m["search_params"]["efSearch"] >= 16 and m["expected_recall_at_10"] >= 0.95
    s = Searcher(hnsw, model=model, tokenizer=tokenizer, preprocess=preprocess)
    assert s.index.hnsw.efSearch == m["search_params"]["efSearch"]
    assert [s.search(image_id=i, k=1)[0].id for i in (5, 40, 64, 66)] == [5, 40, 64, 66]


# ----------------------------------------------------------------------------- query (Python)
def test_query_by_image_path_bytes_pil_and_id(searcher, setup):
    from PIL import Image

    target = setup.images[11]
    i = searcher.metadata["path"].index(str(target.resolve()))
    by_path = searcher.search(image=target, k=5)
    by_bytes = searcher.search(image=target.read_bytes(), k=5)
    by_pil = searcher.search(image=Image.open(target), k=5)
    by_id = searcher.search(image_id=i, k=5)
    for res in (by_path, by_bytes, by_pil, by_id):
        assert res[0].id == i and res[0].score == pytest.approx(1.0, abs=3e-3)
        assert _ids(res) == _ids(by_path)
        assert list(_scores(res)) == sorted(_scores(res), reverse=True)
    assert by_path[0].caption == target.with_suffix(".txt").read_text() and by_path[0].width == 48


def test_text_and_weighted_queries(searcher, setup):
    from PIL import Image

    text = searcher.search(text="a red circle", k=10)
    assert len(text) == 10 and len(set(_ids(text))) == 10
    assert all(-1.0 <= r.score <= 1.0 for r in text)
    img = setup.images[4]
    image_only = searcher.search(image=img, k=10)
    zero_text = searcher.search(text="in winter", image=img, weights=(0.0, 1.0), k=10)
    assert _ids(zero_text) == _ids(image_only)
    np.testing.assert_allclose(_scores(zero_text), _scores(image_only), atol=1e-5)
    mixed = searcher.search(text="a red circle", image=img, weights={"text": 1.0, "image": 1.0}, k=62)
    # the mixed query scores each image at (s_text + s_image) / |q_text + q_image|
    t_all = {r.id: r.score for r in searcher.search(text="a red circle", k=62)}
    i_all = {r.id: r.score for r in searcher.search(image=img, k=62)}
    q_t = searcher.encode_text(["a red circle"])[0]
    q_i = searcher.encode_images([Image.open(img).convert("RGB")])[0]
    norm = np.linalg.norm(q_t + q_i)
    for r in mixed[:10]:
        assert r.score == pytest.approx((t_all[r.id] + i_all[r.id]) / norm, abs=2e-3)


def test_dedup_drops_identical_copies(searcher, setup):
    original = setup.images[0]
    plain = searcher.search(image=original, k=5)
    paths = [Path(r.path).name for r in plain[:3]]
    assert sorted(paths) == sorted([original.name, "copy0" + original.suffix, "copy1" + original.suffix])
    deduped = searcher.search(image=original, k=5, dedup=True)
    assert len(deduped) == 5
    assert sum(Path(r.path).name in paths for r in deduped) == 1
    assert (
        _ids(deduped)[1:]
        == [i for i in _ids(searcher.search(image=original, k=7)) if i not in _ids(plain[:3])][:4]
    )


def test_query_errors(searcher):
    from clipforge.search.searcher import QueryError, combine

    with pytest.raises(QueryError, match="out of range"):
        searcher.search(image_id=62)
    with pytest.raises(QueryError, match="give text"):
        searcher.search(k=3)
    with pytest.raises(QueryError, match="positive"):
        searcher.search(text="x", k=0)
    with pytest.raises(QueryError, match="2 weights for 1"):
        searcher.search(text="x", weights=[1, 2])
    v = np.ones(4, np.float32) / 2
    with pytest.raises(QueryError, match="cancel"):
        combine({"text": v, "image": v}, [1.0, -1.0])
    with pytest.raises(QueryError, match="finite"):
        combine({"text": v}, [float("nan")])


# ----------------------------------------------------------------------------- CLI / HTTP agreement
QUERY = "a red circle"


def test_cli_agrees_with_python(searcher, setup, capsys):
    from clipforge.cli import main

    want = searcher.search(text=QUERY, k=8)
    assert main(["search", str(setup.index_dir), QUERY, "-k", "8", "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert _ids(got) == _ids(want)
    np.testing.assert_allclose(_scores(got), _scores(want), atol=1e-5)
    assert main(["search", str(setup.index_dir), "--image", str(setup.images[9]), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[3].endswith(setup.images[9].name)
    assert main(["search", str(setup.index_dir)]) == 2  # no query: a user error, not a crash


@pytest.mark.slow
def test_cli_embed_index_search(setup, tmp_path, searcher, capsys):
    """embed in a fresh process (the installed entry point), then index and search via cli.main."""
    from clipforge.cli import main

    emb, idx = tmp_path / "emb", tmp_path / "idx"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clipforge",
            "embed",
            "--model",
            "tiny-vit",
            "--pretrained",
            str(setup.model_dir),
            "--images",
            str(setup.root / "images"),
            "--out",
            str(emb),
            "--workers",
            "1",
            "--shard-size",
            "25",
            "--dtype",
            "float32",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for s in range(3):  # same model, same images: same vectors (batch size differs: float noise only)
        np.testing.assert_allclose(
            np.load(emb / f"img_emb_{s:05d}.npy"), np.load(setup.emb_dir / f"img_emb_{s:05d}.npy"), atol=1e-6
        )
    assert main(["index", str(emb), "--out", str(idx)]) == 0
    out = capsys.readouterr().out
    assert "choice: flat" in out and "expected recall@10 1.000" in out
    assert main(["search", str(idx), QUERY, "-k", "6", "--json"]) == 0
    got, want = json.loads(capsys.readouterr().out), searcher.search(text=QUERY, k=6)
    # A fresh embedding run batches differently, so near-ties may swap places; scores must agree.
    _assert_same_ranking(got, want)
    assert (
        main(["index", str(emb), "--out", str(tmp_path / "pq"), "--kind", "ivfpq", "--max-memory", "30KB"])
        == 0
    )
    assert "ivfpq" in capsys.readouterr().out
    assert main(["index", str(emb), "--out", str(tmp_path / "x"), "--max-memory", "1KB"]) == 2


def test_http_testclient_agrees_with_python(searcher, setup):
    from fastapi.testclient import TestClient

    from clipforge.search.server import create_app

    client = TestClient(create_app(searcher))
    want = searcher.search(text=QUERY, k=8)
    for resp in (
        client.post("/search", json={"text": QUERY, "k": 8}),
        client.get("/search", params={"q": QUERY, "k": 8}),
    ):
        assert resp.status_code == 200, resp.text
        got = resp.json()["results"]
        assert _ids(got) == _ids(want)
        np.testing.assert_allclose(_scores(got), _scores(want), atol=1e-5)
        assert got[0]["url"] == f"/image/{got[0]['id']}" and "path" not in got[0]
    img = setup.images[21]
    i = searcher.metadata["path"].index(str(img.resolve()))
    up = client.post("/search", files={"image": (img.name, img.read_bytes(), "image/png")}, data={"k": "4"})
    assert up.status_code == 200 and up.json()["results"][0]["id"] == i
    import base64

    b64 = client.post(
        "/search",
        json={
            "image_base64": base64.b64encode(img.read_bytes()).decode(),
            "k": 4,
            "text": "in winter",
            "weights": {"text": 0.0, "image": 1.0},
        },
    )
    assert _ids(b64.json()["results"]) == _ids(up.json()["results"])
    by_id = client.post("/search", json={"image_id": i, "k": 4, "dedup": True}).json()["results"]
    assert _ids(by_id) == _ids(searcher.search(image_id=i, k=4, dedup=True))
    thumb = client.get(f"/image/{i}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert Image.open(io.BytesIO(thumb.content)).size == (48, 48)
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["count"] == 62 and health["model"] == "tiny-vit"
    page = client.get("/")
    assert page.status_code == 200 and "clipforge search" in page.text and "<script" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN


@pytest.mark.slow
def test_real_uvicorn_agrees_and_batches(searcher, setup):
    import httpx

    from clipforge.search.server import create_app

    want = searcher.search(text=QUERY, k=8)
    app = create_app(searcher, batch_wait_ms=30)
    with UvicornThread(app) as srv:
        r = httpx.post(f"{srv.url}/search", json={"text": QUERY, "k": 8}, timeout=30)
        assert r.status_code == 200
        assert _ids(r.json()["results"]) == _ids(want)
        np.testing.assert_allclose(_scores(r.json()["results"]), _scores(want), atol=1e-5)

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                texts = [
                    f"a {w} shape" for w in ("red", "green", "blue", "big", "small", "round", "odd", "dark")
                ]
                rs = await asyncio.gather(*[c.post("/search", json={"text": t, "k": 5}) for t in texts])
                return texts, rs

        texts, rs = asyncio.run(burst())
        assert all(r.status_code == 200 for r in rs)
        for t, r in zip(texts, rs):  # batched answers equal the one-at-a-time answers
            single = searcher.search(text=t, k=5)
            assert _ids(r.json()["results"]) == _ids(single)
            np.testing.assert_allclose(_scores(r.json()["results"]), _scores(single), atol=1e-4)
        h = httpx.get(f"{srv.url}/health").json()
        assert h["batched_queries"] == 9 and h["batches"] < 9  # concurrent queries shared forward passes
        assert httpx.get(f"{srv.url}/image/0").status_code == 200


def test_micro_batcher_groups_concurrent_calls():
    from clipforge.search.server import MicroBatcher

    calls = []

    def fn(items):
        calls.append(list(items))
        if "bad" in items and len(items) > 1:
            raise ValueError("one bad item")
        if items == ["bad"]:
            raise ValueError("bad")
        return [x.upper() for x in items]

    b = MicroBatcher(fn, max_batch=4, wait_s=0.05)

    async def go():
        return await asyncio.gather(
            *[b.submit(x) for x in ["a", "b", "c", "d", "e", "bad"]], return_exceptions=True
        )

    out = asyncio.run(go())
    assert out[:5] == ["A", "B", "C", "D", "E"] and isinstance(out[5], ValueError)
    assert calls[0] == ["a", "b", "c", "d"]  # max_batch reached: flushed at once, 4 in one call
    assert calls[1] == ["e", "bad"] and ["e"] in calls and ["bad"] in calls  # failure isolated per item
    b.close()
