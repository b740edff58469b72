"""Splitting embedding and indexing work over the ranks ``torchrun`` started.

Why a module of its own: ``embed`` and ``index`` both hand out units of work (output shards,
input shards, embedding shards) to ranks, and both must do it the same way on every rank without
talking: the split is a pure function of the unit sizes and the world size. The few collective
steps (rank 0 checks a folder, everybody waits for everybody) go through :func:`agree` and
:func:`wait_all`, which are no-ops in a world of one, so single-process code never touches
``torch.distributed``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clipforge.errors import ClipforgeError

T = TypeVar("T")

#: Ranks wait for each other at the end of a job whose parts may take hours; the default
#: process-group timeout (30 min) would kill a healthy job whose ranks are unevenly loaded.
JOB_TIMEOUT_S = 7 * 24 * 3600.0


class DistributedJobError(ClipforgeError):
    """Rank 0 refused the job (e.g. the output folder belongs to another run); every rank says why."""


def contiguous_split(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank of each unit: consecutive units, balanced by total size, deterministic.

    Unit ``i`` goes to the rank whose equal share of the total holds the unit's midpoint, so
    ranks get contiguous runs of about ``total / world_size`` items whatever the unit sizes.
    """
    if world_size <= 1:
        return [0] * len(sizes)
    total = float(sum(sizes)) or 1.0
    ranks, before = [], 0.0
    for size in sizes:
        mid = before + size / 2.0
        ranks.append(min(world_size - 1, int(mid * world_size / total)))
        before += size
    return ranks


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start(device: str | None = "cpu") -> Any:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA) with a job-length timeout."""
    from clipforge.train.distributed import setup_distributed

    return setup_distributed(device, timeout_s=JOB_TIMEOUT_S)


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank.

    Without this, a refusal on rank 0 (a foreign output folder) would leave the other ranks
    waiting at the next barrier until the timeout instead of failing at once with the reason.
    """
    rank, size = world()
    if size == 1:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except ClipforgeError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise DistributedJobError(value)
    return value


def wait_all() -> None:
    """Barrier over all ranks (no-op alone)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


def finish() -> None:
    """Leave the process group (after the last collective)."""
    from clipforge.train.distributed import cleanup_distributed

    cleanup_distributed()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1
