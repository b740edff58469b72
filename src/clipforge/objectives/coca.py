"""CoCa's objective: the contrastive loss plus a weighted captioning cross-entropy (``--loss coca``).

Value and gradients equal open_clip's ``CoCaLoss``: ``clip_loss_weight * InfoNCE +
caption_loss_weight * CE(logits, labels)`` where the CE is the mean over every caption token
that is not the pad id (open_clip_train's defaults: weights 1 and 2, pad id 0).

Why the caption term travels as two small per-sample tensors (``caption_nll``: the summed token
losses of each caption, ``caption_tokens``: how many tokens it has) instead of the logits: the
trainer's exact gradient accumulation concatenates every micro-batch's per-sample inputs, and the
logits are ``[B, L, vocab]`` (about 15 MB per sample). A mean over tokens is a sum divided by a
count, so the split is exact: with the cached micro-batches' sums constant, each pass gets the
gradient of its own tokens' share, and the passes add up to the full-batch gradient. Across ranks,
the caption term is each rank's own mean (as in open_clip); DDP then averages the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.losses import ClipLoss


def caption_terms(logits: Tensor, labels: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Per caption: (sum of token cross-entropies ``[B]``, number of non-pad label tokens ``[B]``)."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # softmax over the vocabulary in float32
        logits = logits.float()
    # Rows of the flattened logits, not ``logits.permute(0, 2, 1)``: a softmax over a strided
    # vocabulary dimension is ~4x slower on CPU, and the values are the same.
    flat = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=pad_id, reduction="none")
    nll = flat.view(labels.shape)
    return nll.sum(dim=1), (labels != pad_id).sum(dim=1).to(nll.dtype)


class CoCaLoss(nn.Module):
    """``clip_loss_weight * ClipLoss + caption_loss_weight * caption CE`` (open_clip's ``CoCaLoss``)."""

    #: The batch inputs it reads (the trainer's task adds them from a CoCa forward when asked).
    accepts = ("caption_nll", "caption_tokens")

    def __init__(
        self,
        caption_loss_weight: float = 2.0,
        clip_loss_weight: float = 1.0,
        pad_id: int = 0,
        **placement: Any,
    ) -> None:
        """``placement``: the contrastive :class:`ClipLoss`'s distributed keywords (local_loss, ...)."""
        super().__init__()
        self.caption_loss_weight = caption_loss_weight
        self.clip_loss_weight = clip_loss_weight
        self.pad_id = pad_id
        self.clip = ClipLoss(**placement)
        self.last_terms: dict[str, float] = {}

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
        *,
        caption_nll: Tensor | None = None,
        caption_tokens: Tensor | None = None,
        **unused: Any,
    ) -> Tensor:
        if caption_nll is None or caption_tokens is None:
            raise ConfigError(
                "loss 'coca' needs the caption terms of a CoCa model's forward (a model with a captioning "
                "decoder, e.g. coca_ViT-B-32 or tiny-coca)"
            )
        caption = caption_nll.sum() / caption_tokens.sum().clamp_min(1)
        total = self.caption_loss_weight * caption
        contrastive = torch.zeros((), device=caption.device)
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * self.clip(image_features, text_features, logit_scale)
            total = total + contrastive
        self.last_terms = {
            "contrastive_loss": float(contrastive.detach()),
            "caption_loss": float(caption.detach() * self.caption_loss_weight),
        }
        return total


def caption_inputs(output: Any, rows: int, pad_id: int = 0) -> dict[str, Tensor]:
    """The per-sample caption terms of a CoCa forward's first ``rows`` samples (empty for a CLIP)."""
    logits = getattr(output, "logits", None)
    if logits is None:
        return {}
    nll, count = caption_terms(logits[:rows], output.labels[:rows], pad_id)
    return {"caption_nll": nll, "caption_tokens": count}
