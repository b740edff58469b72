"""Writing and restoring training checkpoints for a :class:`~clipforge.train.trainer.Run`.

All ranks take part (RNG and data positions differ per rank and are gathered); rank 0 writes.
The file format and atomic writing live in :mod:`clipforge.train.state`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipforge.errors import CheckpointError
from clipforge.train import state as ckpt
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import DistInfo, barrier

if TYPE_CHECKING:
    from clipforge.train.trainer import Run

log = logging.getLogger(__name__)


def _gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def full_state_dicts(run: Run) -> tuple[dict, dict]:
    if run.cfg.distributed == "fsdp" and run.info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(run.model, run.optimizer, options=opts)
    return run.model.state_dict(), run.optimizer.state_dict()


def save_training_checkpoint(run: Run) -> Path | None:
    """All ranks call this (states are gathered); rank 0 writes. Returns the path or None on failure."""
    rngs = _gather_objects(ckpt.capture_rng(), run.info)
    data_states = _gather_objects(run.loader.state_dict(), run.info)
    model_sd, optim_sd = full_state_dicts(run)
    path = None
    if run.info.is_main:
        payload = {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "ema": run.task.ema.state_dict() if run.task.ema else None,
            "rng": rngs,
            "data": data_states,  # one per rank: shard positions differ between ranks
            "skips": run.skips.counts() if run.skips is not None else {},
            "train_state": run.state.to_dict(),
            "config": run.cfg.to_dict(),
        }
        try:
            path = ckpt.save_checkpoint(payload, run.ckpt_dir, run.state.step, run.cfg.keep_last)
            log.info("checkpoint %s", path)
        except CheckpointError as e:
            log.error("%s; training continues", e)
    barrier()
    return path


def maybe_resume(run: Run) -> None:
    path = ckpt.resolve_resume(run.cfg.resume, run.ckpt_dir)
    if run.cfg.resume and path is None:
        log.warning("--resume %s: no checkpoint in %s yet; starting fresh", run.cfg.resume, run.ckpt_dir)
        return
    if path is None:
        return
    saved = ckpt.load_checkpoint_state(path)
    _warn_config_drift(saved.get("config", {}), run.cfg)
    if run.cfg.distributed == "fsdp" and run.info.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            run.model,
            run.optimizer,
            model_state_dict=saved["model"],
            optim_state_dict=saved["optimizer"],
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        run.model.load_state_dict(saved["model"])
        run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    if run.task.ema is not None and saved.get("ema") is not None:
        run.task.ema.load_state_dict(saved["ema"])
    run.loader.load_state_dict(_for_rank(saved["data"], run.info.rank))
    if run.skips is not None and saved.get("skips"):
        run.skips.merge(saved["skips"])
    run.state = ckpt.TrainState(**saved["train_state"])
    ckpt.restore_rng(_for_rank(saved["rng"], run.info.rank))
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        path,
        run.state.step,
        run.loader.epoch,
        run.loader.batches_done,
    )


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


def _warn_config_drift(saved: dict[str, Any], cfg: TrainConfig) -> None:
    changed = [k for k in _EXACTNESS_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        log.warning("resuming with changed %s: the run will not match an uninterrupted one", changed)
