"""The search service's structure without an index: its state, its request models, its static page.

(The behaviour over a real index is in test_search.py, test_caption_server.py and
robustness/test_search_service.py.)
"""

from __future__ import annotations

from importlib import resources
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from clipforge.search.http_fields import ApiError, CaptionFields, SearchFields  # noqa: E402
from clipforge.search.server import ServerState, create_app  # noqa: E402


def _empty_searcher() -> SimpleNamespace:
    """Just what create_app and the routes read from a Searcher, for an index of nothing."""
    return SimpleNamespace(manifest={"model": {}, "kind": "flat", "dim": 4}, model=None, count=0)


@pytest.fixture
def client() -> TestClient:
    return TestClient(create_app(_empty_searcher(), max_k=7, warmup=False))


def test_state_lives_on_the_app(client):
    state = client.app.state.server
    assert isinstance(state, ServerState)
    assert (state.max_k, state.parser.max_k, state.max_upload_bytes) == (7, 7, 8 * 1024 * 1024)
    assert client.app.state.batcher is state.batcher  # the older names still reach the same objects


def test_page_and_static_files_come_from_package_data(client):
    shipped = (resources.files("clipforge.search") / "static" / "index.html").read_bytes()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == shipped and "etag" in page.headers  # StaticFiles' caching headers
    assert client.get("/static/index.html").content == shipped
    missing = client.get("/static/nope.js")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert client.post("/static/index.html").status_code == 405


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"text": "x", "k": "ten"}, "k must be an integer, got 'ten'"),
        ({"text": "x", "k": 8}, "k must be between 1 and 7, got 8"),
        ({"q": 5}, "q must be a string, got int"),
        ({"text": "x", "dedup": "maybe"}, "dedup must be true or false, got 'maybe'"),
        ({"text": "x", "weights": [1, "a"]}, "weights: weight 1 must be a finite number below 1e6, got 'a'"),
        ({"image_base64": 3}, "image_base64 must be a string, got int"),
        (
            {"txt": "typo", "kk": 1},
            "unknown field(s) ['kk', 'txt']; accepted: text, q, image_base64, image_id, k, weights, dedup",
        ),
    ],
)
def test_search_fields_name_the_field(fields, message):
    with pytest.raises(ApiError) as e:
        SearchFields.parse(fields, max_k=7, max_text_chars=10)
    assert (e.value.status, e.value.message) == (422, message)


def test_search_fields_accept_the_loose_forms_of_forms_and_query_strings():
    f = SearchFields.parse(
        {"q": "  a dog\x00 ", "k": "5", "dedup": "yes", "weights": "[1, 0.5]", "image_id": 2.0}
    )
    assert (f.q, f.text, f.k, f.dedup, f.weights, f.image_id) == ("a dog", None, 5, True, [1.0, 0.5], 2)
    assert f.model_fields_set == {"q", "k", "dedup", "weights", "image_id"}
    assert CaptionFields.parse({"image_id": "3"}).image_id == 3


def test_errors_over_http_are_json_with_the_field(client):
    r = client.post("/search", json={"text": "x", "k": 0})
    assert r.status_code == 422 and r.json() == {"error": "k must be between 1 and 7, got 0"}
    r = client.get("/search", params={"text": "x", "image_id": "1"})
    assert r.status_code == 404 and r.json() == {"error": "image_id 1 out of range [0, 0)"}
    r = client.get("/caption", params={"image": "1"})
    assert r.status_code == 422 and "unknown field(s) ['image']" in r.json()["error"]
