"""What every table format shares: the :class:`Table` of usable rows, :class:`TableOptions`, the
column rule and the per-row checks.

Why a module of its own: the CSV/JSON reader (:mod:`clipforge.data.tables`) dispatches parquet
files to :mod:`clipforge.data.parquet`, and both fill the same :class:`Table` through the same
:func:`add_row`; with these in ``tables`` the two modules imported each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clipforge.errors import DataError

if TYPE_CHECKING:
    from clipforge.data.parquet import EmbeddedImages

IMAGE_KEYS = ("image", "filepath", "image_path", "img", "jpg", "png", "path", "file", "filename", "url")
CAPTION_KEYS = ("caption", "captions", "text", "title", "txt", "sentence", "sentences", "label")
Issue = Callable[..., None]  # issue(reason, where, detail, skip=True, count=1)


@dataclass(frozen=True)
class TableOptions:
    """How to read a table; the same fields on every command (``--csv-separator`` ...)."""

    separator: str | None = None
    image_key: str | None = None
    caption_key: str | Sequence[str] | None = None
    data_root: str | None = None
    confine: bool = False
    extra_keys: tuple[str, ...] = ()  # more columns to keep per row (group ids, hard negatives)


@dataclass
class Table:
    """A table's usable rows: where each came from, its image (path or embedded) and captions."""

    source: str
    rows: list[str] = field(default_factory=list)  # "file:line" per kept row
    images: list[str] = field(default_factory=list)  # resolved path, or "" when embedded
    captions: list[list[str]] = field(default_factory=list)
    embedded: EmbeddedImages | None = None  # set when the image bytes live inside the table
    image_key: str = ""
    caption_keys: list[str] = field(default_factory=list)
    require_captions: bool = True
    extras: dict[str, list[list[str]]] = field(default_factory=dict)  # extra column -> values per kept row


def check_columns(columns: Sequence[str], keys: Sequence[str], where: str) -> None:
    """Extra columns (``--group-key``, ``--hard-negative-key``) must exist, like the named ones."""
    for k in keys:
        if k not in columns:
            raise DataError(f"{where}: column {k!r} not found; columns present: {list(columns)}")


def pick_columns(
    columns: Sequence[str],
    image_key: str | None,
    caption_key: Any,
    where: str,
    captions: bool = True,
    extra_keys: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """The image column and caption column(s): given names (checked) or the first known name.

    ``caption_key`` may be a list or a comma-separated string: every non-empty value of those
    columns is a candidate caption (several captions per image). With ``captions=False`` a
    table without a caption column is fine (embedding images only).
    """
    columns = list(columns)

    def pick(given: Any, candidates: Sequence[str], what: str, flag: str) -> list[str]:
        if given is None:
            lowered = {c.lower(): c for c in columns}
            for c in candidates:
                if c in lowered:
                    return [lowered[c]]
            raise DataError(
                f"{where}: no {what} column found (looked for {', '.join(candidates)}); "
                f"columns present: {columns}; pass {flag}"
            )
        keys = [k.strip() for k in given.split(",")] if isinstance(given, str) else list(given)
        for k in keys:
            if k not in columns:
                raise DataError(f"{where}: {what} column {k!r} not found; columns present: {columns}")
        return keys

    image = pick(image_key, IMAGE_KEYS, "image", "--csv-img-key / image_key=")[0]
    check_columns(columns, extra_keys, where)
    if not captions and caption_key is None and not any(c.lower() in CAPTION_KEYS for c in columns):
        return image, []
    return image, pick(caption_key, CAPTION_KEYS, "caption", "--csv-caption-key / caption_key=")


def resolve_path(raw: str, base: str, confine: bool) -> str | None:
    """Absolute and ``~`` paths as given; relative ones joined to ``base``. With ``confine``,
    a path landing outside ``base`` (``../``, absolute elsewhere) gives None: never opened."""
    path = os.path.expanduser(raw)
    full = os.path.normpath(path if os.path.isabs(path) else os.path.join(base, path))
    if confine and full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        return None
    return full


def as_captions(value: Any) -> list[str]:
    """A cell as candidate captions: a string, a list of strings (JSON/parquet), or a scalar."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v if isinstance(v, str) else str(v) for v in value if v is not None]
    return [str(value)]


def clean_caption(text: str) -> str:
    return text.replace("\x00", "").strip()


def add_row(
    table: Table,
    where: str,
    raw_path: Any,
    caption_cells: list[Any],
    base: str,
    options: TableOptions,
    issue: Issue,
    *,
    embedded: bool = False,
    extra: dict[str, Any] | None = None,
) -> bool:
    """Validate one row and append it; returns whether it was kept.

    ``extra`` holds the row's cells of ``options.extra_keys``; each is kept as a list of strings
    (a list-valued JSON/parquet cell gives several, an empty cell none).
    """
    captions = [c for c in (clean_caption(x) for cell in caption_cells for x in as_captions(cell)) if c]
    if not embedded and (not isinstance(raw_path, str) or not raw_path.strip()):
        issue("missing_field", where, f"no value in column {table.image_key!r}")
        return False
    label = raw_path.strip() if isinstance(raw_path, str) else where
    if not captions and table.require_captions:
        issue("empty_caption", where, label)
        return False
    path = ""
    if not embedded:
        resolved = resolve_path(label, base, options.confine)
        if resolved is None:
            issue("path_escape", where, f"{label!r} resolves outside {base} (confine is on)")
            return False
        path = resolved
    table.rows.append(where)
    table.images.append(path)
    table.captions.append(captions)
    for key in options.extra_keys:
        cell = (extra or {}).get(key)
        table.extras.setdefault(key, []).append(
            [v for v in (clean_caption(x) for x in as_captions(cell)) if v]
        )
    return True
