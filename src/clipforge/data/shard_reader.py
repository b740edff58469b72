"""Reading webdataset tar shards: an exactly resumable stream, the tar index, the manifest counts.

Why our own reader. ``webdataset``'s pipeline (shard shuffle -> split -> sample shuffle
buffer) keeps its state inside iterator closures running in worker processes, so a resumed run
can only approximate where it was. Exact resume needs the whole stream to be a pure function of
a few integers. Here the stream of *sample references* ``(shard, sample-in-shard)`` for one
(epoch, rank, worker) is computed from the seed with integer arithmetic only; pixels are read
(by offset, random access into the tar) only for samples that are actually emitted. Resuming
at position ``p`` replays the reference stream - shuffle buffer included - without touching
any data, then continues. Positions travel with every batch (``ResumableLoader`` strips them),
so skipped corrupt samples never shift the count.

Splitting (no duplicates): the epoch's shard order is shuffled identically on every process.
Whole rounds of shards are dealt to the ``world_size * num_workers`` slots; the leftover
shards (fewer than one per slot) are split sample by sample. With ``equalize`` (default) every
slot then stops at the smallest slot's count, so all ranks run the same number of steps (DDP
would otherwise hang) - with equal-size shards (what ``write_shards`` makes) almost nothing is
dropped.

Shard layout: ``<key>.jpg|png|webp`` + ``<key>.txt`` (+ ``<key>.json`` with ``captions`` when
there are several, from which one is sampled per epoch). ``write_shards``
(:mod:`clipforge.data.shards`) also writes ``manifest.json`` (per-shard sample counts) so
readers need not index every tar up front.

Why a module apart from the writer: the writer accepts any dataset spec, so it sits above
:func:`~clipforge.data.build.build_dataset`, while the reader sits below it (``build_dataset``
and the loader construct :class:`ShardDataset`); one module holding both was an import cycle.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    BadImageError,
    SkipCounter,
    load_image,
)
from clipforge.data.pairs import transform_pair
from clipforge.data.rng import mix_seed, seed_all
from clipforge.data.sources import expand_paths
from clipforge.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # webdataset member names: no dot
MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# URLs and indexing
# ---------------------------------------------------------------------------------------------
def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Local shard paths from a brace pattern (``shard-{000000..000009}.tar``), a glob, a folder
    of ``.tar`` files or a list; every path must exist (the error names the first missing)."""
    if isinstance(spec, str | os.PathLike):
        spec = [spec]
    urls: list[str] = []
    for item in spec:
        s = os.fspath(item)
        if s.startswith(("http://", "https://", "pipe:", "s3://", "gs://")):
            raise DataError(f"{s}: only local shard files are supported by the resumable reader")
        if os.path.isdir(s):
            found = sorted(glob.glob(os.path.join(s, "*.tar")))
            if not found:
                raise DataError(f"{s}: folder contains no .tar shards")
            urls += found
            continue
        urls += expand_paths(s)
    if not urls:
        raise DataError(f"no shards match {spec!r}")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise DataError(f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing)")
    return urls


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first '.' of the basename."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


@dataclass
class ShardIndex:
    """Where each sample's members live inside one tar: [(key, {ext: (offset, size)})]."""

    path: str
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = field(default_factory=list)

    @classmethod
    def build(cls, path: str) -> ShardIndex:
        index = cls(path)
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:  # seekable mode: headers only, data is skipped
                    if not m.isfile():
                        continue
                    key, ext = _split_name(m.name)
                    if not index.samples or index.samples[-1][0] != key:
                        index.samples.append((key, {}))
                    index.samples[-1][1][ext] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated tar still yields the samples before the damage.
            logger.warning("%s: damaged tar after %d sample(s): %s", path, len(index.samples), e)
        return index


def read_manifest_counts(urls: Sequence[str]) -> list[int] | None:
    """Per-shard sample counts from ``manifest.json`` files next to the shards, if complete."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(u)) for u in urls}):
        mpath = os.path.join(folder, MANIFEST)
        if os.path.isfile(mpath):
            try:
                with open(mpath, encoding="utf-8") as f:
                    for s in json.load(f)["shards"]:
                        counts[os.path.join(folder, s["name"])] = int(s["count"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("%s: ignoring unreadable manifest (%s)", mpath, e)
    try:
        return [counts[os.path.abspath(u)] for u in urls]
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _shuffle_buffer(refs: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Deterministic buffered shuffle: fill, then emit a random slot and refill it."""
    buf: list[Any] = []
    for ref in refs:
        if len(buf) < size:
            buf.append(ref)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = ref
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """Iterable over local webdataset shards with exact, cheap resume (see the module doc).

    Items are ``(transform(image), tokenizer(caption))``; with ``with_positions`` (set by
    ``ResumableLoader``) a third element ``LongTensor([slot, position])`` is added, and with
    ``seed_samples`` (also set by it) each transform runs under a seed from
    ``(seed, epoch, slot, position)`` so augmentations survive a resume or worker restart.
    ``resampled=True`` draws shards with replacement forever; give ``samples_per_epoch``
    (global) to cut it into epochs. ``rank``/``world_size`` default to torch.distributed's.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        shuffle: bool = True,
        buffer_size: int = 1000,
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        equalize: bool = True,
        skip_counter: SkipCounter | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int | None = DEFAULT_MIN_SIDE,
    ) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        self.source = str(urls) if isinstance(urls, str) else f"{len(self.urls)} shards"
        self.transform, self.tokenizer = transform, tokenizer
        self.shuffle, self.buffer_size, self.seed = shuffle, max(1, buffer_size), seed
        self.resampled, self.samples_per_epoch, self.equalize = resampled, samples_per_epoch, equalize
        if resampled and not samples_per_epoch:
            logger.info("%s: resampled without samples_per_epoch: the stream never ends", self.source)
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        self.rank, self.world_size = int(rank), int(world_size)
        self.max_pixels, self.min_side = max_pixels, min_side
        self.skipped = skip_counter or SkipCounter(self.source)
        self.counts = read_manifest_counts(self.urls)
        if self.counts is None:
            logger.info("%s: no manifest.json; indexing %d shard(s)", self.source, len(self.urls))
            self.counts = [len(ShardIndex.build(u).samples) for u in self.urls]
        if not sum(self.counts):
            raise DataError(f"{self.source}: the shards contain no samples")
        self.epoch = 0
        self.with_positions = False
        self.seed_samples = False
        self.num_workers_hint = 1  # set by ResumableLoader so __len__ knows the slots
        self.start_positions: dict[int, int] = {}  # slot -> first stream position to emit
        self.slot_rotation = 0  # worker i plays slot (i + rotation) % W (resume mid-epoch)
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._files: OrderedDict[int, Any] = OrderedDict()

    # -- the deterministic reference stream --------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.start_positions = {}
        self.epoch = int(epoch)

    # -- position, for trainers that iterate the dataset in the main process ----------------
    def state_dict(self) -> dict[str, Any]:
        """Epoch + next stream position per worker slot (only slot 0 without DataLoader workers).

        Exact when the trainer iterates in the main process (``num_workers=0``): the position
        advances as each sample is handed out. With workers use ``ResumableLoader``, which
        tracks the positions carried by the batches instead.
        """
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "positions": {str(k): v for k, v in self.start_positions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["world_size"]) != (self.seed, self.world_size):
            raise DataError(
                f"shard stream state is for seed={state['seed']} world_size={state['world_size']}, "
                f"this run has seed={self.seed} world_size={self.world_size}"
            )
        self.epoch = int(state["epoch"])
        self.start_positions = {int(k): int(v) for k, v in state["positions"].items()}

    def _slots(self, num_workers: int) -> int:
        return self.world_size * max(1, num_workers)

    def _assignment(self, total_slots: int) -> tuple[list[list[int]], list[int]]:
        """(whole shards per slot, leftover shards split sample by sample) for this epoch.

        Only full-size shards are dealt whole; short shards and the last incomplete round go
        to the sample-level split, so slot counts differ by at most one sample.
        """
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(order)
        biggest = max(self.counts)
        full = [s for s in order if self.counts[s] == biggest]
        whole = (len(full) // total_slots) * total_slots
        per_slot = [full[s:whole:total_slots] for s in range(total_slots)]
        return per_slot, full[whole:] + [s for s in order if self.counts[s] != biggest]

    def _slot_count(self, slot: int, total_slots: int, per_slot: list[list[int]], rest: list[int]) -> int:
        n_rest = sum(self.counts[s] for s in rest)
        return sum(self.counts[s] for s in per_slot[slot]) + len(range(slot, n_rest, total_slots))

    def slot_length(self, total_slots: int, slot: int = 0) -> int:
        """How many samples slot ``slot`` emits this epoch (before skipping corrupt ones)."""
        if self.resampled:
            return (self.samples_per_epoch or 0) // total_slots
        per_slot, rest = self._assignment(total_slots)
        n = self._slot_count(slot, total_slots, per_slot, rest)
        if self.equalize and total_slots > 1:
            n = min(self._slot_count(s, total_slots, per_slot, rest) for s in range(total_slots))
        if self.samples_per_epoch:
            n = min(n, self.samples_per_epoch // total_slots)
        return n

    def _refs(self, slot: int, total_slots: int) -> Iterator[tuple[int, int]]:
        if self.resampled:
            rng = random.Random(f"{self.seed}:{self.epoch}:{slot}:resample")
            while True:
                s = rng.randrange(len(self.urls))
                for j in range(self.counts[s]):
                    yield s, j
        per_slot, rest = self._assignment(total_slots)
        for s in per_slot[slot]:
            for j in range(self.counts[s]):
                yield s, j
        k = 0
        for s in rest:
            for j in range(self.counts[s]):
                if k % total_slots == slot:
                    yield s, j
                k += 1

    def ref_stream(self, slot: int, total_slots: int) -> Iterator[tuple[int, int]]:
        """The epoch's references for one slot, in emission order (pure integer arithmetic)."""
        infinite = self.resampled and not self.samples_per_epoch
        limit = math.inf if infinite else self.slot_length(total_slots, slot)
        refs = self._refs(slot, total_slots)
        if self.shuffle:
            refs = _shuffle_buffer(
                refs, self.buffer_size, random.Random(f"{self.seed}:{self.epoch}:{slot}:buf")
            )
        for n, ref in enumerate(refs):
            if n >= limit:
                return
            yield ref

    # -- decoding -------------------------------------------------------------------------
    def _index(self, s: int) -> ShardIndex:
        if s not in self._indexes:
            self._indexes[s] = ShardIndex.build(self.urls[s])
            if len(self._indexes) > 16:
                self._indexes.popitem(last=False)
        self._indexes.move_to_end(s)
        return self._indexes[s]

    def _read(self, s: int, offset: int, size: int) -> bytes:
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.urls[s], "rb")  # noqa: SIM115 - cached handle
            if len(self._files) > 8:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(s)
        f.seek(offset)
        return f.read(size)

    def load_sample(self, s: int, j: int) -> tuple[Any, str]:
        """(RGB image, caption) of sample ``j`` of shard ``s``; raises BadImageError."""
        index = self._index(s)
        where = f"{self.urls[s]}#{j}"
        if j >= len(index.samples):
            raise BadImageError("truncated", where, "sample missing from damaged shard")
        key, members = index.samples[j]
        where = f"{self.urls[s]}:{key}"
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise BadImageError("missing_field", where, f"no image member ({'/'.join(IMAGE_EXTS)})")
        captions: list[str] = []
        if "json" in members:
            try:
                meta = json.loads(self._read(s, *members["json"]).decode("utf-8", errors="replace"))
                caps = meta.get("captions") if isinstance(meta, dict) else None
                if isinstance(caps, list):
                    captions = [str(c).replace("\x00", "").strip() for c in caps]
            except ValueError:
                pass
        if not any(captions) and "txt" in members:
            captions = [
                self._read(s, *members["txt"]).decode("utf-8", errors="replace").replace("\x00", "").strip()
            ]
        captions = [c for c in captions if c]
        if not captions:
            raise BadImageError(
                "empty_caption" if "txt" in members else "missing_caption", where, "no caption"
            )
        try:
            image = load_image(
                self._read(s, *members[ext]),
                max_pixels=self.max_pixels,
                min_side=self.min_side,
                keep_mode=True,
            )
        except BadImageError as e:
            raise BadImageError(e.reason, f"{where}.{ext}", e.detail) from None
        # drop EXIF/ICC payloads, keep a palette's transparency (the transform's alpha rule needs it)
        kept = {k: image.info[k] for k in ("transparency",) if k in image.info}
        image.info.clear()
        image.info.update(kept)
        if len(captions) == 1:
            return image, captions[0]
        return image, random.Random(f"{self.seed}:{self.epoch}:{key}").choice(captions)

    def _apply(self, image: Any, caption: str) -> tuple[Any, Any]:
        return transform_pair(image, caption, self.transform, self.tokenizer)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        local = (worker + self.slot_rotation) % num_workers
        total = self._slots(num_workers)
        slot = self.rank * num_workers + local
        start = self.start_positions.get(local, 0)
        for pos, (s, j) in enumerate(self.ref_stream(slot, total)):
            if pos < start:
                continue
            try:
                image, caption = self.load_sample(s, j)
                if self.seed_samples:
                    seed_all(mix_seed(self.seed, self.epoch, slot, pos))
                item = self._apply(image, caption)
            except BadImageError as e:
                self.skipped.add(e.reason, str(e))
                continue
            finally:
                self.start_positions[local] = pos + 1  # consumed, whether emitted or skipped
            yield (*item, torch.tensor([local, pos])) if self.with_positions else item
        self.start_positions.pop(local, None)  # epoch done: a new iter() starts it over

    def __len__(self) -> int:
        """Samples per epoch over *all* ranks and workers (before corrupt ones are skipped);
        divide by ``batch_size * world_size`` for steps per epoch."""
        total = self._slots(self.num_workers_hint)
        return sum(self.slot_length(total, s) for s in range(total))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_indexes"], state["_files"] = OrderedDict(), OrderedDict()  # per-process caches
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def batches_per_worker(n_samples: int, batch_size: int, drop_last: bool) -> int:
    return n_samples // batch_size if drop_last else math.ceil(n_samples / batch_size)
