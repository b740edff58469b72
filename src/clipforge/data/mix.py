"""Weighted mixing of several map-style sources, seeded and resumable.

Item ``i`` of epoch ``e`` picks a source with probability proportional to its weight and then
a random item of that source, both from a RNG seeded by (seed, e, i). That makes the mix a
plain map-style dataset: any sampler, worker count or resume offset sees the same items.
Sources are sampled *with replacement* (like webdataset's ``RandomMix``), so a small source
with a large weight repeats within an epoch; the epoch length defaults to the sum of the
source lengths.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from clipforge.errors import DataError


class MixDataset:
    def __init__(
        self,
        datasets: Sequence[Any],
        weights: Sequence[float] | None = None,
        *,
        seed: int = 0,
        length: int | None = None,
        skip_counter: Any = None,
    ) -> None:
        if not datasets:
            raise DataError("MixDataset needs at least one source")
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets):
            raise DataError(f"{len(datasets)} sources but {len(weights)} weights")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"mix weights must be >= 0 and not all zero, got {weights}")
        for d, w in zip(datasets, weights):
            if w > 0 and len(d) == 0:
                raise DataError(f"mix source {getattr(d, 'source', d)} is empty")
        self.datasets, self.weights, self.seed = list(datasets), weights, int(seed)
        self.length = int(length) if length is not None else sum(len(d) for d in datasets)
        self.skipped = skip_counter if skip_counter is not None else getattr(datasets[0], "skipped", None)
        self.source = " + ".join(f"{getattr(d, 'source', '?')}::{w:g}" for d, w in zip(datasets, weights))
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def locate(self, idx: int) -> tuple[int, int]:
        """(source number, index in that source) of mixed item ``idx`` this epoch."""
        rng = random.Random(f"mix:{self.seed}:{self.epoch}:{idx}")
        k = rng.choices(range(len(self.datasets)), weights=self.weights)[0]
        return k, rng.randrange(len(self.datasets[k]))

    def __getitem__(self, idx: int) -> Any:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        k, j = self.locate(idx)
        return self.datasets[k][j]
