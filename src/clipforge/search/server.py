"""HTTP search service: ``create_app(searcher)`` returns a FastAPI app; ``serve`` runs it with uvicorn.

(This module imports FastAPI at the top: FastAPI resolves the endpoints' annotations from module
globals. Only ``clipforge serve`` and tests import it, so ``import clipforge`` stays light.)

Endpoints: ``GET|POST /search``, ``GET|POST /caption`` (when the index's model is a CoCa: a
caption for an indexed ``image_id`` or an uploaded image), ``GET /image/{id}`` (thumbnail),
``GET /health``, ``GET /`` and ``GET /static/*`` (the web page: package data under
``search/static``, served by Starlette's StaticFiles). The routes are module-level functions
over one :class:`ServerState` (on ``app.state.server``, reached through the :func:`get_state`
dependency); request fields are validated by the pydantic models in :mod:`.http_fields`. Every
bad input is answered with a 4xx and a JSON body ``{"error": "..."}``; a 5xx means a bug. Three things keep a hostile or careless client from hurting other users:

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
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from clipforge.search.http_fields import (
    ApiError,
    CaptionFields,
    RequestParser,
    SearchFields,
    first_line,
    parse_int,
)
from clipforge.search.searcher import Query, QueryError, Searcher, open_image

log = logging.getLogger(__name__)

QUERY_FIELDS = tuple(SearchFields.model_fields)
CAPTION_FIELDS = tuple(CaptionFields.model_fields)
CAPTION_CACHE_SIZE = 4096  # captions of indexed images: they never change for a loaded index


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


# --------------------------------------------------------------------------- app state
@dataclass
class ServerState:
    """Everything the routes share, built once by :func:`create_app` and kept on ``app.state``."""

    searcher: Searcher
    parser: RequestParser
    batcher: MicroBatcher
    captioner: MicroBatcher
    static: StaticFiles
    max_k: int
    max_upload_bytes: int
    thumbnail: Callable[[int, int], bytes]
    captions: dict[int, str] = field(default_factory=dict)  # indexed images' captions never change


def get_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the app that received ``request``."""
    return request.app.state.server


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _request_fields(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """A request's fields and uploaded image: a GET's query string, a POST's multipart form (the
    only way to upload) or JSON object."""
    if request.method == "GET":
        return dict(request.query_params), None
    ctype = _content_type(request)
    if ctype == "multipart/form-data":
        return await _read_form(request)
    return await _json_fields(request, ctype), None


# --------------------------------------------------------------------------- routes
router = APIRouter()


async def _answer(state: ServerState, query: Query) -> JSONResponse:
    t0 = time.perf_counter()
    results = await state.batcher.submit(query)
    took = (time.perf_counter() - t0) * 1000
    return JSONResponse(
        {
            "results": [_public(r) for r in results],
            "k": query.k,
            "model": state.searcher.architecture,
            "took_ms": round(took, 2),
        }
    )


@router.api_route("/search", methods=["GET", "POST"])
async def search(request: Request, state: ServerState = Depends(get_state)) -> JSONResponse:
    fields, image = await _request_fields(request)
    return await _answer(state, await state.parser.parse(fields, image))


async def _caption_answer(state: ServerState, item: tuple[str, Any]) -> JSONResponse:
    from starlette.concurrency import run_in_threadpool

    searcher = state.searcher
    if searcher.model is None:
        await run_in_threadpool(searcher.ensure_model)
    if not searcher.can_caption:
        raise ApiError(404, f"this index's model ({searcher.architecture}) cannot caption: it is not a CoCa")
    t0 = time.perf_counter()
    kind, value = item
    text = state.captions.get(value) if kind == "id" else None
    if text is None:
        text = await state.captioner.submit(item)
        if kind == "id" and len(state.captions) < CAPTION_CACHE_SIZE:
            state.captions[value] = text
    body = {
        "caption": text,
        "model": searcher.architecture,
        "took_ms": round((time.perf_counter() - t0) * 1000, 2),
    }
    return JSONResponse({**({"id": value} if kind == "id" else {}), **body})


@router.api_route("/caption", methods=["GET", "POST"])
async def caption(request: Request, state: ServerState = Depends(get_state)) -> JSONResponse:
    fields, image = await _request_fields(request)
    return await _caption_answer(state, await state.parser.parse_caption(fields, image))


@router.get("/image/{image_id}")
def image(image_id: str, size: str = "256", state: ServerState = Depends(get_state)) -> Response:
    # The id is only ever an index into the metadata table, never part of a filesystem path.
    if not re.fullmatch(r"[0-9]{1,12}", image_id):
        raise ApiError(400, "image id must be a non-negative integer")
    i = int(image_id)
    if i >= state.searcher.count:
        raise ApiError(404, f"no image with id {i} (index holds {state.searcher.count})")
    try:
        px = parse_int(size, "size")
    except ValueError as e:
        raise ApiError(422, str(e)) from None
    if not 16 <= px <= 1024:
        raise ApiError(422, "size must be between 16 and 1024")
    data = state.thumbnail(i, px)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.get("/health")
def health(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    searcher, m = state.searcher, state.searcher.manifest
    return {
        "status": "ok",
        "count": searcher.count,
        "kind": m["kind"],
        "dim": m["dim"],
        "model": searcher.architecture,  # the real architecture, e.g. "custom (from my-arch.json)"
        "model_config": searcher.model_config,
        "expected_recall_at_10": m.get("expected_recall_at_10"),
        "max_k": state.max_k,
        "max_upload_bytes": state.max_upload_bytes,
        "batches": state.batcher.batches,
        "batched_queries": state.batcher.items,
        "can_caption": searcher.can_caption,
    }


@router.get("/")
async def page(request: Request, state: ServerState = Depends(get_state)) -> Response:
    """The web page (``static/index.html``), from the same StaticFiles that serves ``/static/*``."""
    return await state.static.get_response("index.html", request.scope)


# --------------------------------------------------------------------------- errors
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


async def _query_error(_: Request, e: QueryError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=422)


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": f"invalid request: {e.errors()[:3]}"}, status_code=422)


async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.exception("internal error while serving a request")
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)


#: Every error, ours or the framework's, reaches the client as ``{"error": "..."}``.
EXCEPTION_HANDLERS: dict[Any, Callable] = {
    ApiError: _api_error,
    QueryError: _query_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    Exception: _internal,
}


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
    wait_s = batch_wait_ms / 1000
    state = ServerState(
        searcher=searcher,
        parser=RequestParser(
            searcher,
            max_k=max_k,
            max_text_chars=max_text_chars,
            max_upload_bytes=max_upload_bytes,
            max_pixels=max_pixels,
        ),
        batcher=MicroBatcher(_run_batch(searcher), max_batch=max_batch, wait_s=wait_s),
        captioner=MicroBatcher(_run_captions(searcher, max_pixels), max_batch=8, wait_s=wait_s),
        static=StaticFiles(packages=[("clipforge.search", "static")]),
        max_k=max_k,
        max_upload_bytes=max_upload_bytes,
        thumbnail=functools.lru_cache(maxsize=2048)(functools.partial(_thumbnail, searcher, max_pixels)),
    )
    app = FastAPI(
        title="clipforge search",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.server = state
    app.state.searcher, app.state.batcher = searcher, state.batcher
    app.include_router(router)
    app.mount("/static", state.static, name="static")
    # Multipart adds headers and boundaries; base64 adds a third: allow both on top of the image.
    app.add_middleware(
        BodyLimitMiddleware, limit=max_upload_bytes * 4 // 3 + 64 * 1024, timeout_s=body_timeout_s
    )
    return app


def _thumbnail(searcher: Searcher, max_pixels: int, i: int, px: int) -> bytes:
    """Indexed image ``i`` as a JPEG at most ``px`` on a side (cached per app by create_app)."""
    from clipforge.data.images import BadImageError, load_image

    try:
        img = load_image(searcher.image_bytes(i), max_pixels=max_pixels)
    except (OSError, BadImageError) as e:
        raise ApiError(404, f"image {i} is no longer readable: {first_line(e)}") from None
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


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
                raise ApiError(404, f"image {value} is no longer readable: {first_line(e)}") from None
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
