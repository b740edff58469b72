"""Parquet tables: image paths, or the image bytes inside (Hugging Face datasets, img2dataset).

Why a module of its own: a parquet file with embedded images can be many GB, so nothing here
reads a whole file. Listing reads only the caption and path columns, one row group at a time;
:class:`EmbeddedImages` later reads image bytes one row group at a time and keeps the last few
row groups per process, so a sampler that visits rows group by group (see
:func:`locality_blocks`) decodes each group once per epoch.

Image columns recognised: a string column (paths, resolved like any table's), a binary column
(the encoded image), or a struct with a ``bytes`` field (Hugging Face's ``Image`` feature,
``{bytes, path}``).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipforge.data.table_rows import Table, TableOptions, add_row, pick_columns
from clipforge.errors import DataError

CACHED_ROW_GROUPS = 2


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            "reading parquet tables needs pyarrow: pip install 'clipforge[train]' (or pyarrow)"
        ) from None
    return pq


def _image_column_kind(pf: Any, name: str, where: str) -> tuple[str, str | None]:
    """("path", None), ("bytes", None) for a binary column, or ("bytes", "<name>.bytes")."""
    import pyarrow as pa

    typ = pf.schema_arrow.field(name).type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "path", None
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return "bytes", None
    if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        return "bytes", f"{name}.bytes"
    raise DataError(
        f"{where}: image column {name!r} has type {typ}; expected paths, bytes or {{bytes, path}}"
    )


class ParquetFileImages:
    """The encoded images of one parquet file, read a row group at a time and cached."""

    def __init__(self, path: str, column: str) -> None:
        self.path, self.column = path, column
        self._file: Any = None
        self._starts: list[int] = []
        self._cache: OrderedDict[int, list[Any]] = OrderedDict()

    def _open(self) -> Any:
        if self._file is None:
            self._file = _pyarrow().ParquetFile(self.path)
            meta, start = self._file.metadata, 0
            self._starts = []
            for g in range(meta.num_row_groups):
                self._starts.append(start)
                start += meta.row_group(g).num_rows
        return self._file

    def row_group_of(self, row: int) -> int:
        import bisect

        self._open()
        return bisect.bisect_right(self._starts, row) - 1

    def read(self, row: int) -> bytes | None:
        pf = self._open()
        g = self.row_group_of(row)
        values = self._cache.get(g)
        if values is None:
            col = pf.read_row_group(g, columns=[self.column]).column(0)
            if "." in self.column:  # struct field: the table holds the struct, take .bytes
                col = col.combine_chunks().field("bytes")
            values = col.to_pylist()
            self._cache[g] = values
            while len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return values[row - self._starts[g]]

    def __getstate__(self) -> dict[str, Any]:  # workers reopen the file; caches stay per process
        return {"path": self.path, "column": self.column}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["column"])


class EmbeddedImages:
    """Image bytes of a table's rows that live inside parquet files: row ``i`` -> bytes."""

    def __init__(self) -> None:
        self.files: list[ParquetFileImages] = []
        self.part = array("i")
        self.file_row = array("q")

    def add(self, file_index: int, file_row: int) -> None:
        self.part.append(file_index)
        self.file_row.append(file_row)

    def read(self, i: int) -> bytes | None:
        return self.files[self.part[i]].read(self.file_row[i])

    def where(self, i: int) -> str:
        return f"{self.files[self.part[i]].path}:row {self.file_row[i]}"


def image_bytes_column(path: str) -> str:
    """The column (or ``column.bytes`` field) holding encoded images in a parquet file."""
    pf = _pyarrow().ParquetFile(path)
    for name in pf.schema_arrow.names:
        try:
            kind, sub = _image_column_kind(pf, name, path)
        except DataError:
            continue
        if kind == "bytes":
            return sub or name
    raise DataError(f"{path}: no column holds image bytes (binary or {{bytes, path}})")


def read_parquet_table(
    path: Path, options: TableOptions, base: str, issue: Any, captions: bool = True
) -> Table:
    """List a parquet table's rows (see :func:`clipforge.data.tables.read_table`)."""
    pq = _pyarrow()
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    image_key, caption_keys = pick_columns(
        columns, options.image_key, options.caption_key, str(path), captions, options.extra_keys
    )
    kind, sub = _image_column_kind(pf, image_key, str(path))
    table = Table(str(path), image_key=image_key, caption_keys=caption_keys, require_captions=captions)
    wanted = list(
        dict.fromkeys(caption_keys + ([image_key] if kind == "path" else []) + list(options.extra_keys))
    )
    if kind == "bytes":
        table.embedded = EmbeddedImages()
        table.embedded.files.append(ParquetFileImages(str(path), sub or image_key))
    row = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=4096):
        cols = batch.to_pydict()
        for j in range(batch.num_rows):
            where = f"{path}:row {row}"
            raw = cols[image_key][j] if kind == "path" else None
            kept = add_row(
                table,
                where,
                raw,
                [cols[k][j] for k in caption_keys],
                base,
                options,
                issue,
                embedded=kind == "bytes",
                extra={k: cols[k][j] for k in options.extra_keys},
            )
            if kept and table.embedded is not None:
                table.embedded.add(0, row)
            row += 1
    return table


def merge_tables(tables: Sequence[Table]) -> Table:
    """One :class:`~clipforge.data.table_rows.Table` from several (a folder or pattern of shards)."""
    if len(tables) == 1:
        return tables[0]
    out = Table(", ".join(t.source for t in tables[:3]) + (" ..." if len(tables) > 3 else ""))
    out.image_key, out.caption_keys = tables[0].image_key, tables[0].caption_keys
    if any(t.embedded is not None for t in tables):
        out.embedded = EmbeddedImages()
    for t in tables:
        out.rows += t.rows
        out.images += t.images
        out.captions += t.captions
        for key, values in t.extras.items():
            out.extras.setdefault(key, []).extend(values)
        if out.embedded is None:
            continue
        if t.embedded is None:
            raise DataError(
                f"{t.source}: holds image paths while other tables embed the images; read them apart"
            )
        offset = len(out.embedded.files)
        out.embedded.files += t.embedded.files
        out.embedded.part.extend(p + offset for p in t.embedded.part)
        out.embedded.file_row.extend(t.embedded.file_row)
    return out


def locality_blocks(embedded: EmbeddedImages) -> list[int]:
    """Lengths of runs of consecutive rows that share one parquet row group.

    A sampler that shuffles these blocks, then rows within each block, visits every row once
    per epoch while decoding each row group once (instead of once per row).
    """
    blocks: list[int] = []
    last: tuple[int, int] | None = None
    for i in range(len(embedded.part)):
        f = embedded.files[embedded.part[i]]
        key = (embedded.part[i], f.row_group_of(embedded.file_row[i]))
        if key == last:
            blocks[-1] += 1
        else:
            blocks.append(1)
            last = key
    return blocks
