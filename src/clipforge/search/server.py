"""HTTP search service: ``create_app(searcher)`` returns a FastAPI app; ``serve`` runs it with uvicorn.

(This module imports FastAPI at the top: FastAPI resolves the endpoints' annotations from module
globals. Only ``clipforge serve`` and tests import it, so ``import clipforge`` stays light.)

Endpoints: ``GET|POST /search``, ``GET|POST /caption`` (when the index's model is a CoCa: a
caption for an indexed ``image_id`` or an uploaded image), ``GET /image/{id}`` (thumbnail),
``GET /health``, ``GET /`` (the web page). Every bad input is answered with a 4xx and a JSON body ``{"error": "..."}``; a 5xx
means a bug. Three things keep a hostile or careless client from hurting other users:

- a body limit enforced while the body streams in (``Content-Length`` is not trusted), plus a
  per-read timeout so a client that trickles bytes gets 408 instead of holding a worker;
- images are decoded by :func:`clipforge.data.images.load_image`, which refuses decompression
  bombs from the header, in the thread pool so decoding never blocks the event loop;
- the model and the index run on one dedicated thread fed by a micro-batcher: requests arriving
  within ``batch_wait_ms`` of each other are encoded in one forward pass and searched in one
  faiss call, so concurrency raises throughput instead of contending for the model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import logging
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipforge.search.searcher import Query, QueryError, Searcher, open_image

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
QUERY_FIELDS = ("text", "q", "image_base64", "image_id", "k", "weights", "dedup")
CAPTION_FIELDS = ("image_id", "image_base64")
CAPTION_CACHE_SIZE = 4096  # captions of indexed images: they never change for a loaded index


class ApiError(Exception):
    """An input problem: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --------------------------------------------------------------------------- micro-batching
class MicroBatcher:
    """Collect queries for up to ``wait_s`` (or ``max_batch`` of them), run them as one batch.

    The first query to arrive schedules the flush; there is no background task, so the batcher
    works in any event loop (uvicorn's, or the per-request loops of a TestClient). ``fn`` runs on
    a single dedicated thread, which also serialises all access to the model and the index.
    """

    def __init__(self, fn: Callable[[list[Any]], list[Any]], *, max_batch: int = 32, wait_s: float = 0.004):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipforge-search")
        self._pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.batches = 0  # statistics for /health and the load test
        self.items = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        pending = self._pending.setdefault(loop, [])
        fut = loop.create_future()
        pending.append((item, fut))
        if len(pending) >= self.max_batch:
            loop.create_task(self._flush(loop))
        elif len(pending) == 1:
            loop.call_later(self.wait_s, lambda: loop.create_task(self._flush(loop)))
        return await fut

    async def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending.get(loop, [])
        batch, pending[:] = pending[: self.max_batch], pending[self.max_batch :]
        if pending:
            loop.call_soon(lambda: loop.create_task(self._flush(loop)))
        if not batch:
            return
        self.batches += 1
        self.items += len(batch)
        items = [b[0] for b in batch]
        try:
            results = await loop.run_in_executor(self.executor, self.fn, items)
        except Exception:  # noqa: BLE001 - isolate the failing query, the others still get answers
            results = []
            for it in items:
                try:
                    results.append((await loop.run_in_executor(self.executor, self.fn, [it]))[0])
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        for (_, fut), res in zip(batch, results):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def close(self) -> None:
        self.executor.shutdown(wait=False)


# --------------------------------------------------------------------------- body limit middleware
class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI: 413 when the body exceeds ``limit`` bytes, 408 when a read stalls ``timeout_s``."""

    def __init__(self, app: Any, limit: int, timeout_s: float):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                if not value.isdigit():
                    return await _send_json(send, 400, "invalid Content-Length header")
                if int(value) > self.limit:
                    return await _send_json(send, 413, f"request body over the {self.limit}-byte limit")
        seen = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal seen
            try:
                msg = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise _BodyTimeout from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLarge, _BodyTimeout) as e:
            if not started:
                if isinstance(e, _BodyTooLarge):
                    await _send_json(send, 413, f"request body over the {self.limit}-byte limit")
                else:
                    await _send_json(send, 408, f"request body not received within {self.timeout_s:g}s")


async def _send_json(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- input parsing
def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ApiError(422, f"{name} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e12:
        return int(value)
    raise ApiError(422, f"{name} must be an integer, got {_short(value)}")


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
        "0",
        "false",
        "no",
        "off",
        "",
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise ApiError(422, f"{name} must be true or false, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RequestParser:
    """Turns JSON / form / query-string fields into a validated :class:`Query` (or an ApiError)."""

    def __init__(
        self, searcher: Searcher, *, max_k: int, max_text_chars: int, max_upload_bytes: int, max_pixels: int
    ):
        self.searcher, self.max_k, self.max_text_chars = searcher, max_k, max_text_chars
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels

    async def parse(self, fields: dict[str, Any], image_bytes: bytes | None = None) -> Query:
        unknown = sorted(set(fields) - set(QUERY_FIELDS))
        if unknown:
            raise ApiError(422, f"unknown field(s) {unknown}; accepted: {', '.join(QUERY_FIELDS)}")
        text = fields.get("text", fields.get("q"))
        if "text" in fields and "q" in fields:
            raise ApiError(422, "give either text or q, not both")
        if text is not None:
            text = self._text(text)
        if fields.get("image_base64") is not None:
            if image_bytes is not None:
                raise ApiError(422, "give either an uploaded image or image_base64, not both")
            image_bytes = self._b64(fields["image_base64"])
        image = await self._image(image_bytes) if image_bytes is not None else None
        image_id = fields.get("image_id")
        if image_id is not None:
            image_id = _as_int(image_id, "image_id")
            if not 0 <= image_id < self.searcher.count:
                raise ApiError(404, f"image_id {image_id} out of range [0, {self.searcher.count})")
        k = _as_int(fields.get("k", 10), "k")
        if not 1 <= k <= self.max_k:
            raise ApiError(422, f"k must be between 1 and {self.max_k}, got {k}")
        weights = self._weights(fields.get("weights"))
        dedup = _as_bool(fields.get("dedup", False), "dedup")
        if text is None and image is None and image_id is None:
            raise ApiError(422, "give text, an image (upload or image_base64) or image_id")
        return Query(text=text, image=image, image_id=image_id, weights=weights, k=k, dedup=dedup)

    async def parse_caption(
        self, fields: dict[str, Any], image_bytes: bytes | None = None
    ) -> tuple[str, Any]:
        """``("id", image_id)`` or ``("image", PIL image)``: exactly one image to caption."""
        unknown = sorted(set(fields) - set(CAPTION_FIELDS))
        if unknown:
            raise ApiError(
                422, f"unknown field(s) {unknown}; accepted: {', '.join(CAPTION_FIELDS)} or an upload"
            )
        if fields.get("image_base64") is not None:
            if image_bytes is not None:
                raise ApiError(422, "give either an uploaded image or image_base64, not both")
            image_bytes = self._b64(fields["image_base64"])
        image_id = fields.get("image_id")
        if (image_id is None) == (image_bytes is None):
            raise ApiError(422, "give exactly one of image_id, image_base64 or an uploaded image")
        if image_bytes is not None:
            return "image", await self._image(image_bytes)
        image_id = _as_int(image_id, "image_id")
        if not 0 <= image_id < self.searcher.count:
            raise ApiError(404, f"image_id {image_id} out of range [0, {self.searcher.count})")
        return "id", image_id

    def _text(self, text: Any) -> str:
        if not isinstance(text, str):
            raise ApiError(422, f"text must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "text is not valid Unicode (lone surrogate)") from None
        text = text.replace("\x00", " ").strip()
        if not text:
            raise ApiError(422, "text is empty")
        if len(text) > self.max_text_chars:
            raise ApiError(422, f"text is {len(text)} characters; the limit is {self.max_text_chars}")
        return text

    def _b64(self, data: Any) -> bytes:
        if not isinstance(data, str):
            raise ApiError(422, f"image_base64 must be a string, got {type(data).__name__}")
        if data.startswith("data:"):
            data = data.partition(",")[2]
        data = re.sub(r"\s+", "", data)
        if len(data) * 3 // 4 > self.max_upload_bytes:
            raise ApiError(413, f"image over the {self.max_upload_bytes}-byte limit")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_base64 is not valid base64") from None
        if not raw:
            raise ApiError(400, "image_base64 is empty")
        return raw

    async def _image(self, data: bytes) -> Any:
        from starlette.concurrency import run_in_threadpool

        from clipforge.data.images import BadImageError

        if len(data) > self.max_upload_bytes:
            raise ApiError(413, f"image over the {self.max_upload_bytes}-byte limit")
        if not data:
            raise ApiError(400, "the uploaded image is empty")
        try:
            return await run_in_threadpool(open_image, data, max_pixels=self.max_pixels)
        except BadImageError as e:
            reason = getattr(e, "reason", "")
            status = 413 if reason == "too_large" else 400
            raise ApiError(
                status, f"not a usable image ({reason or 'undecodable'}): {_first_line(e)}"
            ) from None

    def _weights(self, weights: Any) -> Any:
        if weights is None:
            return None
        if isinstance(weights, str):
            try:
                weights = json.loads(weights)
            except (ValueError, RecursionError):
                raise ApiError(
                    422, "weights must be JSON: a list of numbers or a {part: number} object"
                ) from None
        if isinstance(weights, dict):
            return {str(k): self._weight(v, str(k)) for k, v in weights.items()}
        if isinstance(weights, list) and len(weights) <= 3:
            return [self._weight(v, str(i)) for i, v in enumerate(weights)]
        raise ApiError(422, "weights must be a list of up to 3 numbers or a {part: number} object")

    @staticmethod
    def _weight(v: Any, name: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(float(v)) < 1e6:
            raise ApiError(422, f"weight {name} must be a finite number below 1e6, got {_short(v)}")
        return float(v)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------- the app
def create_app(
    searcher: Searcher,
    *,
    max_upload_bytes: int = 8 * 1024 * 1024,
    max_k: int = 100,
    max_text_chars: int = 1000,
    max_pixels: int = 64_000_000,
    batch_wait_ms: float = 4.0,
    max_batch: int = 32,
    body_timeout_s: float = 30.0,
    warmup: bool = True,
) -> Any:
    """Build the FastAPI app around a loaded :class:`Searcher` (the model is loaded once, here)."""
    recorded = searcher.manifest.get("model") or {}
    if warmup and (
        searcher.model is not None or any(recorded.get(k) for k in ("name", "config", "pretrained"))
    ):
        searcher.ensure_model()
    parser = RequestParser(
        searcher,
        max_k=max_k,
        max_text_chars=max_text_chars,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
    )
    batcher = MicroBatcher(_run_batch(searcher), max_batch=max_batch, wait_s=batch_wait_ms / 1000)
    captioner = MicroBatcher(_run_captions(searcher, max_pixels), max_batch=8, wait_s=batch_wait_ms / 1000)
    captions: dict[int, str] = {}
    app = FastAPI(title="clipforge search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher, app.state.batcher = searcher, batcher
    # Multipart adds headers and boundaries; base64 adds a third: allow both on top of the image.
    app.add_middleware(
        BodyLimitMiddleware, limit=max_upload_bytes * 4 // 3 + 64 * 1024, timeout_s=body_timeout_s
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(QueryError)
    async def _query_error(_: Request, e: QueryError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"invalid request: {e.errors()[:3]}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error while serving a request")
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    async def answer(query: Query) -> JSONResponse:
        t0 = time.perf_counter()
        results = await batcher.submit(query)
        took = (time.perf_counter() - t0) * 1000
        return JSONResponse(
            {
                "results": [_public(r) for r in results],
                "k": query.k,
                "model": searcher.architecture,
                "took_ms": round(took, 2),
            }
        )

    @app.get("/search")
    async def search_get(request: Request) -> JSONResponse:
        fields = dict(request.query_params)
        return await answer(await parser.parse(fields))

    @app.post("/search")
    async def search_post(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            fields, image = await _read_form(request)
            return await answer(await parser.parse(fields, image))
        return await answer(await parser.parse(await _json_fields(request, ctype)))

    async def caption_answer(item: tuple[str, Any]) -> JSONResponse:
        from starlette.concurrency import run_in_threadpool

        if searcher.model is None:
            await run_in_threadpool(searcher.ensure_model)
        if not searcher.can_caption:
            raise ApiError(
                404, f"this index's model ({searcher.architecture}) cannot caption: it is not a CoCa"
            )
        t0 = time.perf_counter()
        kind, value = item
        text = captions.get(value) if kind == "id" else None
        if text is None:
            text = await captioner.submit(item)
            if kind == "id" and len(captions) < CAPTION_CACHE_SIZE:
                captions[value] = text
        body = {
            "caption": text,
            "model": searcher.architecture,
            "took_ms": round((time.perf_counter() - t0) * 1000, 2),
        }
        return JSONResponse({**({"id": value} if kind == "id" else {}), **body})

    @app.get("/caption")
    async def caption_get(request: Request) -> JSONResponse:
        return await caption_answer(await parser.parse_caption(dict(request.query_params)))

    @app.post("/caption")
    async def caption_post(request: Request) -> JSONResponse:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            fields, image = await _read_form(request)
            return await caption_answer(await parser.parse_caption(fields, image))
        return await caption_answer(await parser.parse_caption(await _json_fields(request, ctype)))

    @app.get("/image/{image_id}")
    def image(image_id: str, size: str = "256") -> Response:
        # The id is only ever an index into the metadata table, never part of a filesystem path.
        if not re.fullmatch(r"[0-9]{1,12}", image_id):
            raise ApiError(400, "image id must be a non-negative integer")
        i = int(image_id)
        if i >= searcher.count:
            raise ApiError(404, f"no image with id {i} (index holds {searcher.count})")
        px = _as_int(size, "size")
        if not 16 <= px <= 1024:
            raise ApiError(422, "size must be between 16 and 1024")
        data = _thumbnail(i, px)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @functools.lru_cache(maxsize=2048)
    def _thumbnail(i: int, px: int) -> bytes:
        from clipforge.data.images import BadImageError, load_image

        try:
            img = load_image(searcher.image_bytes(i), max_pixels=max_pixels)
        except (OSError, BadImageError) as e:
            raise ApiError(404, f"image {i} is no longer readable: {_first_line(e)}") from None
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    @app.get("/health")
    def health() -> dict[str, Any]:
        m = searcher.manifest
        return {
            "status": "ok",
            "count": searcher.count,
            "kind": m["kind"],
            "dim": m["dim"],
            "model": searcher.architecture,  # the real architecture, e.g. "custom (from my-arch.json)"
            "model_config": searcher.model_config,
            "expected_recall_at_10": m.get("expected_recall_at_10"),
            "max_k": max_k,
            "max_upload_bytes": max_upload_bytes,
            "batches": batcher.batches,
            "batched_queries": batcher.items,
            "can_caption": searcher.can_caption,
        }

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        if name not in _static_files():
            raise ApiError(404, f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name)

    return app


@functools.lru_cache(maxsize=1)
def _static_files() -> frozenset[str]:
    return frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file())


async def _json_fields(request: Any, ctype: str) -> dict[str, Any]:
    """A POST body's JSON object (415 for other content types, 400/422 for bad JSON)."""
    if ctype not in ("", "application/json", "text/plain"):
        raise ApiError(415, f"unsupported content type {ctype!r}; send JSON or multipart/form-data")
    body = await request.body()
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise ApiError(422, f"request body must be a JSON object, got {type(fields).__name__}")
    return fields


async def _read_form(request: Any) -> tuple[dict[str, Any], bytes | None]:
    form = await request.form(max_files=1, max_fields=len(QUERY_FIELDS) + 1, max_part_size=64 * 1024)
    fields: dict[str, Any] = {}
    image = None
    for key, value in form.multi_items():
        if hasattr(value, "read"):  # an uploaded file
            if key not in ("image", "file"):
                raise ApiError(422, f"upload the image as field 'image', not {key!r}")
            image = await value.read()
        elif key in fields:
            raise ApiError(422, f"field {key!r} given twice")
        else:
            fields[key] = value
    return fields, image


def _public(r: Any) -> dict[str, Any]:
    """What HTTP clients see: no server filesystem paths, just the file name and a thumbnail URL."""
    return {
        "id": r.id,
        "score": r.score,
        "name": os.path.basename(r.path),
        "caption": r.caption,
        "width": r.width,
        "height": r.height,
        "url": f"/image/{r.id}",
    }


def _run_batch(searcher: Searcher) -> Callable[[Sequence[Query]], list[Any]]:
    def run(queries: Sequence[Query]) -> list[Any]:
        return searcher.search_many(list(queries))

    return run


def _run_captions(searcher: Searcher, max_pixels: int) -> Callable[[Sequence[tuple[str, Any]]], list[str]]:
    """Caption a batch of ``("id", i)`` / ``("image", PIL)`` items in one ``generate`` call."""

    def run(items: Sequence[tuple[str, Any]]) -> list[str]:
        from clipforge.data.images import BadImageError

        images = []
        for kind, value in items:
            if kind == "image":
                images.append(value)
                continue
            try:
                images.append(open_image(searcher.image_bytes(value), max_pixels=max_pixels))
            except (OSError, BadImageError) as e:
                raise ApiError(404, f"image {value} is no longer readable: {_first_line(e)}") from None
        return searcher.caption_images(images)

    return run


def serve(
    index_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: Any = "cpu",
    log_level: str = "info",
    image_alpha: str | None = None,
    **app_options: Any,
) -> None:
    """Load the index and the model once, then serve until interrupted (``image_alpha``: see
    ``--image-alpha``; None keeps the model's stored convention)."""
    import uvicorn

    app = create_app(Searcher(index_dir, device=device, image_alpha=image_alpha), **app_options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
