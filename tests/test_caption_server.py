"""``/caption`` and ``/health``'s ``can_caption`` through FastAPI's TestClient (no browser)."""

from __future__ import annotations

import base64

import pytest
import torch
from PIL import Image
from search_fixtures import make_images

import clipforge
from clipforge.model.generate import captions_from_ids
from clipforge.transforms import image_transform


def build_index(root, model_name: str, images: int = 4):
    """A small flat index of shape images embedded by a seeded random ``model_name``."""
    from clipforge.search.embed import embed_images
    from clipforge.search.index import build_index as build
    from clipforge.search.searcher import Searcher

    paths = make_images(root / "images", images, broken=False, duplicates=0)
    torch.manual_seed(0)
    model = clipforge.create_model(model_name).eval()
    clipforge.save_pretrained(model, root / "model")
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    embed_images(
        model, preprocess, root / "images", root / "emb", batch_size=4, num_workers=0, dtype="float32",
        tokenizer=clipforge.get_tokenizer(model), model_name=model_name, pretrained=str(root / "model"),
        progress=False,
    )  # fmt: skip
    build(root / "emb", root / "index", progress=False)
    return Searcher(root / "index"), model, paths


@pytest.fixture(scope="module")
def coca_index(tmp_path_factory):
    from fastapi.testclient import TestClient

    from clipforge.search.server import create_app

    searcher, model, paths = build_index(tmp_path_factory.mktemp("coca_index"), "tiny-coca")
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    expected = captions_from_ids(
        clipforge.get_tokenizer(model), model.generate(images)
    )  # open_clip's defaults
    return TestClient(create_app(searcher, max_upload_bytes=64 * 1024)), searcher, paths, expected


def test_caption_by_id_and_by_upload_equal_generate(coca_index):
    client, searcher, paths, expected = coca_index
    health = client.get("/health").json()
    assert health["can_caption"] is True
    for path, want in zip(paths, expected):
        i = searcher.metadata["path"].index(str(path.resolve()))
        resp = client.get("/caption", params={"image_id": i})
        assert resp.status_code == 200, resp.text
        assert resp.json()["caption"] == want and resp.json()["id"] == i
    data = paths[1].read_bytes()
    by_json = client.post("/caption", json={"image_base64": base64.b64encode(data).decode()})
    by_upload = client.post("/caption", files={"image": (paths[1].name, data, "image/png")})
    for resp in (by_json, by_upload):
        assert resp.status_code == 200, resp.text
        assert resp.json()["caption"] == expected[1] and "id" not in resp.json()
    page = client.get("/").text
    assert "/caption?image_id=" in page and "can_caption" in page


@pytest.mark.parametrize(
    "request_kwargs, status, message",
    [
        ({"method": "GET", "url": "/caption"}, 422, "exactly one of"),
        ({"method": "GET", "url": "/caption", "params": {"image_id": 99}}, 404, "out of range"),
        ({"method": "GET", "url": "/caption", "params": {"image_id": "x"}}, 422, "must be an integer"),
        ({"method": "GET", "url": "/caption", "params": {"text": "a"}}, 422, "unknown field"),
        (
            {"method": "POST", "url": "/caption", "json": {"image_id": 0, "image_base64": "AAAA"}},
            422,
            "exactly one",
        ),
        ({"method": "POST", "url": "/caption", "json": {"image_base64": "%%%"}}, 400, "not valid base64"),
        ({"method": "POST", "url": "/caption", "json": {"image_base64": "QUFB" * 30000}}, 413, "byte limit"),
        (
            {"method": "POST", "url": "/caption", "json": {"image_base64": "QUFBQQ=="}},
            400,
            "not a usable image",
        ),
        ({"method": "POST", "url": "/caption", "content": b"[1]"}, 422, "JSON object"),
        (
            {
                "method": "POST",
                "url": "/caption",
                "content": b"{",
                "headers": {"content-type": "application/json"},
            },
            400,
            "not valid JSON",
        ),
        (
            {"method": "POST", "url": "/caption", "content": b"x", "headers": {"content-type": "image/png"}},
            415,
            "content type",
        ),
    ],
)
def test_caption_input_errors_are_json(coca_index, request_kwargs, status, message):
    client = coca_index[0]
    resp = client.request(**request_kwargs)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]


def test_a_clip_index_cannot_caption(tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.search.server import create_app

    searcher, _, _ = build_index(tmp_path, "tiny-vit", images=2)
    client = TestClient(create_app(searcher))
    assert client.get("/health").json()["can_caption"] is False
    resp = client.get("/caption", params={"image_id": 0})
    assert resp.status_code == 404 and "cannot caption" in resp.json()["error"]
