"""Image-caption pairs from a table (CSV/TSV/JSON/JSONL/parquet, see :mod:`clipforge.data.tables`) or an image folder with ``.txt`` sidecars.

Tables are read once, up front, and validated at the boundary: a missing column, a missing
table or a malformed JSONL line is an error that names the file, line and column, because no
amount of training fixes it. Row-level problems that are normal in scraped data are repaired
or skipped *and counted*, never fatal:

===================  ==========================================================================
non-UTF-8 bytes      decoded with U+FFFD replacement; lines counted (``non_utf8``)
NUL characters       removed; lines counted (``nul``)
empty caption        row skipped and counted (``empty_caption``)
empty image field    row skipped and counted (``missing_field``)
path outside root    only with ``confine=True``: skipped and counted (``path_escape``)
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
from clipforge.data.tables import TableOptions, clean_caption, decode_text, read_table
from clipforge.errors import DataError

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 20


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
        self.image_cache: Any = None  # clipforge.data.cache.ImageCache, see use_image_cache

    def use_image_cache(self, cache: Any, transform: Callable | None) -> None:
        """Read decoded images from ``cache`` and apply ``transform`` (its cached-image form)
        from now on; :func:`clipforge.data.cache.attach_cache` builds both."""
        self.image_cache, self.transform = cache, transform

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

    def caption_for(self, idx: int, choice: int | None = None) -> str:
        """The caption of item ``idx`` this epoch; ``choice`` j picks the j-th of a seeded
        shuffle of its captions (cycling), so k draws of one image get k different captions."""
        captions = self.all_captions[idx]
        if len(captions) == 1:
            return captions[0]
        rng = random.Random(f"{self.seed}:{self.epoch}:{idx}")
        if choice is None:
            return rng.choice(captions)
        return captions[rng.sample(range(len(captions)), len(captions))[choice % len(captions)]]

    def image_bytes(self, idx: int) -> bytes:
        """The encoded image of item ``idx`` as stored (shards keep it byte for byte)."""
        try:
            return Path(self.image_paths[idx]).read_bytes()
        except OSError as e:
            raise BadImageError("missing", self.rows[idx], e.strerror or str(e)) from None

    def get_image(self, idx: int) -> Any:
        """The decoded image of item ``idx``, in its own mode (the transform converts it, where the
        model's preprocessing convention does); raises :class:`BadImageError`."""
        return load_image(
            self.image_paths[idx], max_pixels=self.max_pixels, min_side=self.min_side, keep_mode=True
        )

    def __getitem__(self, idx: int) -> Any:
        found = self.fetch(idx)
        return None if found is None else self._apply(found[1], found[2])

    def fetch(self, idx: int, choice: int | None = None) -> tuple[int, Any, str] | None:
        """``(row used, decoded image, caption)`` for item ``idx``, replacing a bad image by
        another row (see the module doc) or returning None with ``on_bad="none"``."""
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
                image = self.get_image(j) if self.image_cache is None else self.image_cache.get(j)
            except BadImageError as e:
                self._known_bad.add(j)  # count each bad item once per process
                self.skipped.add(e.reason, f"{self.rows[j]}: {e}")
                if self.on_bad == "none":
                    return None
                continue
            return j, image, self.caption_for(j, choice)
        raise DataError(
            f"{self.source}: {self.max_retries + 1} bad images in a row near item {idx} "
            f"({self.skipped.summary()}); check that image paths are relative to the table"
        )

    def _apply(self, image: Any, caption: str) -> tuple[Any, Any]:
        return transform_pair(image, caption, self.transform, self.tokenizer)


class PairsDataset(_PairsBase):
    """Map-style dataset over a table (CSV/TSV/JSON/JSONL/parquet) of (image, caption(s)).

    ``table`` is one file or a list of files read as one (parquet shards). Reading follows
    :func:`clipforge.data.tables.read_table`: separator sniffed unless given, columns named by
    ``image_key``/``caption_key`` or auto-detected, paths absolute, ``~`` or relative to the
    table's folder (``data_root`` overrides it; ``confine=True`` refuses paths outside it).
    Items are ``(transform(image), tokenizer(caption))``; see the module doc for skipping.
    """

    def __init__(
        self,
        table: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        image_key: str | None = None,
        caption_key: str | Sequence[str] | None = None,
        separator: str | None = None,
        data_root: str | os.PathLike | None = None,
        confine: bool = False,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        seed: int = 0,
        dedupe: bool = False,
        on_bad: str = "replace",
        max_retries: int = 20,
        skip_counter: SkipCounter | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int | None = DEFAULT_MIN_SIDE,
        strict: bool = True,
        extra_keys: Sequence[str] = (),
    ) -> None:
        from clipforge.data.parquet import merge_tables

        files = [table] if isinstance(table, str | os.PathLike) else list(table)
        self.table = Path(files[0])
        self.source = str(self.table) if len(files) == 1 else f"{self.table.parent} ({len(files)} tables)"
        self._init_common(transform, tokenizer, seed, on_bad, max_retries, skip_counter, max_pixels, min_side)
        options = TableOptions(
            separator=separator,
            image_key=image_key,
            caption_key=caption_key,
            data_root=os.fspath(data_root) if data_root is not None else None,
            confine=confine,
            extra_keys=tuple(extra_keys),
        )
        parsed = merge_tables([read_table(f, options, strict=strict, issue=self._issue) for f in files])
        self.image_key, self.caption_keys = parsed.image_key, parsed.caption_keys
        self.embedded = parsed.embedded
        self.image_paths, self.all_captions, self.rows = [], [], []
        self.extras: dict[str, list[list[str]]] = {k: [] for k in extra_keys}  # per item, like all_captions
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for i, (where, path, captions) in enumerate(zip(parsed.rows, parsed.images, parsed.captions)):
            key = (path or where, tuple(captions))
            if key in seen:
                self.stats["duplicate_rows"] += 1
                if dedupe:
                    continue
            seen.add(key)
            self.image_paths.append(path if self.embedded is None else str(i))
            self.all_captions.append(captions)
            self.rows.append(where)
            for key in self.extras:
                self.extras[key].append(parsed.extras[key][i])
        self._log_table_summary()
        if not self.image_paths and strict:
            raise DataError(f"{self.source}: no usable rows ({_reasons(self.stats)})")

    def image_bytes(self, idx: int) -> bytes:
        if self.embedded is None:
            return super().image_bytes(idx)
        data = self.embedded.read(int(self.image_paths[idx]))
        if not data:
            raise BadImageError("empty", self.rows[idx], "no image bytes in this row")
        return data

    def get_image(self, idx: int) -> Any:
        """The decoded image of item ``idx`` (from its file, or from the parquet row)."""
        if self.embedded is None:
            return super().get_image(idx)
        return load_image(
            self.image_bytes(idx), max_pixels=self.max_pixels, min_side=self.min_side, keep_mode=True
        )

    def locality_blocks(self) -> list[int] | None:
        """Runs of items sharing a parquet row group (for a cache-friendly shuffle), or None."""
        if self.embedded is None:
            return None
        from clipforge.data.parquet import locality_blocks

        sub = self.embedded
        order = [int(p) for p in self.image_paths]
        if order != list(range(len(sub.part))):  # dedupe dropped rows: view the kept ones
            from clipforge.data.parquet import EmbeddedImages

            view = EmbeddedImages()
            view.files = sub.files
            for i in order:
                view.add(sub.part[i], sub.file_row[i])
            sub = view
        return locality_blocks(sub)


def _reasons(stats: Counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(stats.items())) or "the table has no rows"


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
            captions = [c for c in (clean_caption(line) for line in text.splitlines()) if c]
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
