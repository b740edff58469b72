"""Writing and restoring training checkpoints from a mapping of stateful objects.

A training checkpoint is ``{name: obj.state_dict()}`` for each entry of an ordered mapping (see
:func:`training_states` for the trainer's layout), plus the run config. Some entries differ per
rank (RNG, data position): those are gathered into one list indexed by rank. All ranks take part;
rank 0 writes. The file format and atomic writing live in :mod:`clipforge.train.state`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from clipforge.errors import CheckpointError, ConfigError
from clipforge.train import state as ckpt
from clipforge.train.distributed import DistInfo, barrier

log = logging.getLogger(__name__)

#: Entries that differ between ranks, saved as one list per entry (indexed by rank).
PER_RANK = ("rng", "data")
#: Entries an older checkpoint (or a run without an EMA / skip counter) may lack.
OPTIONAL = ("ema", "skips")
#: Entries restored after all others: restoring the rest (e.g. the data position) may draw numbers.
RESTORED_LAST = ("rng",)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


# --- adapters to the state_dict / load_state_dict protocol ---------------------------------------
class FullModelState:
    """An FSDP2-sharded model as one full (unsharded, CPU) state dict; a collective call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


class FullOptimizerState:
    """The optimiser of an FSDP2-sharded model as one full state dict; a collective call."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, self.optimizer, options=opts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.model, self.optimizer, state, options=opts)


class SkipCounts:
    """The bad-sample counter: saved as its counts, merged back on resume."""

    def __init__(self, skips: Any) -> None:
        self.skips = skips

    def state_dict(self) -> dict[str, int]:
        return self.skips.counts() if self.skips is not None else {}

    def load_state_dict(self, counts: dict[str, int]) -> None:
        if self.skips is not None:
            self.skips.merge(counts)


def training_states(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    ema: Stateful | None,
    loader: Stateful,
    skips: Any,
    train_state: ckpt.TrainState,
    sharded: bool = False,
) -> dict[str, Stateful | None]:
    """The trainer's checkpoint layout, in file order (restored in it too, except :data:`RESTORED_LAST`).

    ``sharded``: the model is FSDP2-sharded, so model and optimiser state are gathered in full.
    """
    if sharded:
        model_state: Stateful = FullModelState(model)
        optim_state: Stateful = FullOptimizerState(model, optimizer)
    else:
        model_state, optim_state = model, optimizer
    return {
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "rng": ckpt.RngState(),
        "data": loader,
        "skips": SkipCounts(skips),
        "train_state": train_state,
    }


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def save_training_checkpoint(
    states: Mapping[str, Stateful | None],
    *,
    info: DistInfo,
    directory: str | Path,
    step: int,
    keep_last: int,
    config: dict[str, Any],
    per_rank: Collection[str] = PER_RANK,
) -> Path | None:
    """All ranks call this (states are gathered); rank 0 writes. Returns the path or None on failure."""
    payload: dict[str, Any] = {}
    for name, obj in states.items():
        value = None if obj is None else obj.state_dict()
        payload[name] = _gather_objects(value, info) if name in per_rank else value
    payload["config"] = config
    path = None
    if info.is_main:
        try:
            path = ckpt.save_checkpoint(payload, directory, step, keep_last)
            log.info("checkpoint %s", path)
        except CheckpointError as e:
            log.error("%s; training continues", e)
    barrier()
    return path


def resume_training(
    states: Mapping[str, Stateful | None],
    *,
    resume: str | None,
    directory: str | Path,
    info: DistInfo,
    config: dict[str, Any],
    per_rank: Collection[str] = PER_RANK,
    optional: Collection[str] = OPTIONAL,
) -> Path | None:
    """Restore every entry of ``states`` from ``--resume`` (``latest`` or a file); the path or None.

    ``config`` is the run's flat config, compared with the saved one to warn about drift.
    """
    path = ckpt.resolve_resume(resume, directory)
    if resume and path is None:
        log.warning("--resume %s: no checkpoint in %s yet; starting fresh", resume, directory)
        return None
    if path is None:
        return None
    saved = ckpt.load_checkpoint_state(path)
    _warn_config_drift(saved.get("config", {}), config)
    for name in sorted(states, key=lambda n: n in RESTORED_LAST):  # stable: file order otherwise
        obj, value = states[name], saved.get(name)
        if obj is None or (name in optional and not value):
            continue
        if name not in saved:
            raise CheckpointError(f"{path}: no {name!r} entry; it is not a complete training checkpoint")
        obj.load_state_dict(_for_rank(value, info.rank) if name in per_rank else value)
    train_state, loader = states.get("train_state"), states.get("data")
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        path,
        getattr(train_state, "step", -1),
        getattr(loader, "epoch", -1),
        getattr(loader, "batches_done", -1),
    )
    return path


def _for_rank(per_rank: list[Any], rank: int) -> Any:
    if len(per_rank) <= rank:
        log.warning("checkpoint has state for %d rank(s); rank %d reuses rank 0's", len(per_rank), rank)
        return per_rank[0]
    return per_rank[rank]


_EXACTNESS_KEYS = (
    "model",
    "data",
    "batch_size",
    "accum_steps",
    "seed",
    "lr",
    "schedule",
    "loss",
    "epochs",
    "max_steps",
)


def _warn_config_drift(saved: dict[str, Any], config: dict[str, Any]) -> None:
    """Warn when a key that decides the exact result changed; ``saved`` may be flat or nested."""
    from clipforge.train.config import flatten

    try:
        saved = flatten(saved, "checkpoint config")
    except ConfigError:  # written by another version: compare the flat keys it has
        pass
    changed = [k for k in _EXACTNESS_KEYS if k in saved and saved[k] != config.get(k)]
    if changed:
        log.warning("resuming with changed %s: the run will not match an uninterrupted one", changed)
