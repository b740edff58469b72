"""The one table reader: CSV/TSV, JSON, JSON lines and parquet, as users and other tools write them.

Every command that reads a table of images and captions (``train``, ``eval``, ``embed``,
``doctor``, ``shards make``) comes through :func:`read_table`, so a file accepted by one means the
same thing to all of them:

- **Format** from the extension (:data:`TABLE_FORMATS`). A ``.json`` file is a JSON array of
  objects or, as many tools write them, one object per line; the first character decides.
- **Separator**: explicit (``separator="\\t"``, open_clip's ``--csv-separator``) or sniffed from
  the header line, so open_clip's tab-separated ``.csv`` files read with no flag at all.
- **Columns**: one rule (:func:`pick_columns`): the given ``image_key``/``caption_key``
  (open_clip's ``--csv-img-key``/``--csv-caption-key``), else the first known name present.
- **Paths**: absolute, ``~`` and relative ones all work; relative paths are taken from the
  table's folder or ``data_root``. Confining paths to that root is opt-in (``confine=True``).
- **Parquet**: paths, or the image bytes inside (Hugging Face datasets' ``{bytes, path}`` struct
  or a plain binary column). Only the caption and path columns are read up front, one row group
  at a time; image bytes are read later, a row group at a time (:class:`~clipforge.data.parquet.EmbeddedImages`).

Row problems normal in scraped data are counted, not fatal (see :mod:`clipforge.data.pairs`).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipforge.data.table_rows import (
    CAPTION_KEYS,
    IMAGE_KEYS,
    Issue,
    Table,
    TableOptions,
    add_row,
    as_captions,
    check_columns,
    clean_caption,
    pick_columns,
    resolve_path,
)
from clipforge.errors import DataError

# The row model lives in table_rows (parquet fills it too); its names stay importable from here.
__all__ = [
    "CAPTION_KEYS",
    "IMAGE_KEYS",
    "SEPARATORS",
    "TABLE_FORMATS",
    "Issue",
    "Table",
    "TableOptions",
    "add_row",
    "as_captions",
    "check_columns",
    "clean_caption",
    "decode_text",
    "parse_separator",
    "pick_columns",
    "read_table",
    "resolve_path",
    "sniff_separator",
    "table_format",
]

TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
SEPARATORS = ("\t", ",", ";", "|")
_SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


def table_format(path: str | os.PathLike) -> str | None:
    return TABLE_FORMATS.get(Path(path).suffix.lower())


def parse_separator(value: str | None) -> str | None:
    """``"\\t"``, ``"tab"``, ``","`` ... -> the one character; None stays None (sniff)."""
    if value is None or value == "":
        return None
    sep = _SEPARATOR_NAMES.get(value.lower(), value)
    if len(sep) != 1:
        raise DataError(f"--csv-separator {value!r}: give one character (or 'tab', '\\t')")
    return sep


def sniff_separator(header: str, fmt: str) -> str:
    """The separator the header line uses most (tab first on ties); ``.tsv`` is always tab.

    Why the header: it holds only column names, so the separator is the only punctuation in
    it, unlike data rows whose captions are full of commas.
    """
    if fmt == "tsv":
        return "\t"
    counts = [(header.count(s), -i, s) for i, s in enumerate(SEPARATORS)]
    best = max(counts)
    return best[2] if best[0] > 0 else ","


def decode_text(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8 (BOM tolerated); bad bytes become U+FFFD. Returns (text, lines with bad bytes)."""
    try:
        return raw.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        bad = 0
        for line in raw.split(b"\n"):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
        text = raw.decode("utf-8", errors="replace")
        return text.removeprefix("\ufeff"), bad


# --------------------------------------------------------------------------- text formats
def _read_text(path: Path, issue: Issue) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read table ({e.strerror or e})") from None
    text, bad = decode_text(raw)
    if bad:
        issue("non_utf8", str(path), f"{bad} line(s) with invalid UTF-8 (replaced)", skip=False, count=bad)
    if "\x00" in text:
        nul = sum(1 for line in text.split("\n") if "\x00" in line)
        issue("nul", str(path), f"{nul} line(s) with NUL characters (removed)", skip=False, count=nul)
        text = text.replace("\x00", "")
    return text


def _csv_records(
    path: Path, text: str, sep: str | None, fmt: str, issue: Issue
) -> tuple[list[str], Iterator]:
    header = text.split("\n", 1)[0]
    delimiter = sep or sniff_separator(header, fmt)
    csv.field_size_limit(1 << 24)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns = [c.strip() if c else c for c in (reader.fieldnames or [])]
    if not columns:
        raise DataError(f"{path}: empty table (no header row)")
    reader.fieldnames = columns

    def records() -> Iterator[tuple[str, dict[str, Any]]]:
        for record in reader:
            where = f"{path}:{reader.line_num}"
            if None in record:  # more fields than the header
                n = len(columns) + len(record[None])
                issue(
                    "malformed_row", where, f"{n} fields, header has {len(columns)} (separator {delimiter!r})"
                )
                continue
            yield where, record

    return columns, records()


def _json_records(path: Path, text: str, strict: bool, issue: Issue) -> tuple[list[str], Iterator]:
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        pairs = [(f"{path}:item {i}", r) for i, r in enumerate(data)]
    else:
        pairs = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                pairs.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                if strict:
                    raise DataError(f"{where}: malformed JSONL line ({e.msg} at column {e.colno})") from None
                issue("malformed_row", where, f"invalid JSON: {e.msg}")
    good = []
    for where, record in pairs:
        if isinstance(record, dict):
            good.append((where, record))
        elif strict:
            raise DataError(f"{where}: expected a JSON object")
        else:
            issue("malformed_row", where, "not a JSON object")
    if not good:
        raise DataError(f"{path}: no records")
    return list(good[0][1].keys()), iter(good)


# --------------------------------------------------------------------------- the reader
def read_table(
    path: str | os.PathLike,
    options: TableOptions | None = None,
    *,
    strict: bool = True,
    issue: Issue | None = None,
    captions: bool = True,
) -> Table:
    """Read ``path`` into a :class:`Table` of usable rows; row problems go to ``issue``.

    ``issue(reason, where, detail, skip=True, count=1)`` receives every repaired or skipped
    row (reasons: ``non_utf8``, ``nul``, ``malformed_row``, ``missing_field``, ``empty_caption``,
    ``path_escape``). ``captions=False`` keeps rows without a caption (embedding).
    Table-level problems (missing file, unknown format, missing column) raise
    :class:`DataError` naming the file and line.
    """
    options = options or TableOptions()
    issue = issue or (lambda *a, **k: None)
    path = Path(path).expanduser()
    fmt = table_format(path)
    if fmt is None:
        raise DataError(f"{path}: unknown table format; use one of {sorted(TABLE_FORMATS)}")
    if not path.is_file():
        raise DataError(f"pairs table not found: {path}")
    base = os.path.normpath(os.path.abspath(os.path.expanduser(options.data_root or path.parent)))
    if fmt == "parquet":
        from clipforge.data.parquet import read_parquet_table

        return read_parquet_table(path, options, base, issue, captions)
    text = _read_text(path, issue)
    if fmt in ("csv", "tsv"):
        columns, records = _csv_records(path, text, parse_separator(options.separator), fmt, issue)
    else:
        columns, records = _json_records(path, text, strict, issue)
    image_key, caption_keys = pick_columns(
        columns, options.image_key, options.caption_key, f"{path}:1", captions, options.extra_keys
    )
    table = Table(str(path), image_key=image_key, caption_keys=caption_keys, require_captions=captions)
    for where, record in records:
        extra = {k: record.get(k) for k in options.extra_keys}
        add_row(
            table, where, record.get(image_key), [record.get(k) for k in caption_keys], base, options, issue,
            extra=extra,
        )  # fmt: skip
    return table
