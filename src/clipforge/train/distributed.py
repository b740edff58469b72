"""Process-group setup from torchrun's environment and model wrapping (DDP / FSDP2).

``torchrun`` exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain ``python``
launch has none of them and runs as a world of one with no process group at all, so single-process
code never pays for (or depends on) ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from clipforge.device import resolve_device
from clipforge.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun described (gloo on CPU, nccl on GPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
        )
    log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum a Python number over ranks (used for skip counters and throughput)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank, so all ranks take the same branch (skip, stop)."""
    return all_reduce_sum(1.0 if flag else 0.0, device) > 0


def wrap_model(model: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """DDP for models that fit on one device, FSDP2 (one shard unit per residual block) for large ones."""
    if not info.distributed or strategy == "none":
        return model
    if strategy == "fsdp":
        return _fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Frozen towers (LiT, LoRA) leave parameters without gradients; DDP must be told to expect that.
    find_unused = any(not p.requires_grad for p in model.parameters())
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def _fully_shard(model: nn.Module) -> nn.Module:
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise ConfigError("FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from e
    blocks = [m for name, m in model.named_modules() if name.split(".")[-2:-1] == ["resblocks"]]
    for block in blocks:
        fully_shard(block)
        if hasattr(block, "forward_at"):  # the pooled-row-only last block: gather weights there too
            register_fsdp_forward_method(block, "forward_at")
    # FSDP2 cannot shard 0-dim parameters (logit_scale, logit_bias): they stay replicated plain
    # tensors and sync_replicated_grads averages their gradients.
    fully_shard(model, ignored_params=set(_replicated(model)) or None)
    log.info("FSDP2: sharded %d residual blocks + root", len(blocks))
    return model


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.ndim == 0]


def sync_replicated_grads(model: nn.Module) -> None:
    """Average over ranks the gradients FSDP2 leaves alone (see :func:`_fully_shard`)."""
    grads = [p.grad for p in _replicated(model) if p.grad is not None]
    if not grads:
        return
    flat = torch.stack(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, v in zip(grads, flat):
        g.copy_(v)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
