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

PRELOAD = ["torch", "torchvision", "clipforge.cli", "clipforge.train.trainer", "clipforge.transforms"]
START_METHOD = "forkserver"


def context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context every forking test uses (preloads set before its first use)."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    return multiprocessing.get_context(START_METHOD)
