"""Child processes for the multi-process tests, forked from a clean server.

Forking the test process itself is cheap but fragile: once any earlier test in the same pytest
worker has run autograd's worker threads, PyTorch refuses to run backward in a forked child
("Unable to handle autograd's threading in combination with fork"), so the result would depend
on which tests xdist happened to put first. The forkserver is a fresh interpreter that imports
torch and the trainer once (``PRELOAD``) and never runs autograd, so every child forked from it
starts clean and still skips the ~5 s of imports a spawned interpreter pays.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

PRELOAD = ["torch", "torchvision", "clipforge.cli", "clipforge.train.trainer", "clipforge.transforms"]
START_METHOD = "forkserver"


def context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context every forking test uses (preloads set before its first use)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    return multiprocessing.get_context(START_METHOD)


def start_ranks(worker: Callable[..., None], out_dir: Path, *args: object, world: int = 2) -> list[dict]:
    """Run ``worker(rank, world, port, out_dir, *args)`` in ``world`` processes forked from the
    clean server (one free port for their process group) and load each rank's ``rank<r>.pt``."""
    import torch
    import torch.multiprocessing as mp
    from ports import free_port

    context()
    mp.start_processes(
        worker,
        args=(world, free_port(), str(out_dir), *args),
        nprocs=world,
        join=True,
        start_method=START_METHOD,
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
