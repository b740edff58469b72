"""Training checkpoints that resume *exactly*, written so that a crash never loses the last one.

A checkpoint holds everything the next step depends on: weights, optimiser moments, grad-scaler
and scheduler state, every RNG (Python, NumPy, torch CPU and each CUDA device), the data position
and the step/epoch counters. Restoring all of it makes the continued run bit-identical to one that
was never interrupted (on CPU, or on GPU with deterministic kernels).

Files are written through :mod:`clipforge.atomic` (a temporary name in the same folder, fsync'ed,
then renamed into place): a SIGKILL or a full disk mid-write leaves at worst a stray ``.tmp`` file,
never a truncated checkpoint, and older checkpoints are pruned only after the new one is safely on
disk.
"""

from __future__ import annotations

import errno
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.atomic import atomic_write
from clipforge.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


@dataclass
class TrainState:
    """Counters the loop advances; saved with every checkpoint."""

    step: int = 0  # optimiser steps taken
    epoch: int = 0  # epochs completed before the current one
    bad_steps: int = 0  # total steps skipped because of NaN/Inf
    bad_in_a_row: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    # The checkpoint protocol (``state_dict``/``load_state_dict``), restoring in place so every
    # holder of this object sees the resumed counters.
    def state_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restored = TrainState(**state)  # unknown keys fail here, naming them
        self.__dict__.update(restored.__dict__)


class RngState:
    """Every RNG of this process behind the checkpoint protocol (see :func:`capture_rng`)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(state)


# --- RNG ------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors/ints (safe for ``weights_only`` loading)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _py_state_to_safe(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_safe(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


# --- save / find / load ---------------------------------------------------------------------------
def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files from interrupted writes are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep_last: int = 3) -> Path:
    """Atomically write ``state`` as ``step_XXXXXXXX.pt`` and prune to the newest ``keep_last``.

    Raises :class:`CheckpointError` (with the path and reason) if the write fails; the earlier
    checkpoints are untouched in that case.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    payload = {"format_version": STATE_FORMAT_VERSION, **state}
    try:
        with atomic_write(path) as fh:  # the partial temp file is removed on failure
            _dump(payload, fh)
    except OSError as e:
        reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        previous = list_checkpoints(directory)
        kept = f"; previous checkpoint {previous[-1]} is intact" if previous else ""
        raise CheckpointError(f"could not write checkpoint {path}: {reason}{kept}") from e
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    _clean_stale_tmp(directory)
    return path


def _dump(payload: dict[str, Any], fh: Any) -> None:
    """Serialise into an open file (one seam for fault-injection tests)."""
    torch.save(payload, fh)


def _clean_stale_tmp(directory: Path) -> None:
    """Remove temp files left by killed writers: ours are renamed or removed by now, so any
    ``.step_*.tmp`` left is another process's torn write (one writer per run: rank 0)."""
    for p in directory.glob(".step_*.tmp"):
        p.unlink(missing_ok=True)


def resolve_resume(resume: str | None, directory: str | Path) -> Path | None:
    """``latest`` -> newest complete checkpoint in ``directory`` (None if there is none yet)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


def load_checkpoint_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a training checkpoint without executing pickled code (``weights_only``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / corrupt / unsafe: say which file and why
        raise CheckpointError(f"cannot read training checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a clipforge training checkpoint (no 'model' entry)")
    version = state.get("format_version", 0)
    if version > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer clipforge (training state v{version} > v{STATE_FORMAT_VERSION})"
        )
    return state
