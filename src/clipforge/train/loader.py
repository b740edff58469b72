"""The trainer's view of the data: epochs of batches whose randomness cannot drift on resume.

Batch order and the saved position come from :class:`clipforge.data.loader.ResumableLoader`
(seeded permutation per epoch for map-style data, per-worker stream positions for shards). This
module adds what exact resume additionally needs from the *random numbers*:

* Every sample of a map-style dataset is produced under RNG seeded by ``(seed, epoch, index)``
  (:class:`SeededItems`), so random augmentation is a property of the sample, not of which worker
  drew it or when the run was restarted.
* Each batch is fetched under the trainer's own per-batch seed and the caller's RNG state is
  restored afterwards (:func:`isolated_rng`). Creating a ``DataLoader`` draws from the global torch
  RNG; a resumed run creates it mid-epoch, so without isolation the model's random layers (patch
  dropout) would see a shifted stream and the resumed run would drift from the uninterrupted one.
* A crashed worker process is survived by restarting the loader at the saved position, which is
  exact for the same reasons.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from clipforge.errors import DataError

log = logging.getLogger(__name__)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several ints, stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (int(v) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    # Only the CPU generator: torch.manual_seed would also queue lazy CUDA seeding, which
    # records a stack trace per call and costs milliseconds per sample.
    torch.default_generator.manual_seed(seed)


class isolated_rng:  # noqa: N801 - used like a function: ``with isolated_rng(seed):``
    """Run a block under fixed Python/NumPy/torch seeds, then restore the caller's RNG states."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        _seed_all(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class SeededItems(Dataset):
    """A map-style dataset whose item ``i`` in epoch ``e`` is drawn under seed ``(seed, e, i)``."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def skipped(self) -> Any:
        return getattr(self.dataset, "skipped", None)

    def __getitem__(self, index: int) -> Any:
        # Seed only: TrainBatches fetches every batch inside ``isolated_rng``, which restores the
        # caller's RNG afterwards (and worker processes have no caller to protect).
        _seed_all(mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


class TrainBatches:
    """Epochs of ``(images, tokens)`` batches with a saveable position.

    ``steps_per_epoch`` cuts epochs short (or defines them for endless streams); the position is
    (epoch, batches consumed) plus whatever the underlying loader needs for streams.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        steps_per_epoch: int | None = None,
        pin_memory: bool = False,
        max_worker_restarts: int = 3,
    ) -> None:
        from clipforge.data.loader import ResumableLoader

        self.dataset = dataset
        self.is_stream = isinstance(dataset, IterableDataset)
        # Seeded by the global sample index (not the rank), so N ranks see the augmentations one process would.
        items = dataset if self.is_stream else SeededItems(dataset, seed)
        if not self.is_stream and len(dataset) // world_size < batch_size:
            raise DataError(
                f"the training data has {len(dataset)} samples: too few for batch size "
                f"{batch_size} on {world_size} process(es)"
            )
        self.loader = ResumableLoader(
            items,
            batch_size=batch_size,
            num_workers=workers,
            seed=seed,
            rank=rank,
            world_size=world_size,
            pin_memory=pin_memory,
            drop_last=True,
        )
        self.seed, self.rank = seed, rank
        full = len(self.loader)
        self.steps_per_epoch = (
            min(full, steps_per_epoch) if steps_per_epoch and full else (steps_per_epoch or full)
        )
        if self.steps_per_epoch < 1:
            raise DataError("the training data yields no full batch per epoch; lower --batch-size")
        self.max_worker_restarts = max_worker_restarts
        self.worker_restarts = 0

    # --- position ------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.loader.epoch

    @property
    def batch(self) -> int:
        return self.loader.batches_done

    @property
    def skipped(self) -> Any:
        return getattr(self.dataset, "skipped", None)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def epoch_done(self, epoch: int) -> bool:
        """True once ``epoch`` has been consumed (exhausted, or cut at ``steps_per_epoch``)."""
        return self.loader.epoch > epoch or self.loader.batches_done >= self.steps_per_epoch

    def advance_to(self, epoch: int) -> None:
        """Position at the start of ``epoch`` unless the loader already got there on its own."""
        if self.loader.epoch != epoch:
            self.loader.set_epoch(epoch)

    # --- iteration -------------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The rest of the current epoch; stops after ``steps_per_epoch`` batches."""
        epoch = self.loader.epoch
        restarts = 0
        while self.loader.epoch == epoch and self.loader.batches_done < self.steps_per_epoch:
            it = iter(self.loader)
            try:
                while self.loader.batches_done < self.steps_per_epoch:
                    with isolated_rng(mix_seed(self.seed, self.rank, epoch, self.loader.batches_done)):
                        batch = next(it, None)
                    if batch is None:
                        return
                    yield batch[0], batch[1]
                return
            except RuntimeError as e:
                if self.loader.num_workers == 0 or "worker" not in str(e).lower():
                    raise
                if restarts >= self.max_worker_restarts:
                    raise DataError(
                        f"data loader workers crashed {restarts + 1} times in epoch {epoch}: {e}"
                    ) from e
                restarts += 1
                self.worker_restarts += 1
                log.warning(
                    "a data worker crashed (%s); restarting the loader at epoch %d batch %d",
                    e,
                    epoch,
                    self.loader.batches_done,
                )
