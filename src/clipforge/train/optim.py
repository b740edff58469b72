"""AdamW with CLIP's parameter groups, and learning-rate schedules.

Weight decay pulls weights toward zero; that is a sensible prior for matrices but wrong for gains
(LayerNorm weights want to sit near 1), biases, embedding tables, and the temperature. The towers
name their own exceptions through ``no_weight_decay()``; we add every 1-D tensor and the logit
scale/bias on top so a tower that forgets one is still handled. ``groups="open_clip"`` selects
open_clip_train's rule instead (:func:`open_clip_no_decay`), which does decay embedding tables and
positional embeddings: a run meant to reproduce an open_clip_train run needs the same groups.

Schedules are ``LambdaLR`` objects whose factor is a small picklable callable, so they carry a
``state_dict`` and resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from clipforge.errors import ConfigError
from clipforge.train.config import WEIGHT_DECAY_GROUPS

_ALWAYS_NO_DECAY = ("logit_scale", "logit_bias")
_OPEN_CLIP_NO_DECAY_PARTS = ("bn", "ln", "bias", "logit_scale")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names (relative to ``model``) that must not be decayed."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Embedding):  # token tables: decay would shrink rare tokens
            names.add(f"{prefix}.weight" if prefix else "weight")
        hook = getattr(module, "no_weight_decay", None)
        if module is model or not callable(hook):
            continue
        for name in hook():
            names.add(f"{prefix}.{name}" if prefix else name)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if param.ndim < 2 or leaf in _ALWAYS_NO_DECAY or "embedding" in leaf:
            names.add(name)
    return names


def open_clip_no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip_train's exemption from weight decay: 1-D tensors, and any parameter whose full
    name contains ``bn``, ``ln``, ``bias`` or ``logit_scale`` (a substring test on the name, as
    its ``main.py`` does; token and positional embeddings are decayed)."""
    return param.ndim < 2 or any(part in name for part in _OPEN_CLIP_NO_DECAY_PARTS)


def param_groups(model: nn.Module, weight_decay: float, groups: str = "clipforge") -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed matrices and everything else.

    ``groups`` picks who is exempt: "clipforge" (:func:`no_weight_decay_names`) or "open_clip"
    (:func:`open_clip_no_decay`).
    """
    if groups not in WEIGHT_DECAY_GROUPS:
        raise ConfigError(f"weight decay groups must be one of {list(WEIGHT_DECAY_GROUPS)}, got {groups!r}")
    skip = no_weight_decay_names(model) if groups == "clipforge" else set()
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if open_clip_no_decay(name, param) if groups == "open_clip" else _matches(name, skip):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    out = []
    if decay:
        out.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        out.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    if not out:
        raise ConfigError("no trainable parameters: every parameter is frozen (check lock/LoRA options)")
    return out


def _matches(name: str, skip: set[str]) -> bool:
    # Wrappers (peft, compile) insert prefixes like "base_model.model." or "_orig_mod.", so
    # compare on suffixes of the dotted path as well as the exact name.
    if name in skip:
        return True
    parts = name.split(".")
    return any(".".join(parts[i:]) in skip for i in range(1, len(parts)))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.2,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    fused: bool | None = None,
    groups: str = "clipforge",
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (``groups`` names the exemption rule); ``fused=None``
    picks the fused kernel where it exists.

    On CPU the default (per-tensor Python loop) AdamW costs ~8x the fused kernel for a tiny
    CLIP, a visible share of a training step; sharded (DTensor) parameters use ``foreach``.
    """
    plain = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, weight_decay, groups)]
    if fused is None:
        fused = _fused_ok([p for g in plain for p in g["params"]])
    kind = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(plain, lr=lr, betas=betas, eps=eps, **kind)


def _fused_ok(params: list[torch.Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # noqa: N806
    return all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor)
        for p in params
    )


# --- schedules -------------------------------------------------------------------------------------
@dataclass
class Warmup:
    """Linear ramp from lr/warmup to lr over ``warmup`` steps (factor 1 afterwards)."""

    warmup: int

    def factor(self, step: int) -> float:
        return (step + 1) / self.warmup if step < self.warmup else 1.0


@dataclass
class CosineFactor(Warmup):
    """Warm-up, then half a cosine from 1 to ``min_ratio`` at ``total`` steps."""

    total: int = 1
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.factor(step)
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class ConstFactor(Warmup):
    def __call__(self, step: int) -> float:
        return self.factor(step)


@dataclass
class ConstCooldownFactor(Warmup):
    """Warm-up, constant, then a power-law decay to ``min_ratio`` over the final ``cooldown`` steps."""

    total: int = 1
    cooldown: int = 0
    power: float = 1.0
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.factor(step)
        start = self.total - self.cooldown
        if self.cooldown <= 0 or step < start:
            return 1.0
        progress = min(1.0, (step - start) / self.cooldown)
        return self.min_ratio + (1.0 - self.min_ratio) * (1.0 - progress) ** self.power


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    total_steps: int,
    warmup_steps: int = 0,
    cooldown_steps: int = 0,
    cooldown_power: float = 1.0,
    min_lr: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimiser step; ``min_lr`` is absolute, relative to the base lr."""
    base = max(g["lr"] for g in optimizer.param_groups)
    min_ratio = min_lr / base if base > 0 else 0.0
    if kind == "cosine":
        fn = CosineFactor(warmup_steps, total=total_steps, min_ratio=min_ratio)
    elif kind == "const":
        fn = ConstFactor(warmup_steps)
    elif kind == "const-cooldown":
        if cooldown_steps <= 0:
            raise ConfigError("schedule 'const-cooldown' needs cooldown_steps > 0")
        fn = ConstCooldownFactor(warmup_steps, total_steps, cooldown_steps, cooldown_power, min_ratio)
    else:
        raise ConfigError(f"unknown schedule {kind!r}; choose cosine, const or const-cooldown")
    return LambdaLR(optimizer, fn)
