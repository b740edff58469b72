"""``ResumableLoader``: a DataLoader whose position can be saved and restored exactly.

The trainer iterates it like a DataLoader (batches of ``(images, tokens)``), and checkpoints
``loader.state_dict()`` next to the model. ``load_state_dict`` makes the next ``iter()``
continue the interrupted epoch with exactly the batches the uninterrupted run would have seen.

* Map-style datasets (tables, folders, synthetic, mixes): a seeded per-epoch permutation split
  across ranks like ``DistributedSampler``; the state is (epoch, batches consumed) and resuming
  starts the sampler at that offset. Workers do not matter: the sampler runs in this process.
* Shard streams (:class:`~clipforge.data.shard_reader.ShardDataset`): every sample carries its
  (worker slot, stream position); the loader keeps the next position of each slot plus the
  slot of the last batch, so a resumed DataLoader replays each worker's stream from where
  it stopped and starts its round-robin at the right worker. Needs the same ``num_workers``
  and world size as the run that saved the state.

In DDP every rank has its own loader and state; save all ranks' states (``all_gather_object``)
for exact resume when corrupt samples were skipped, since skips differ between ranks.

Exact resume also needs the *random numbers* to be reproducible (:mod:`clipforge.data.rng`):

* Sample ``i`` of epoch ``e`` (map-style) or stream position ``p`` of slot ``s`` (shards) is
  produced under an RNG seeded from ``(seed, e, i)`` / ``(seed, e, s, p)``, so a random
  augmentation is a property of the sample, not of which worker drew it or of a restart.
* Each batch is fetched under its own seed and the caller's RNG states are restored afterwards:
  a DataLoader draws from the global torch RNG when it starts, and a resumed run starts one
  mid-epoch, so without this the model's random layers (patch dropout) would drift.

A crashed worker process is survived by reopening the DataLoader at the current position
(exact for the same reasons), up to ``max_worker_restarts`` times per epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from clipforge.data.rng import isolated_rng, mix_seed, seed_all
from clipforge.data.shard_reader import ShardDataset, batches_per_worker
from clipforge.errors import DataError

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _dist_defaults(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """This rank's indices for one epoch: seeded permutation, equal share per rank, offset start."""

    def __init__(
        self,
        n: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        drop_last: bool,
        start: int = 0,
        blocks: list[int] | None = None,
        group: int = 1,
    ) -> None:
        # ``group`` k: indices come in runs of k consecutive ones (k captions of one image, see
        # clipforge.data.objective_items); runs are permuted and split across ranks whole.
        if group < 1 or n % group:
            raise DataError(f"sampler: {n} indices do not split into groups of {group}")
        self.group = group
        self.n, self.rank, self.world_size, self.blocks = n, rank, world_size, blocks
        self.seed, self.epoch, self.shuffle, self.drop_last, self.start = (
            seed,
            epoch,
            shuffle,
            drop_last,
            start,
        )

    def indices(self) -> list[int]:
        units = self.n // self.group  # images when grouped, else single indices
        if self.shuffle and self.blocks and self.group == 1:
            order = self._block_order()
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(units, generator=g).tolist()
        else:
            order = list(range(units))
        if self.drop_last:
            order = order[: (units // self.world_size) * self.world_size]
        else:  # pad by repeating so every rank gets the same count
            pad = (-units) % self.world_size
            order = order + order[:pad]
        mine = order[self.rank :: self.world_size]
        if self.group == 1:
            return mine
        return [u * self.group + j for u in mine for j in range(self.group)]

    def _block_order(self) -> list[int]:
        """Blocks (parquet row groups) in random order, rows shuffled within each block.

        Why: rows of one row group are decoded together; a global permutation would decode a
        whole row group for every row. Every row is still seen once per epoch.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        starts, pos = [], 0
        for size in self.blocks or []:
            starts.append(pos)
            pos += size
        order: list[int] = []
        for b in torch.randperm(len(starts), generator=g).tolist():
            order += [starts[b] + j for j in torch.randperm(self.blocks[b], generator=g).tolist()]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        units = self.n // self.group
        per_rank = units // self.world_size if self.drop_last else -(-units // self.world_size)
        return max(0, per_rank * self.group - self.start)


def _synchronous_failures(it: Any) -> Any:
    """Make a dead worker show up as an error from ``next(it)``, never at a random place.

    torch registers each iterator's worker pids with a SIGCHLD handler that raises in the main
    thread wherever it happens to be, usually in the middle of a training step, where nothing
    can restart the loader. Unregistered, a dead worker is found by the iterator itself (it
    checks its workers whenever it has waited 5 s for data) and raised from ``next``, which
    :meth:`ResumableLoader.__iter__` catches to reopen the loader at the same position.
    """
    if getattr(it, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    return it


def _shutdown(it: Any) -> None:
    shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's multi-process iterator
    if callable(shutdown):
        shutdown()


class _SeededItems(Dataset):
    """Map-style view whose item ``i`` in epoch ``e`` is drawn under seed ``(seed, e, i)``.

    It only seeds: the loader fetches every batch inside :class:`isolated_rng`, which restores
    the caller's RNG afterwards (and worker processes have no caller to protect). The index is
    global, so N ranks see the augmentations one process would.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> Any:
        seed_all(mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


class ResumableLoader:
    """Iterable of ``(images, tokens)`` batches with ``state_dict``/``load_state_dict``.

    One ``iter()`` is one epoch (the rest of it after a restore), at most ``steps_per_epoch``
    batches (which also gives endless resampled streams an epoch). The position always names
    the next batch to produce: once the last batch of an epoch is handed out it is batch 0 of
    the next epoch, so a checkpoint taken while that batch trains resumes in the next epoch.
    ``drop_last=True`` (default) keeps every batch full, which the contrastive loss and DDP
    gathering want.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        steps_per_epoch: int | None = None,
        max_worker_restarts: int = 3,
        pin_memory: bool = False,
        collate_fn: Callable | None = None,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise DataError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.dataset = dataset
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.steps_per_epoch, self.max_worker_restarts = steps_per_epoch, max_worker_restarts
        self.pin_memory, self.collate_fn = pin_memory, collate_fn
        self.prefetch_factor, self.mp_context = prefetch_factor, multiprocessing_context
        self.is_stream = isinstance(dataset, IterableDataset)
        if self.is_stream and not isinstance(dataset, ShardDataset):
            raise DataError("ResumableLoader supports map-style datasets and ShardDataset streams")
        if self.is_stream and rank is None and world_size is None:
            rank, world_size = dataset.rank, dataset.world_size  # the stream already knows its split
        self.rank, self.world_size = _dist_defaults(rank, world_size)
        if self.is_stream:
            dataset.rank, dataset.world_size = self.rank, self.world_size
        self._items = dataset if self.is_stream else _SeededItems(dataset, self.seed)
        blocks = getattr(dataset, "locality_blocks", None)
        self._blocks = blocks() if callable(blocks) else None
        self.epoch = 0
        self.batches_done = 0
        self.worker_restarts = 0  # over the loader's life, for logs and tests
        self._positions: dict[int, int] = {}
        self._last_slot: int | None = None

    @property
    def skipped(self) -> Any:
        """The dataset's :class:`~clipforge.data.images.SkipCounter` (counts from all workers)."""
        return getattr(self.dataset, "skipped", None)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next ``iter()``."""
        self.epoch, self.batches_done, self._positions, self._last_slot = int(epoch), 0, {}, None

    def __len__(self) -> int:
        """Batches per epoch on this rank: a full pass, cut at ``steps_per_epoch``.

        0 for an endless stream without ``steps_per_epoch`` (it is then iterated until it ends).
        """
        full = self._full_epoch_batches()
        if self.steps_per_epoch:
            return min(full, self.steps_per_epoch) if full else self.steps_per_epoch
        return full

    def _full_epoch_batches(self) -> int:
        if self.is_stream:
            w = max(1, self.num_workers)
            total = self.dataset._slots(w)
            self.dataset.set_epoch(self.epoch)
            return sum(
                batches_per_worker(
                    self.dataset.slot_length(total, self.rank * w + i), self.batch_size, self.drop_last
                )
                for i in range(w)
            )
        n = len(self._sampler(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _sampler(self, start: int) -> EpochSampler:
        return EpochSampler(
            len(self.dataset),
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            start=start,
            blocks=self._blocks,
            group=getattr(self.dataset, "sampler_group", 1),
        )

    def _dataloader(self) -> DataLoader:
        kw: dict[str, Any] = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "drop_last": self.drop_last,
            "pin_memory": self.pin_memory,
            "persistent_workers": False,  # workers must see this epoch's settings
        }
        if self.collate_fn is not None:
            kw["collate_fn"] = self.collate_fn
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.prefetch_factor or 2
            if self.mp_context is not None:
                kw["multiprocessing_context"] = self.mp_context
        if hasattr(self._items, "set_epoch"):
            self._items.set_epoch(self.epoch)
        if self.is_stream:
            ds = self.dataset
            w = max(1, self.num_workers)
            ds.with_positions, ds.seed_samples, ds.num_workers_hint = True, True, w
            ds.start_positions = dict(self._positions)
            ds.slot_rotation = 0 if self._last_slot is None else (self._last_slot + 1) % w
            return DataLoader(ds, **kw)
        return DataLoader(self._items, sampler=self._sampler(self.batches_done * self.batch_size), **kw)

    def __iter__(self) -> Iterator[Any]:
        epoch, limit = self.epoch, len(self) or math.inf
        restarts, it = 0, None
        while self.batches_done < limit:
            try:
                with isolated_rng(mix_seed(self.seed, self.rank, epoch, self.batches_done)):
                    it = it if it is not None else _synchronous_failures(iter(self._dataloader()))
                    batch = next(it, None)
            except (RuntimeError, EOFError, ConnectionError) as e:
                # A dead worker surfaces as torch's "worker ... exited unexpectedly", or as the
                # broken pipe to it when the queue notices before the process is reaped.
                died = isinstance(e, (EOFError, ConnectionError)) or "worker" in str(e).lower()
                if self.num_workers == 0 or not died:
                    raise
                if restarts >= self.max_worker_restarts:
                    raise DataError(
                        f"data loader workers crashed {restarts + 1} times in epoch {epoch}: {e}"
                    ) from e
                # Shut the broken iterator down now: while it lives, torch's SIGCHLD handler
                # keeps its dead worker registered and raises on the *next* child that exits.
                _shutdown(it)
                restarts, it = restarts + 1, None
                self.worker_restarts += 1
                logger.warning(
                    "a data worker crashed (%s); reopening the loader at epoch %d batch %d",
                    str(e),  # not the exception: a kept log record would keep the iterator alive
                    epoch,
                    self.batches_done,
                )
                continue
            if batch is None:  # a stream that ran short (skipped samples)
                break
            batch = self._take_positions(batch)
            self.batches_done += 1
            last = self.batches_done >= limit
            if last:  # before handing it out: the position names the next batch to produce
                self.set_epoch(epoch + 1)
            yield batch
            if last:
                return
        if self.epoch == epoch:  # ended early (short stream) or restored at the epoch's end
            self.set_epoch(epoch + 1)

    def _take_positions(self, batch: Any) -> Any:
        """Strip a stream batch's (slot, position) column and advance the saved positions."""
        if not self.is_stream:
            return batch
        *batch, pos = batch
        slots = pos[:, 0]
        for slot in slots.unique().tolist():
            self._positions[slot] = int(pos[slots == slot, 1].max()) + 1
        self._last_slot = int(slots[-1])
        return tuple(batch)

    # -- exact resume -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain ints only, so it fits in any checkpoint (and JSON)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "kind": "stream" if self.is_stream else "map",
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        if self.is_stream:
            state["num_workers"] = max(1, self.num_workers)
            state["positions"] = {str(k): v for k, v in self._positions.items()}
            state["last_slot"] = self._last_slot
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kind = "stream" if self.is_stream else "map"
        if state.get("kind") != kind:
            raise DataError(f"loader state is for a {state.get('kind')} dataset, this one is {kind}")
        for key in ("seed", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position exactly: {key} was {state[key]}, now {getattr(self, key)}"
                )
        if self.is_stream and state["num_workers"] != max(1, self.num_workers):
            raise DataError(
                f"cannot resume a shard stream exactly: num_workers was {state['num_workers']}, "
                f"now {max(1, self.num_workers)} (each worker owns its own part of the stream)"
            )
        if state.get("rank", self.rank) != self.rank:
            logger.warning("loader state saved by rank %s restored on rank %s", state["rank"], self.rank)
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
        self._positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        self._last_slot = state.get("last_slot")
