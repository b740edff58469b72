"""The contrastive objective as one object: encode both sides, score, symmetric loss.

``ContrastiveTask`` owns what is specific to CLIP training (the loss, the temperature clamp, the
optional EMA of weights, gradient accumulation that still sees every negative); the trainer around
it only deals with data, precision, optimisers and checkpoints.

Accumulation with feature caching (as in open_clip, but exact): a contrastive loss over an
effective batch of K micro-batches needs all K*B features at once. We first encode every
micro-batch without gradients, then re-encode each one with gradients and evaluate the *full* loss
with the other micro-batches' cached (constant) features. Summing those K backward passes gives
exactly the full-batch gradient for the towers. The temperature (and SigLIP bias) appears in all K
losses, so it keeps its graph in the first pass only, otherwise it would get K times its gradient.
Random layers (patch dropout) replay the same RNG state in both passes so cached features equal
the recomputed ones.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.train.distributed import unwrap


@dataclass
class Features:
    image: Tensor
    text: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None = None


@dataclass
class TaskOutput:
    loss: Tensor  # detached value of the (full effective batch) loss
    metrics: dict[str, float] = field(default_factory=dict)


def build_loss(
    kind: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    chunk_size: int = 1024,
) -> Callable[..., Tensor]:
    """Instantiate a ``clipforge.losses`` loss, passing only the options it accepts."""
    from clipforge import losses

    classes = {"clip": "ClipLoss", "siglip": "SigLipLoss", "chunked": "ChunkedClipLoss"}
    if kind not in classes:
        raise ConfigError(f"unknown loss {kind!r}; choose one of {sorted(classes)}")
    cls = getattr(losses, classes[kind])
    options = {
        "rank": rank,
        "world_size": world_size,
        "local_loss": local_loss,
        "gather_with_grad": gather_with_grad,
        "chunk_size": chunk_size,
    }
    accepted = inspect.signature(cls).parameters
    if world_size > 1 and "world_size" not in accepted:
        raise ConfigError(f"loss {kind!r} does not support distributed training")
    return cls(**{k: v for k, v in options.items() if k in accepted})


class ModelEMA:
    """Exponential moving average of a model's weights (buffers are copied, not averaged)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = unwrap(model)
        for ema_p, p in zip(self.module.parameters(), src.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), src.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)


class ContrastiveTask:
    """Model + loss + temperature clamp (+ EMA). ``model`` may be DDP/FSDP/compile-wrapped."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., Tensor],
        *,
        max_logit_scale: float = 100.0,
        ema_decay: float | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.max_log_scale = math.log(max_logit_scale)
        self.ema = ModelEMA(model, ema_decay) if ema_decay else None

    @property
    def raw_model(self) -> nn.Module:
        return unwrap(self.model)

    # --- the paper, in code --------------------------------------------------------------------
    def encode(self, images: Tensor, tokens: Tensor, model: nn.Module | None = None) -> Features:
        out = (model or self.model)(images=images, tokens=tokens)
        return Features(out.image_features, out.text_features, out.logit_scale, out.logit_bias)

    def loss(self, f: Features) -> Tensor:
        return self.loss_fn(f.image, f.text, f.logit_scale, f.logit_bias)

    # --- one optimiser step's worth of gradients -------------------------------------------------
    def forward_backward(
        self,
        micro_batches: Sequence[tuple[Tensor, Tensor]],
        backward: Callable[[Tensor], None] = Tensor.backward,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> TaskOutput:
        """Accumulate the effective batch's gradients into ``.grad``; ``backward`` may apply a scaler."""
        if len(micro_batches) == 1:
            images, tokens = micro_batches[0]
            with autocast():
                f = self.encode(images, tokens)
                loss = self.loss(f)
            backward(loss)
            return self._output(loss, f)
        return self._cached_accumulation(micro_batches, backward, autocast)

    def _cached_accumulation(self, micro_batches, backward, autocast) -> TaskOutput:
        rng_states, cached = [], []
        with torch.no_grad():
            for images, tokens in micro_batches:
                rng_states.append(_rng_state(images.device))
                with autocast():
                    cached.append(self.encode(images, tokens, model=self.raw_model))
        all_image = [f.image for f in cached]
        all_text = [f.text for f in cached]
        last = len(micro_batches) - 1
        for j, (images, tokens) in enumerate(micro_batches):
            _set_rng_state(rng_states[j], images.device)
            sync = contextlib.nullcontext() if j == last else _no_sync(self.model)
            with sync:
                with autocast():
                    f = self.encode(images, tokens)
                    image = torch.cat(all_image[:j] + [f.image] + all_image[j + 1 :])
                    text = torch.cat(all_text[:j] + [f.text] + all_text[j + 1 :])
                    # The temperature gets its gradient once (first pass), not once per micro-batch.
                    scale = f.logit_scale if j == 0 else f.logit_scale.detach()
                    bias = f.logit_bias if (j == 0 or f.logit_bias is None) else f.logit_bias.detach()
                    loss = self.loss(Features(image, text, scale, bias))
                backward(loss)
        return self._output(loss, Features(image.detach(), text.detach(), f.logit_scale, f.logit_bias))

    def _output(self, loss: Tensor, f: Features) -> TaskOutput:
        metrics = {"loss": float(loss.detach().float()), "logit_scale": float(f.logit_scale.detach().float())}
        return TaskOutput(loss.detach(), metrics)

    # --- after the optimiser step ----------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the temperature to ln(max) (CLIP paper: 100) and update the EMA."""
        raw = self.raw_model
        raw.logit_scale.clamp_(0.0, self.max_log_scale)
        if self.ema is not None:
            self.ema.update(raw)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    hook = getattr(model, "no_sync", None)
    return hook() if callable(hook) else contextlib.nullcontext()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def split_micro_batches(images: Tensor, tokens: Tensor, accum_steps: int) -> list[tuple[Tensor, Tensor]]:
    """Split one loader batch into ``accum_steps`` equal micro-batches (the last may be smaller)."""
    if accum_steps <= 1:
        return [(images, tokens)]
    return list(zip(images.chunk(accum_steps), tokens.chunk(accum_steps)))


def iter_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
