"""Small file helpers shared by embed / index / searcher: atomic writes and metadata tables.

Why a module of its own: every artefact of the search pipeline (embedding shards, metadata,
faiss index, manifests) must be written so that a crash leaves either the old file or the new one,
never half of one, and the metadata table has one reader/writer pair so parquet vs CSV is decided
in exactly one place (parquet when pyarrow is installed, CSV otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import DataError

#: Columns stored as integers; everything else in a metadata table is text.
INT_COLUMNS = frozenset({"id", "width", "height", "tar_offset", "tar_size", "source_index"})


def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Any:
    """The shared atomic writer (temp file beside ``path``, fsync, ``os.replace``)."""
    from clipforge.checkpoints.io import atomic_write

    return atomic_write(path, mode)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def table_suffix() -> str:
    return ".parquet" if _has_pyarrow() else ".csv"


def _clean_text(value: Any) -> str:
    # NUL bytes cannot round-trip through CSV; they carry no meaning in a caption anyway.
    return "" if value is None else str(value).replace("\x00", "")


def write_table(path: str | os.PathLike, columns: dict[str, Sequence[Any]]) -> Path:
    """Write ``columns`` (equal-length lists) atomically; the suffix of ``path`` picks the format."""
    path = Path(path)
    names = list(columns)
    n = len(columns[names[0]]) if names else 0
    for name in names:
        if len(columns[name]) != n:
            raise ValueError(f"column {name!r} has {len(columns[name])} rows, expected {n}")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = {
            k: [int(v) for v in col] if k in INT_COLUMNS else [_clean_text(v) for v in col]
            for k, col in columns.items()
        }
        buf = io.BytesIO()
        pq.write_table(pa.table(data), buf)
        atomic_write_bytes(path, buf.getvalue())
        return path
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(names)
    for row in zip(*(columns[k] for k in names)):
        writer.writerow([int(v) if k in INT_COLUMNS else _clean_text(v) for k, v in zip(names, row)])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", errors="surrogatepass"))
    return path


def read_table(path: str | os.PathLike) -> dict[str, list[Any]]:
    """Read a table written by :func:`write_table` into column lists (ints restored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: metadata table not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: list(v) for k, v in pq.read_table(path).to_pydict().items()}
    csv.field_size_limit(1 << 24)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            names = next(reader)
        except StopIteration as e:
            raise DataError(f"{path}: empty metadata table (no header)") from e
        cols: dict[str, list[Any]] = {k: [] for k in names}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(names):
                raise DataError(f"{path}:{lineno}: expected {len(names)} fields, got {len(row)}")
            for k, v in zip(names, row):
                cols[k].append(int(v) if k in INT_COLUMNS else v)
    return cols


def find_table(directory: Path, stem: str) -> Path:
    """The ``stem.parquet`` or ``stem.csv`` in ``directory`` (whichever exists)."""
    for suffix in (".parquet", ".csv"):
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    raise DataError(f"{directory}: no {stem}.parquet or {stem}.csv found")
