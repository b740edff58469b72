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
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from clipforge.naflex_transforms import batch_device, batch_length, cat_images, chunk_images
from clipforge.train.distributed import unwrap


@dataclass
class Features:
    image: Tensor
    text: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None = None
    # Per-sample extras for the objective (ids, hard negatives, second views, teacher features),
    # all in sample order so micro-batches concatenate like the features.
    inputs: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class TaskOutput:
    loss: Tensor  # detached value of the (full effective batch) loss
    metrics: dict[str, float] = field(default_factory=dict)


def build_loss(
    kind: str, options: dict[str, Any] | None = None, *, rank: int = 0, world_size: int = 1
) -> Callable[..., Tensor]:
    """The registry's loss ``kind`` with its declared ``options`` (an undeclared one is an error)."""
    from clipforge.objectives import registry

    return registry.build(kind, options or {}, rank=rank, world_size=world_size)


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
        teacher: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.teacher = teacher  # frozen model run on each batch, for distillation (or None)
        self.max_log_scale = math.log(max_logit_scale)
        self.ema = ModelEMA(model, ema_decay) if ema_decay else None

    @property
    def raw_model(self) -> nn.Module:
        return unwrap(self.model)

    # --- the paper, in code --------------------------------------------------------------------
    def encode(
        self,
        images: Tensor,
        tokens: Tensor,
        model: nn.Module | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> Features:
        """Both towers in one forward (through the DDP wrapper), extra inputs encoded with the batch.

        ``extras`` may hold ``image_views`` (a second augmentation, encoded after the images),
        ``hard_negative_tokens`` ``[N, H, L]`` (encoded after the captions), and per-sample
        tensors passed through to the objective (``ids``, ``teacher_image``, ...).
        """
        extras = dict(extras or {})
        n = batch_length(images)
        views = extras.pop("image_views", None)
        negatives = extras.pop("hard_negative_tokens", None)
        valid = extras.pop("hard_negatives_valid", None)
        image_in = images if views is None else cat_images([images, views])
        tokens_in = tokens if negatives is None else torch.cat([tokens, negatives.flatten(0, 1)])
        out = (model or self.model)(images=image_in, tokens=tokens_in)
        inputs = dict(extras)
        if "caption_nll" in getattr(self.loss_fn, "accepts", ()):  # --loss coca: the caption terms
            from clipforge.objectives.coca import caption_inputs

            inputs.update(
                caption_inputs(out, n, getattr(getattr(self.loss_fn, "main", self.loss_fn), "pad_id", 0))
            )
        if views is not None:
            inputs["image_views"] = out.image_features[n:]
        if negatives is not None:
            inputs["hard_negatives"] = out.text_features[n:]
            inputs["hard_negatives_valid"] = (
                valid.flatten()
                if valid is not None
                else torch.ones(negatives.shape[0] * negatives.shape[1], dtype=torch.bool)
            ).to(out.text_features.device)
        return Features(
            out.image_features[:n], out.text_features[:n], out.logit_scale, out.logit_bias, inputs
        )

    def _encode(
        self, images: Tensor, tokens: Tensor, extras: dict[str, Tensor], model: nn.Module | None = None
    ) -> Features:
        return (
            self.encode(images, tokens, model=model, extras=extras)
            if extras
            else self.encode(images, tokens, model=model)
        )

    def loss(self, f: Features) -> Tensor:
        return self.loss_fn(f.image, f.text, f.logit_scale, f.logit_bias, **f.inputs)

    # --- one optimiser step's worth of gradients -------------------------------------------------
    def forward_backward(
        self,
        micro_batches: Sequence[tuple[Tensor, ...]],
        backward: Callable[[Tensor], None] = Tensor.backward,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> TaskOutput:
        """Accumulate the effective batch's gradients into ``.grad``; ``backward`` may apply a scaler.

        A micro-batch is ``(images, tokens)`` or ``(images, tokens, extras)`` (see :meth:`encode`).
        """
        micro_batches = [self._with_teacher(mb) for mb in micro_batches]
        if len(micro_batches) == 1:
            images, tokens, extras = _unpack(micro_batches[0])
            with autocast():
                f = self._encode(images, tokens, extras)
                loss = self.loss(f)
            backward(loss)
            return self._output(loss, f)
        return self._cached_accumulation(micro_batches, backward, autocast)

    def _with_teacher(self, micro_batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Add on-the-fly teacher features once per micro-batch (not again in the cached pass)."""
        images, tokens, extras = _unpack(micro_batch)
        if self.teacher is not None and "teacher_image" not in extras:
            t_image, t_text = self.teacher(images, tokens)
            extras = {**extras, "teacher_image": t_image, "teacher_text": t_text}
        return images, tokens, extras

    def _cached_accumulation(self, micro_batches, backward, autocast) -> TaskOutput:
        rng_states, cached = [], []
        with torch.no_grad():
            for images, tokens, extras in micro_batches:
                rng_states.append(_rng_state(batch_device(images)))
                with autocast():
                    cached.append(self._encode(images, tokens, extras, model=self.raw_model))
        last = len(micro_batches) - 1
        for j, (images, tokens, extras) in enumerate(micro_batches):
            _set_rng_state(rng_states[j], batch_device(images))
            sync = contextlib.nullcontext() if j == last else _no_sync(self.model)
            with sync:
                with autocast():
                    f = self._encode(images, tokens, extras)
                    merged = _merge_cached(cached, j, f)
                    loss = self.loss(merged)
                backward(loss)
        f_out = Features(merged.image.detach(), merged.text.detach(), f.logit_scale, f.logit_bias)
        return self._output(loss, f_out)

    def _output(self, loss: Tensor, f: Features) -> TaskOutput:
        metrics = {"loss": float(loss.detach().float()), "logit_scale": float(f.logit_scale.detach().float())}
        metrics.update(getattr(self.loss_fn, "last_terms", None) or {})
        return TaskOutput(loss.detach(), metrics)

    # --- after the optimiser step ----------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the temperature to ln(max) (CLIP paper: 100) and update the EMA."""
        raw = self.raw_model
        raw.logit_scale.clamp_(0.0, self.max_log_scale)
        if self.ema is not None:
            self.ema.update(raw)


def _unpack(micro_batch: Sequence[Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    images, tokens, *rest = micro_batch
    return images, tokens, dict(rest[0]) if rest else {}


def _merge_cached(cached: list[Features], j: int, fresh: Features) -> Features:
    """The effective batch: micro-batch ``j``'s fresh features amid the others' cached ones.

    The temperature (and SigLIP bias) keeps its graph in the first pass only: it appears in all
    K losses and would otherwise get K times its gradient.
    """

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts)

    def around(get: Callable[[Features], Tensor]) -> Tensor:
        return cat([get(c) for c in cached[:j]] + [get(fresh)] + [get(c) for c in cached[j + 1 :]])

    inputs = {key: around(lambda f, k=key: f.inputs[k]) for key in fresh.inputs}
    scale = fresh.logit_scale if j == 0 else fresh.logit_scale.detach()
    bias = fresh.logit_bias if (j == 0 or fresh.logit_bias is None) else fresh.logit_bias.detach()
    return Features(around(lambda f: f.image), around(lambda f: f.text), scale, bias, inputs)


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


def split_micro_batches(
    images: Tensor, tokens: Tensor, accum_steps: int, extras: dict[str, Tensor] | None = None
) -> list[tuple[Any, ...]]:
    """Split one loader batch into ``accum_steps`` equal micro-batches (the last may be smaller).

    With ``extras`` (per-sample tensors) each micro-batch is ``(images, tokens, extras_part)``.
    ``images`` (and an ``image_views`` extra) may be NaFlex patch dicts: every key is split alike.
    """
    if accum_steps <= 1:
        return [(images, tokens)] if not extras else [(images, tokens, extras)]
    parts = list(zip(chunk_images(images, accum_steps), tokens.chunk(accum_steps)))
    if not extras:
        return parts
    chunks = {k: chunk_images(v, accum_steps) for k, v in extras.items()}
    return [(i, t, {k: c[m] for k, c in chunks.items()}) for m, (i, t) in enumerate(parts)]


def iter_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)
