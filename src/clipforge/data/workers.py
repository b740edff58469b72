"""How many data-loader worker processes to start when the user does not say.

Why a rule and not a constant: on a GPU the model waits for data unless several processes
decode, while on a CPU every worker takes a core from the model's own threads; and a cached or
synthetic dataset costs so little per item that worker start-up and inter-process copies cost
more than they save. The rule only picks a number: results never depend on it (every sample is
seeded by its index, :mod:`clipforge.data.rng`).
"""

from __future__ import annotations

import os
from typing import Any

#: More workers than this rarely help one GPU and each holds a copy of the dataset's tables.
MAX_WORKERS = 8


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cheap_items(dataset: Any) -> bool:
    """True for datasets whose items need no decoding: an image cache, or drawn synthetic images."""
    inner = getattr(dataset, "dataset", dataset)
    return getattr(inner, "image_cache", None) is not None or type(inner).__name__ == "SyntheticShapes"


def auto_workers(dataset: Any, device_type: str, world_size: int = 1, cores: int | None = None) -> int:
    """The worker count for ``dataset`` on ``device_type`` with ``world_size`` processes per machine.

    * accelerator: the cores left per process after its main thread, at most :data:`MAX_WORKERS`
      (at least 1, and at most 2 for cached or synthetic data);
    * CPU: 0 for cached or synthetic data and on machines with fewer than 4 cores (the model's
      threads need them); otherwise a quarter of the cores, at most 4.
    """
    cores = cores or available_cores()
    per_process = max(1, cores // max(1, world_size))
    cheap = cheap_items(dataset)
    if device_type != "cpu":
        return min(2 if cheap else MAX_WORKERS, max(1, per_process - 1))
    if cheap or per_process < 4:
        return 0
    return min(4, per_process // 4)
