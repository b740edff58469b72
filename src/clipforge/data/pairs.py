"""Image-caption pairs from a table (CSV/TSV/JSONL/JSON) or an image folder with ``.txt`` sidecars.

Tables are read once, up front, and validated at the boundary: a missing column, a missing
table or a malformed JSONL line is an error that names the file, line and column, because no
amount of training fixes it. Row-level problems that are normal in scraped data are repaired
or skipped *and counted*, never fatal:

===================  ==========================================================================
non-UTF-8 bytes      decoded with U+FFFD replacement; lines counted (``non_utf8``)
NUL characters       removed; lines counted (``nul``)
empty caption        row skipped and counted (``empty_caption``)
empty image field    row skipped and counted (``missing_field``)
path escaping root   row skipped and counted (``path_escape``); ``root=`` widens the boundary
duplicated rows      **kept** (repeats are a legitimate way to up-weight data) and counted
                     (``duplicate_rows``); ``dedupe=True`` drops exact repeats instead
bad image            found when the item is read: counted by reason and replaced (see below)
===================  ==========================================================================

Batch size semantics: with ``on_bad="replace"`` (default) a bad image is replaced by another
row chosen deterministically from (seed, index, attempt), so every batch keeps its size: DDP
feature gathering needs equal batch sizes on every rank. ``on_bad="none"`` returns ``None``
instead; pair it with :func:`collate_pairs`, which drops ``None`` items (batches shrink).

Several captions per image (several caption columns, a list-valued JSON field, or several
lines in a sidecar file): one is sampled per item from a RNG seeded by (seed, epoch, index), so
workers and resumed runs see the same choice. ``all_captions`` exposes all of them for
multi-caption retrieval evaluation.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from clipforge.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    BadImageError,
    SkipCounter,
    iter_image_files,
    load_image,
)
from clipforge.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "filepath", "image_path", "img", "path", "file", "filename", "url")
CAPTION_KEYS = ("caption", "captions", "text", "title", "txt", "sentence", "sentences")
TABLE_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
}
MAX_EXAMPLES = 20


def _clean(text: str) -> str:
    return text.replace("\x00", "").strip()


def _as_captions(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v if isinstance(v, str) else str(v) for v in value if v is not None]
    return [str(value)]


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


def transform_pair(
    image: Any, caption: str, transform: Callable[[Any], Any] | None, tokenizer: Callable[[str], Any] | None
) -> tuple[Any, Any]:
    """Apply the image transform and tokenizer; a tokenizer's ``[1, L]`` row becomes ``[L]`` so
    the default collate stacks items into ``[B, L]``."""
    if transform is not None:
        image = transform(image)
    tokens: Any = caption
    if tokenizer is not None:
        tokens = tokenizer(caption)
        if getattr(tokens, "ndim", 0) == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
    return image, tokens


class _PairsBase:
    """Shared item logic: image loading with skip/replace, caption sampling, transforms."""

    source: str
    image_paths: list[str]
    all_captions: list[list[str]]
    rows: list[str]  # where each item came from ("file:line"), for messages

    def _init_common(
        self,
        transform: Callable | None,
        tokenizer: Callable | None,
        seed: int,
        on_bad: str,
        max_retries: int,
        skip_counter: SkipCounter | None,
        max_pixels: int | None,
        min_side: int | None,
    ) -> None:
        if on_bad not in ("replace", "none"):
            raise DataError(f"on_bad must be 'replace' or 'none', got {on_bad!r}")
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.on_bad = on_bad
        self.max_retries = max_retries
        self.max_pixels = max_pixels
        self.min_side = min_side
        self.skipped = skip_counter or SkipCounter(self.source)
        self.stats: Counter[str] = Counter()
        self.issues: list[tuple[str, str, str]] = []  # (reason, where, detail), first few per table
        self._known_bad: set[int] = set()

    def _issue(self, reason: str, where: str, detail: str = "", *, skip: bool = True, count: int = 1) -> None:
        self.stats[reason] += count
        if len([i for i in self.issues if i[0] == reason]) < MAX_EXAMPLES:
            self.issues.append((reason, where, detail))
        if skip:
            self.skipped.add(reason, f"{where}: {detail}" if detail else where, log=False)

    def _log_table_summary(self) -> None:
        if self.stats:
            parts = ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items()))
            logger.warning("%s: %d usable item(s); %s", self.source, len(self), parts)
            for reason, where, detail in self.issues[:5]:
                logger.warning("  %s at %s %s", reason, where, detail)
        else:
            logger.info("%s: %d item(s)", self.source, len(self))

    # -- dataset protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.image_paths)

    def set_epoch(self, epoch: int) -> None:
        """Caption sampling (and substitutes) depend on the epoch; the loader sets it."""
        self.epoch = int(epoch)

    def caption_for(self, idx: int) -> str:
        captions = self.all_captions[idx]
        if len(captions) == 1:
            return captions[0]
        return random.Random(f"{self.seed}:{self.epoch}:{idx}").choice(captions)

    def get_image(self, idx: int) -> Any:
        """The decoded RGB image of item ``idx``; raises :class:`BadImageError`."""
        return load_image(self.image_paths[idx], max_pixels=self.max_pixels, min_side=self.min_side)

    def __getitem__(self, idx: int) -> Any:
        n = len(self)
        j = int(idx)
        if j < 0:
            j += n
        for attempt in range(self.max_retries + 1):
            if attempt:
                j = random.Random(f"sub:{self.seed}:{self.epoch}:{idx}:{attempt}").randrange(n)
            if j in self._known_bad:
                if self.on_bad == "none":
                    return None
                continue
            try:
                image = self.get_image(j)
            except BadImageError as e:
                self._known_bad.add(j)  # count each bad item once per process
                self.skipped.add(e.reason, f"{self.rows[j]}: {e}")
                if self.on_bad == "none":
                    return None
                continue
            return self._apply(image, self.caption_for(j))
        raise DataError(
            f"{self.source}: {self.max_retries + 1} bad images in a row near item {idx} "
            f"({self.skipped.summary()}); check that image paths are relative to the table"
        )

    def _apply(self, image: Any, caption: str) -> tuple[Any, Any]:
        return transform_pair(image, caption, self.transform, self.tokenizer)


class PairsDataset(_PairsBase):
    """Map-style dataset over a CSV/TSV/JSONL/JSON table of (image path, caption(s)).

    ``image_key``/``caption_key`` name the columns (auto-detected from common names when
    None). ``caption_key`` may be a list (or comma-separated string) of columns: every
    non-empty one is a candidate caption. Image paths are relative to the table's folder
    (``root`` overrides it); a path resolving outside ``root`` is skipped, never opened.
    Items are ``(transform(image), tokenizer(caption))``; see the module doc for skipping.
    """

    def __init__(
        self,
        table: str | os.PathLike,
        *,
        image_key: str | None = None,
        caption_key: str | Sequence[str] | None = None,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        root: str | os.PathLike | None = None,
        seed: int = 0,
        dedupe: bool = False,
        on_bad: str = "replace",
        max_retries: int = 20,
        skip_counter: SkipCounter | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int | None = DEFAULT_MIN_SIDE,
        strict: bool = True,
    ) -> None:
        self.table = Path(table)
        self.source = str(self.table)
        self._init_common(transform, tokenizer, seed, on_bad, max_retries, skip_counter, max_pixels, min_side)
        if not self.table.is_file():
            raise DataError(f"pairs table not found: {self.table}")
        fmt = TABLE_FORMATS.get(self.table.suffix.lower())
        if fmt is None:
            raise DataError(f"{self.table}: unknown table format; use one of {sorted(TABLE_FORMATS)}")
        self.root = os.path.normpath(os.path.abspath(root if root is not None else self.table.parent))
        self.strict = strict
        self._image_key_arg, self._caption_key_arg = image_key, caption_key
        text, bad = decode_text(self.table.read_bytes())
        if bad:
            self._issue(
                "non_utf8", self.source, f"{bad} line(s) with invalid UTF-8 (replaced)", skip=False, count=bad
            )
        if "\x00" in text:
            nul_lines = sum(1 for line in text.split("\n") if "\x00" in line)
            self._issue(
                "nul",
                self.source,
                f"{nul_lines} line(s) with NUL characters (removed)",
                skip=False,
                count=nul_lines,
            )
            text = text.replace("\x00", "")
        records = self._parse_csv(text, fmt) if fmt in ("csv", "tsv") else self._parse_json(text, fmt)
        self.image_paths, self.all_captions, self.rows = [], [], []
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for where, record in records:
            self._add_record(where, record, dedupe, seen)
        self._log_table_summary()

    # -- parsing ------------------------------------------------------------------------
    def _resolve_keys(self, columns: list[str], where: str) -> None:
        def pick(given: Any, candidates: Sequence[str], what: str) -> list[str]:
            if given is None:
                for c in candidates:
                    if c in columns:
                        return [c]
                raise DataError(
                    f"{where}: no {what} column found (looked for {', '.join(candidates)}); "
                    f"columns present: {columns}; pass {what}_key=..."
                )
            keys = [k.strip() for k in given.split(",")] if isinstance(given, str) else list(given)
            for k in keys:
                if k not in columns:
                    raise DataError(f"{where}: {what} column {k!r} not found; columns present: {columns}")
            return keys

        self.image_key = pick(self._image_key_arg, IMAGE_KEYS, "image")[0]
        self.caption_keys = pick(self._caption_key_arg, CAPTION_KEYS, "caption")

    def _parse_csv(self, text: str, fmt: str) -> list[tuple[str, dict[str, Any]]]:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        columns = [c.strip() if c else c for c in (reader.fieldnames or [])]
        if not columns:
            raise DataError(f"{self.table}: empty table (no header row)")
        reader.fieldnames = columns
        self._resolve_keys(columns, f"{self.table}:1")
        out = []
        for record in reader:
            where = f"{self.table}:{reader.line_num}"
            if None in record:  # more fields than the header
                self._issue(
                    "malformed_row",
                    where,
                    f"{len(columns) + len(record[None])} fields, header has {len(columns)}",
                )
                continue
            out.append((where, record))
        return out

    def _parse_json(self, text: str, fmt: str) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if fmt == "json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.table}:{e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(data, list):
                raise DataError(f"{self.table}: a .json table must be a list of objects")
            out = [(f"{self.table}:item {i}", r) for i, r in enumerate(data)]
        else:
            for lineno, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                where = f"{self.table}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    if self.strict:
                        raise DataError(
                            f"{where}: malformed JSONL line ({e.msg} at column {e.colno})"
                        ) from None
                    self._issue("malformed_row", where, f"invalid JSON: {e.msg}")
                    continue
                out.append((where, record))
        bad = [(w, r) for w, r in out if not isinstance(r, dict)]
        for where, _ in bad:
            if self.strict:
                raise DataError(f"{where}: expected a JSON object per line")
            self._issue("malformed_row", where, "not a JSON object")
        out = [(w, r) for w, r in out if isinstance(r, dict)]
        if not out:
            raise DataError(f"{self.table}: no records")
        self._resolve_keys(list(out[0][1].keys()), out[0][0])
        return out

    def _add_record(self, where: str, record: dict[str, Any], dedupe: bool, seen: set) -> None:
        raw_path = record.get(self.image_key)
        if not isinstance(raw_path, str) or not raw_path.strip():
            self._issue("missing_field", where, f"no value in column {self.image_key!r}")
            return
        captions = [_clean(c) for k in self.caption_keys for c in _as_captions(record.get(k))]
        captions = [c for c in captions if c]
        if not captions:
            self._issue("empty_caption", where, raw_path.strip())
            return
        path = self._resolve_path(raw_path.strip())
        if path is None:
            self._issue("path_escape", where, f"{raw_path.strip()!r} resolves outside {self.root}")
            return
        key = (path, tuple(captions))
        if key in seen:
            self.stats["duplicate_rows"] += 1
            if dedupe:
                return
        seen.add(key)
        self.image_paths.append(path)
        self.all_captions.append(captions)
        self.rows.append(where)

    def _resolve_path(self, rel: str) -> str | None:
        """Join to root and refuse anything that lands outside it ('../', absolute paths)."""
        full = os.path.normpath(os.path.join(self.root, rel))
        if full != self.root and not full.startswith(self.root.rstrip(os.sep) + os.sep):
            return None
        return full


class FolderPairsDataset(_PairsBase):
    """Images under ``root`` (recursive) with a sidecar caption file: ``a/b.jpg`` + ``a/b.txt``.

    Every non-empty line of the sidecar is one candidate caption (multi-caption). Images
    without a sidecar are skipped and counted (``missing_caption``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        caption_ext: str = ".txt",
        seed: int = 0,
        on_bad: str = "replace",
        max_retries: int = 20,
        skip_counter: SkipCounter | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int | None = DEFAULT_MIN_SIDE,
    ) -> None:
        self.root = Path(root)
        self.source = str(self.root)
        self._init_common(transform, tokenizer, seed, on_bad, max_retries, skip_counter, max_pixels, min_side)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.image_paths, self.all_captions, self.rows = [], [], []
        for img in iter_image_files(self.root):
            side = img.with_suffix(caption_ext)
            if not side.is_file():
                self._issue("missing_caption", str(img), f"no {side.name}")
                continue
            text, bad = decode_text(side.read_bytes())
            if bad:
                self._issue("non_utf8", str(side), "invalid UTF-8 (replaced)", skip=False)
            captions = [c for c in (_clean(line) for line in text.splitlines()) if c]
            if not captions:
                self._issue("empty_caption", str(side))
                continue
            self.image_paths.append(str(img))
            self.all_captions.append(captions)
            self.rows.append(str(img))
        if not self.image_paths and not self.stats:
            raise DataError(f"{self.root}: no images with {caption_ext} captions found")
        self._log_table_summary()


def collate_pairs(batch: list[Any]) -> Any:
    """``default_collate`` after dropping ``None`` (bad items with ``on_bad="none"``)."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    return default_collate(kept)
