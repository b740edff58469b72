"""Hostile and careless HTTP input to the search service: always a 4xx JSON error, never a 5xx,
and the server keeps answering good requests afterwards (issue 7, "Search service")."""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import struct
import zlib

import pytest
from search_fixtures import UvicornThread, build_setup

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

MAX_UPLOAD = 64 * 1024
MAX_K = 50
COUNT = 22  # 20 images + 2 identical copies (the broken file is skipped)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("svc"), n=20, num_workers=0)


@pytest.fixture(scope="module")
def app(setup):
    from clipforge.search.searcher import Searcher
    from clipforge.search.server import create_app

    return create_app(
        Searcher(setup.index_dir),
        max_upload_bytes=MAX_UPLOAD,
        max_k=MAX_K,
        max_text_chars=200,
        body_timeout_s=1.0,
    )


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, raise_server_exceptions=False)


def png_bytes(w: int = 24, h: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(w: int = 40_000, h: int = 40_000) -> bytes:
    """A valid PNG header declaring w x h pixels with one tiny IDAT: 4.8 GB if ever decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def assert_error(resp, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


def assert_alive(client) -> None:
    r = client.post("/search", json={"text": "a red square", "k": 3})
    assert r.status_code == 200 and len(r.json()["results"]) == 3


# ----------------------------------------------------------------------------- uploads
def test_oversized_upload_is_413(client):
    big = b"\x89PNG\r\n\x1a\n" + b"0" * (2 * MAX_UPLOAD)
    assert "limit" in assert_error(client.post("/search", files={"image": ("x.png", big, "image/png")}), 413)
    b64 = base64.b64encode(big).decode()
    assert_error(client.post("/search", json={"image_base64": b64}), 413)

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(40):
            yield b"x" * 4096

    assert_error(client.post("/search", content=chunks(), headers={"content-type": "application/json"}), 413)
    # just under the body limit, but the decoded image itself is over max_upload_bytes
    assert_error(
        client.post("/search", json={"image_base64": base64.b64encode(b"0" * (MAX_UPLOAD + 10)).decode()}),
        413,
    )
    assert_alive(client)


@pytest.mark.parametrize(
    "payload,status",
    [
        (b"", 400),
        (b"<html>not an image</html>", 400),
        (png_bytes()[:40], 400),  # truncated PNG
        (b"GIF89a" + b"\x00" * 5, 400),
        (bomb_png(), 413),
    ],
    ids=["empty", "html", "truncated", "gif-stub", "bomb"],
)
def test_bad_images_are_4xx(client, payload, status):
    # (the bomb's 413 carries the "too_large" reason: refused from its header, never decoded)
    for resp in (
        client.post("/search", files={"image": ("q.png", payload, "image/png")}),
        client.post("/search", json={"image_base64": base64.b64encode(payload).decode()}),
    ):
        err = assert_error(resp, status)
        if status == 413:
            assert "too_large" in err
    assert_alive(client)


# ----------------------------------------------------------------------------- JSON / fields
@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"text": "a', 400, "not valid JSON"),
        (b"[1, 2]", 422, "JSON object"),
        (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, (400, 413), ""),  # nesting bomb (over the body limit too)
        (b"[" * 20_000 + b"]" * 20_000, 400, "not valid JSON"),
        (b'{"text": "x", "image_base64": "!!!notbase64"}', 400, "base64"),
        (b'{"text": "x", "image_base64": 12}', 422, "string"),
        (b'{"txt": "typo"}', 422, "unknown field"),
        (b'{"text": ""}', 422, "empty"),
        (b'{"text": "   \\n\\t "}', 422, "empty"),
        (b'{"text": "\\u0000"}', 422, "empty"),
        (json.dumps({"text": "x" * 201}).encode(), 422, "limit"),
        (b'{"text": "\\ud800"}', 422, "Unicode"),
        (b'{"text": 5}', 422, "string"),
        (b'{"text": "x", "k": 0}', 422, "between"),
        (b'{"text": "x", "k": -3}', 422, "between"),
        (b'{"text": "x", "k": 51}', 422, "between"),
        (b'{"text": "x", "k": 1000000000000000000000000}', 422, "between"),
        (b'{"text": "x", "k": "ten"}', 422, "integer"),
        (b'{"text": "x", "k": true}', 422, "boolean"),
        (b'{"text": "x", "k": 2.5}', 422, "integer"),
        (b'{"text": "x", "weights": [NaN]}', 422, "finite"),
        (b'{"text": "x", "weights": [Infinity]}', 422, "finite"),
        (b'{"text": "x", "weights": "abc"}', 422, "weights"),
        (b'{"text": "x", "weights": {"txt": 1}}', 422, "unknown weight"),
        (b'{"text": "x", "weights": [1, 2]}', 422, "weights for 1"),
        (b'{"image_id": 22}', 404, "out of range"),
        (b'{"image_id": -1}', 404, "out of range"),
        (b'{"image_id": "../../etc/passwd"}', 422, "integer"),
        (b'{"dedup": "maybe", "text": "x"}', 422, "true or false"),
        (b"{}", 422, "give text"),
    ],
)
def test_bad_json_fields_are_4xx(client, body, status, needle):
    err = assert_error(
        client.post("/search", content=body, headers={"content-type": "application/json"}), status
    )
    assert needle in err
    assert_alive(client)


def test_other_request_shapes(client):
    assert_error(
        client.post(
            "/search", content=b"text=x", headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        415,
    )
    assert_error(client.get("/search"), 422)
    assert_error(client.get("/search", params={"q": "x", "k": "0"}), 422)
    assert_error(client.get("/search", params={"q": "x", "text": "y"}), 422)
    assert_error(client.delete("/search"), 405)
    assert_error(client.get("/nope"), 404)
    files = {"image": ("a.png", png_bytes(), "image/png"), "other": ("b.png", png_bytes(), "image/png")}
    assert_error(client.post("/search", files=files), (400, 422))  # two files
    assert_error(client.post("/search", files={"photo": ("a.png", png_bytes(), "image/png")}), (400, 422))
    assert_error(
        client.post(
            "/search", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
        ),
        (400, 422),
    )
    assert_error(
        client.post(
            "/search", content=b"{}", headers={"content-type": "application/json", "content-length": "abc"}
        ),
        400,
    )
    assert_alive(client)


@pytest.mark.parametrize(
    "path,status",
    [
        ("/image/../../etc/passwd", 404),
        ("/image/..%2F..%2Fetc%2Fpasswd", (400, 404)),
        ("/image/%2e%2e", 400),
        ("/image/-1", 400),
        ("/image/1e3", 400),
        ("/image/0x1", 400),
        ("/image/22", 404),
        ("/image/99999999999999999999", 400),
        ("/image/3?size=5000", 422),
        ("/image/3?size=abc", 422),
        ("/static/..%2F..%2Fsearch%2Fserver.py", 404),
        ("/static/%2e%2e/server.py", 404),
    ],
)
def test_image_ids_are_never_paths(client, path, status):
    r = client.get(path)
    err = assert_error(r, status)
    assert "root:" not in r.text and "import" not in r.text and err
    ok = client.get("/image/3")
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"


def test_unreadable_indexed_image_is_404(setup, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from clipforge.search.searcher import Searcher
    from clipforge.search.server import create_app

    index = tmp_path / "index"
    shutil.copytree(setup.index_dir, index)
    s = Searcher(index)
    moved = tmp_path / "moved.png"
    shutil.move(s.metadata["path"][2], moved)
    try:
        c = TestClient(create_app(s), raise_server_exceptions=False)
        assert "no longer readable" in assert_error(c.get("/image/2"), 404)
        assert c.get("/image/3").status_code == 200
    finally:
        shutil.move(moved, s.metadata["path"][2])


# ----------------------------------------------------------------------------- slow clients (real server)
@pytest.mark.slow
def test_slow_client_gets_408_and_others_are_served(app):
    import httpx

    with UvicornThread(app) as srv:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=15)
        try:
            slow.sendall(
                b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"te'
            )
            r = httpx.post(f"{srv.url}/search", json={"text": "a cat", "k": 2}, timeout=10)
            assert r.status_code == 200  # served while the slow client still holds its connection
            reply = b""
            while b"\r\n\r\n" not in reply:
                data = slow.recv(4096)
                if not data:
                    break
                reply += data
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
        finally:
            slow.close()
        assert httpx.get(f"{srv.url}/health", timeout=10).json()["status"] == "ok"


# ----------------------------------------------------------------------------- fuzz
def _fuzz_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(12)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, 1, -1, 5, 50, 51, 10**6, -(10**12), 2**63, 10**30])
    if choice == 3:
        return rng.choice([0.0, 1.5, -2.5, 1e308, float("nan"), float("inf"), -float("inf")])
    if choice == 4:
        alphabet = "abc \t\n\x00\u00e9\u4e2d\U0001f600\ud800<>/\\..%\"'{}"
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 50, 250])))
    if choice == 5:
        return base64.b64encode(rng.randbytes(rng.choice([0, 3, 100, 5000]))).decode()
    if choice == 6:
        return base64.b64encode(
            rng.choice([png_bytes(), png_bytes()[:60], bomb_png(), bomb_png(70000, 3)])
        ).decode()
    if choice == 7:
        return "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode()
    if choice == 8 and depth < 3:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 9 and depth < 3:
        return {
            rng.choice(["text", "image", "image_id", "x"]): _fuzz_value(rng, depth + 1)
            for _ in range(rng.randrange(3))
        }
    if choice == 10:
        return rng.choice(["a red circle", "blue", "x" * 199])
    return rng.randrange(-5, 30)


def _text(value) -> str:
    """Query strings and form fields are UTF-8 on the wire: lone surrogates cannot be sent."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


FIELDS = ("text", "q", "image_base64", "image_id", "k", "weights", "dedup", "junk", "")


def _fuzz_request(rng: random.Random):
    kind = rng.randrange(7)
    if kind <= 2:  # JSON object with random fields (NaN/Infinity allowed: not standard JSON)
        body = {rng.choice(FIELDS): _fuzz_value(rng) for _ in range(rng.randrange(1, 5))}
        try:
            raw = json.dumps(body).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError):
            raw = b"{}"
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw) + 1)]
        return "POST", "/search", {"content": raw, "headers": {"content-type": "application/json"}}
    if kind == 3:  # random bytes, random content type
        ctype = rng.choice(
            ["application/json", "text/plain", "image/png", "multipart/form-data; boundary=zz", ""]
        )
        return (
            "POST",
            "/search",
            {"content": rng.randbytes(rng.randrange(0, 3000)), "headers": {"content-type": ctype}},
        )
    if kind == 4:  # query string
        params = {rng.choice(FIELDS): _text(_fuzz_value(rng))[:300] for _ in range(rng.randrange(1, 4))}
        return "GET", "/search", {"params": params}
    if kind == 5:  # multipart
        data = {k: _text(_fuzz_value(rng))[:200] for k in rng.sample(FIELDS, rng.randrange(0, 3))}
        payload = rng.choice([png_bytes(), rng.randbytes(200), bomb_png(), b"", png_bytes()[:30]])
        files = {rng.choice(["image", "file", "other"]): ("f.png", payload, "image/png")}
        return "POST", "/search", {"data": data, "files": files}
    token = rng.choice(
        [
            "0",
            "3",
            "21",
            "22",
            "-1",
            "..",
            "%2e%2e%2f",
            "../etc/passwd",
            "1.0",
            "99999999999999",
            "%00",
            "a b",
            "\u00e9",
            "0?size=0",
            "0?size=17",
            "0?size=99999",
        ]
    )
    path = rng.choice(["/image/", "/static/", "/", "/health", "/searchx/"]) + token
    return rng.choice(["GET", "GET", "POST", "PUT", "HEAD"]), path, {}


def _check(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400 and resp.request.method != "HEAD":
        assert isinstance(resp.json().get("error"), str)


@pytest.mark.slow
def test_fuzz_testclient_no_5xx(client):
    rng = random.Random(20240607)
    statuses: dict[int, int] = {}
    for _ in range(1000):
        method, path, kw = _fuzz_request(rng)
        resp = client.request(method, path, **kw)
        _check(resp)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
    assert statuses.get(200, 0) > 20 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 500, statuses
    assert_alive(client)


@pytest.mark.slow
def test_fuzz_real_server_no_5xx(app):
    import httpx

    rng = random.Random(7)
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(2000):
            method, path, kw = _fuzz_request(rng)
            _check(c.request(method, path, **kw))
        r = c.post("/search", json={"text": "a red square", "k": 3})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
