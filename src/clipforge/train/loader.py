"""Batches for the training loop, with a position that can be saved and restored exactly.

Two kinds of sources:

* **Indexable** datasets (tables, folders, synthetic): the order of epoch ``e`` is a permutation
  seeded by ``(seed, e)``, split between ranks by stride, cut into equal batches. The position is
  just ``(epoch, batch)``, so resuming regenerates the permutation and starts at the next batch.
  Every sample's augmentation RNG is seeded from ``(seed, epoch, index)``, which makes a sample's
  pixels independent of worker count, prefetching and where the run was interrupted.
* **Streams** (webdataset shards): the dataset itself reports and restores its position
  (``state_dict``/``load_state_dict``); the loader batches in the main process so that position is
  the one the trainer has consumed.

Samples may be ``(image, tokens)``, ``(image, caption)`` (tokenised here) or dicts with
``image``/``text`` keys. Broken samples are the dataset's to skip; if ``__getitem__`` raises a
:class:`~clipforge.errors.DataError` anyway we substitute a deterministic neighbour and count it,
so batches keep their size (all ranks must gather equal shapes).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from clipforge.errors import DataError

log = logging.getLogger(__name__)

_MAX_SUBSTITUTES = 16


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (splitmix-style), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (v + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


class SeededItems(Dataset):
    """Wraps an indexable dataset: per-sample RNG seeding and substitution of undecodable samples."""

    def __init__(self, dataset: Any, seed: int, skips: Any | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0
        self.skips = skips

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        for attempt in range(_MAX_SUBSTITUTES):
            idx = (index + attempt * 7919) % n  # a fixed stride: deterministic and spread out
            try:
                with _seeded(_mix(self.seed, self.epoch, idx)):
                    item = self.dataset[idx]
            except DataError as e:
                reason = getattr(e, "reason", "other")
                if self.skips is not None:
                    self.skips.add(reason, str(getattr(e, "source", idx)))
                else:
                    log.warning("skipping sample %d: %s", idx, e)
                continue
            if item is not None:
                return item
        raise DataError(f"{_MAX_SUBSTITUTES} consecutive samples around index {index} could not be loaded")


class _seeded:
    """Run a block under fixed Python/NumPy/torch seeds, then restore the caller's RNG states."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(self.seed)
        np.random.seed(self.seed % (2**32))
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class Collate:
    """Stack images; tokenise captions if the dataset returned strings."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor] | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[Any]) -> tuple[Tensor, Tensor]:
        images, texts = zip(*(_split_item(it) for it in items))
        image_batch = torch.stack(list(images))
        if isinstance(texts[0], Tensor):
            return image_batch, torch.stack(list(texts))
        if self.tokenizer is None:
            raise DataError("the dataset returns caption strings but no tokenizer was given to the loader")
        return image_batch, self.tokenizer(list(texts))


def _split_item(item: Any) -> tuple[Tensor, Any]:
    if isinstance(item, dict):
        image = item.get("image", item.get("images"))
        text = item.get("text", item.get("tokens", item.get("caption")))
        return image, text
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    image = getattr(item, "image", None)
    text = getattr(item, "tokens", getattr(item, "text", getattr(item, "caption", None)))
    if image is None or text is None:
        raise DataError(f"cannot read an (image, text) pair from a sample of type {type(item).__name__}")
    return image, text


class ResumableLoader:
    """Yields ``(images, tokens)`` batches; ``state_dict()`` is the position after the last yield."""

    def __init__(self, dataset: Any, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, tokenizer: Callable | None = None, steps_per_epoch: int | None = None,
                 skips: Any | None = None, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.collate = Collate(tokenizer)
        self.pin_memory = pin_memory
        self.is_stream = isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
        self.epoch = 0
        self.batch = 0  # batches consumed in the current epoch
        if self.is_stream:
            self.items = dataset
            if steps_per_epoch is None:
                if not hasattr(dataset, "__len__"):
                    raise DataError("a streaming dataset without a length needs steps_per_epoch")
                steps_per_epoch = max(1, len(dataset) // (batch_size * world_size))
            if workers > 0 and hasattr(dataset, "state_dict"):
                log.info("streaming data: reading in the main process so its position can be checkpointed")
                self.workers = 0
        else:
            self.items = SeededItems(dataset, seed, skips)
            per_rank = len(dataset) // world_size
            if per_rank < batch_size:
                raise DataError(
                    f"dataset has {len(dataset)} samples: too few for batch size {batch_size} x {world_size} rank(s)"
                )
            steps_per_epoch = steps_per_epoch or per_rank // batch_size
        self.steps_per_epoch = steps_per_epoch
        self._stream_iter: Iterator | None = None
        self.max_worker_restarts = 3
        self.worker_restarts = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    # --- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch}
        if self.is_stream and hasattr(self.dataset, "state_dict"):
            state["stream"] = self.dataset.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])
        if "stream" in state and hasattr(self.dataset, "load_state_dict"):
            self.dataset.load_state_dict(state["stream"])
            self._stream_iter = None

    # --- iteration -------------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The remaining batches of the current epoch (all of them after a fresh start)."""
        if self.batch >= self.steps_per_epoch:
            return
        source = self._stream_batches() if self.is_stream else self._indexed_batches()
        for batch in source:
            self.batch += 1
            yield batch
            if self.batch >= self.steps_per_epoch:
                break

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """This rank's index batches for ``epoch`` (identical on every call)."""
        n = len(self.dataset)
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch) % (2**63))
        order = torch.randperm(n, generator=gen)
        usable = (n // self.world_size) * self.world_size
        mine = order[:usable][self.rank :: self.world_size].tolist()
        steps = min(self.steps_per_epoch, len(mine) // self.batch_size)
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(steps)]

    def _indexed_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from the current position; a crashed worker is replaced by restarting here.

        Restarting is exact because the position counts consumed batches and every sample's
        randomness is a function of (seed, epoch, index), not of which worker drew it.
        """
        self.items.epoch = self.epoch
        order = self.epoch_order(self.epoch)
        restarts = 0
        while self.batch < len(order):
            loader = DataLoader(
                self.items,
                batch_sampler=order[self.batch :],
                num_workers=self.workers,
                collate_fn=self.collate,
                pin_memory=self.pin_memory,
                # A private generator: creating a DataLoader must not consume the global torch RNG,
                # or a resumed run (which creates it mid-epoch) would drift from an uninterrupted one.
                generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch, self.batch) % (2**63)),
            )
            try:
                yield from loader
                return
            except RuntimeError as e:
                if self.workers == 0 or "worker" not in str(e).lower() or restarts >= self.max_worker_restarts:
                    raise
                restarts += 1
                self.worker_restarts += 1
                log.warning("data worker crashed (%s); restarting the loader at epoch %d batch %d (%d/%d)",
                            e, self.epoch, self.batch, restarts, self.max_worker_restarts)

    def _stream_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            if self._stream_iter is None:
                self._stream_iter = iter(self.items)
            items = []
            while len(items) < self.batch_size:
                try:
                    items.append(next(self._stream_iter))
                except StopIteration:
                    self._stream_iter = None
                    if not items:
                        return
                    break
            if len(items) < self.batch_size:
                return  # a short tail would break equal-size gathering; the stream restarts next epoch
            yield self.collate(items)
