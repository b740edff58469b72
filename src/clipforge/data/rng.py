"""Random numbers for data loading that do not depend on when, where or how often they are drawn.

Exact resume needs every random augmentation to be a property of the *sample* (its seed, epoch
and index or stream position), not of which worker produced it or how many samples that worker
had drawn before a restart. And loading a batch in the main process must not move the RNG that
the model's random layers (patch dropout) draw from, or a resumed run would drift.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several ints (splitmix-style), stable across processes and runs."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x ^= (int(v) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch's CPU generator (what transforms draw from)."""
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
        seed_all(self.seed)

    def __exit__(self, *exc: Any) -> None:
        py, npy, th = self.saved
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)
