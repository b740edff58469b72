"""What a search-service request may contain, as pydantic models, and how it becomes a :class:`Query`.

A request's fields arrive three ways (a JSON body, multipart form fields, a query string), so the
models accept the loose forms all three produce (``"5"`` for 5, ``"true"`` for True, weights as a
JSON string) and nothing else: an unknown field, a wrong type or an out-of-range value is a 422
whose message names the field. What depends on the loaded index or needs decoding (an
``image_id`` past the end: 404; base64 and image bytes: 400/413) is checked afterwards, by
:class:`RequestParser`, so every bad input still gets the status it always had.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError, ValidationInfo

from clipforge.search.searcher import Query, Searcher, open_image


class ApiError(Exception):
    """An input problem: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


# --------------------------------------------------------------------------- field validators
def parse_int(value: Any, name: str) -> int:
    """An integer from JSON (no booleans, no fractions) or from a form / query-string field."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,12}\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e12:
        return int(value)
    raise ValueError(f"{name} must be an integer, got {_short(value)}")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _loose_bool(value: Any, info: ValidationInfo) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{info.field_name} must be true or false, got {_short(value)}")


def _optional_int(value: Any, info: ValidationInfo) -> int | None:
    return None if value is None else parse_int(value, info.field_name)


def _k(value: Any, info: ValidationInfo) -> int:
    k = parse_int(value, "k")
    max_k = (info.context or {}).get("max_k")
    if max_k is not None and not 1 <= k <= max_k:
        raise ValueError(f"k must be between 1 and {max_k}, got {k}")
    return k


def _text(value: Any, info: ValidationInfo) -> str | None:
    """Strip, refuse empty / lone-surrogate / over-long text (``max_text_chars`` from the context)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{info.field_name} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{info.field_name} is not valid Unicode (lone surrogate)") from None
    value = value.replace("\x00", " ").strip()
    if not value:
        raise ValueError(f"{info.field_name} is empty")
    limit = (info.context or {}).get("max_text_chars")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{info.field_name} is {len(value)} characters; the limit is {limit}")
    return value


def _base64_text(value: Any, info: ValidationInfo) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{info.field_name} must be a string, got {type(value).__name__}")


def _weight(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(float(v)) < 1e6:
        raise ValueError(f"weight {name} must be a finite number below 1e6, got {_short(v)}")
    return float(v)


def _weights(value: Any) -> list[float] | dict[str, float] | None:
    """A list of up to 3 numbers or a ``{part: number}`` object, possibly as a JSON string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("weights must be JSON: a list of numbers or a {part: number} object") from None
    if isinstance(value, dict):
        return {str(k): _weight(v, str(k)) for k, v in value.items()}
    if isinstance(value, list) and len(value) <= 3:
        return [_weight(v, str(i)) for i, v in enumerate(value)]
    raise ValueError("weights must be a list of up to 3 numbers or a {part: number} object")


Text = Annotated[str | None, PlainValidator(_text)]
Base64Text = Annotated[str | None, PlainValidator(_base64_text)]
OptionalInt = Annotated[int | None, PlainValidator(_optional_int)]
K = Annotated[int, PlainValidator(_k)]
Weights = Annotated[Any, PlainValidator(_weights)]
LooseBool = Annotated[bool, PlainValidator(_loose_bool)]


# --------------------------------------------------------------------------- request models
class _Fields(BaseModel):
    """Shared behaviour: unknown fields are refused, and a failure becomes one ApiError(422)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    accepted_note: ClassVar[str] = ""

    @classmethod
    def parse(cls, fields: dict[str, Any], **context: Any) -> Any:
        """Validate ``fields`` (``context``: the app's limits, e.g. ``max_k``) or raise ApiError(422)."""
        # Unknown names first and all together, before pydantic sees them: a key pydantic cannot
        # represent (a lone surrogate) would otherwise hide which field was wrong.
        unknown = sorted(set(fields) - set(cls.model_fields))
        if unknown:
            accepted = ", ".join(cls.model_fields)
            raise ApiError(422, f"unknown field(s) {unknown}; accepted: {accepted}{cls.accepted_note}")
        try:
            return cls.model_validate(fields, context=context)
        except ValidationError as e:
            raise ApiError(422, cls._message(e)) from None

    @staticmethod
    def _message(e: ValidationError) -> str:
        """The first problem, naming its field."""
        errors = e.errors(include_url=False, include_input=False, include_context=False)
        where = ".".join(str(part) for part in errors[0]["loc"]) or "body"
        msg = errors[0]["msg"].removeprefix("Value error, ")
        return msg if msg.startswith(where) else f"{where}: {msg}"


class SearchFields(_Fields):
    """``/search``: text (or its alias q), an image (base64 here, or an upload) or an indexed image id."""

    text: Text = None
    q: Text = None
    image_base64: Base64Text = None
    image_id: OptionalInt = None
    k: K = 10
    weights: Weights = None
    dedup: LooseBool = False


class CaptionFields(_Fields):
    """``/caption``: exactly one image, by indexed id, as base64 or as an upload."""

    accepted_note: ClassVar[str] = " or an upload"
    image_id: OptionalInt = None
    image_base64: Base64Text = None


# --------------------------------------------------------------------------- fields -> query
class RequestParser:
    """Validated fields (plus an uploaded image) -> a :class:`Query`, or an ApiError."""

    def __init__(
        self, searcher: Searcher, *, max_k: int, max_text_chars: int, max_upload_bytes: int, max_pixels: int
    ):
        self.searcher, self.max_k, self.max_text_chars = searcher, max_k, max_text_chars
        self.max_upload_bytes, self.max_pixels = max_upload_bytes, max_pixels

    async def parse(self, fields: dict[str, Any], image_bytes: bytes | None = None) -> Query:
        f = SearchFields.parse(fields, max_k=self.max_k, max_text_chars=self.max_text_chars)
        if {"text", "q"} <= f.model_fields_set:
            raise ApiError(422, "give either text or q, not both")
        image_bytes = self._one_image(f.image_base64, image_bytes)
        image = await self._image(image_bytes) if image_bytes is not None else None
        if f.image_id is not None:
            self._check_id(f.image_id)
        text = f.text if f.text is not None else f.q
        if text is None and image is None and f.image_id is None:
            raise ApiError(422, "give text, an image (upload or image_base64) or image_id")
        return Query(text=text, image=image, image_id=f.image_id, weights=f.weights, k=f.k, dedup=f.dedup)

    async def parse_caption(
        self, fields: dict[str, Any], image_bytes: bytes | None = None
    ) -> tuple[str, Any]:
        """``("id", image_id)`` or ``("image", PIL image)``: exactly one image to caption."""
        f = CaptionFields.parse(fields)
        image_bytes = self._one_image(f.image_base64, image_bytes)
        if (f.image_id is None) == (image_bytes is None):
            raise ApiError(422, "give exactly one of image_id, image_base64 or an uploaded image")
        if image_bytes is not None:
            return "image", await self._image(image_bytes)
        self._check_id(f.image_id)
        return "id", f.image_id

    def _check_id(self, image_id: int) -> None:
        if not 0 <= image_id < self.searcher.count:
            raise ApiError(404, f"image_id {image_id} out of range [0, {self.searcher.count})")

    def _one_image(self, image_base64: str | None, upload: bytes | None) -> bytes | None:
        """The upload or the decoded base64 image (never both)."""
        if image_base64 is None:
            return upload
        if upload is not None:
            raise ApiError(422, "give either an uploaded image or image_base64, not both")
        return self._b64(image_base64)

    def _b64(self, data: str) -> bytes:
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
        """Decode in the thread pool (never on the event loop); bombs are refused from the header."""
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
                status, f"not a usable image ({reason or 'undecodable'}): {first_line(e)}"
            ) from None
