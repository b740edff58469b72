"""Multi-positive InfoNCE: the positives of a query are every item with its group id.

Real batches break CLIP's one-positive assumption: several captions of one image, or several
images of one product, land in the same batch and plain InfoNCE pushes them apart as negatives.
Here each sample carries an integer group id (an image id, a product id, a table column); the
positive set of row ``i`` is ``P_i = {j : id_j == id_i}`` and the row is normalised over its
positives in one of two ways (Khosla et al. 2020 call them L_out and L_in):

* ``mean`` - ``loss_i = lse_j(S_ij) - mean_{j in P_i} S_ij``: the mean of the positives'
  cross-entropies; every positive is pulled up equally.
* ``lse``  - ``loss_i = lse_j(S_ij) - lse_{j in P_i}(S_ij)``: minus the log of the total
  probability of the positives; the row is satisfied once *some* positive wins.

With unique ids both are exactly InfoNCE, and the loss then goes through :class:`ClipLoss` /
:class:`ChunkedClipLoss` themselves, so the result is the same to the last bit.

Hard negatives (e.g. a near-miss caption per image, NegCLIP-style) are extra text columns: they
enter the denominator of the image->text rows only (every image sees every hard negative of the
global batch, as NegCLIP appends them to the batch) and are never anyone's positive. Rows whose
table cell had no hard negative send a ``valid=False`` placeholder, dropped after gathering.

Chunked (``chunk_size``): each direction is one :class:`_ChunkedMultiPositive` pass over square
tiles with online log-sum-exps and a hand-written backward that recomputes the tiles, so the
``B x B`` logits (and the ``B x B`` positive mask) never exist. Ids are gathered across ranks
with the features; gradients are exact under DDP for the reasons given in :mod:`clipforge.losses`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from clipforge.errors import ClipforgeError, ConfigError
from clipforge.losses import (
    _EXP_FLOOR,
    ChunkedClipLoss,
    ClipLoss,
    _as_scale,
    _blocks,
    _check_distributed,
    _check_pair,
    _gather_one,
)

VARIANTS = ("mean", "lse")


def gather_ids(ids: Tensor, rank: int, world_size: int) -> Tensor:
    """All-gather integer ids (no gradient) in rank order; unchanged with one process."""
    if world_size <= 1:
        return ids
    import torch.distributed as dist

    _check_distributed(rank, world_size)
    parts = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


def check_ids(ids: Tensor, n: int) -> Tensor:
    """Group ids must be ``[N]`` non-negative integers (negative ids mark hard negatives)."""
    if ids.shape != (n,) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ClipforgeError(
            f"losses: ids must be an integer tensor of shape [{n}], got {tuple(ids.shape)} {ids.dtype}"
        )
    if n and int(ids.min()) < 0:
        raise ClipforgeError("losses: group ids must be >= 0")
    return ids.long()


def _never_matching_ids(count: int, like: Tensor) -> Tensor:
    """Ids for hard-negative columns: negative, so no (non-negative) query id ever matches them."""
    return -1 - torch.arange(count, device=like.device, dtype=torch.long)


# --------------------------------------------------------------------------------------------- #
# Dense form
# --------------------------------------------------------------------------------------------- #


def _rows_loss(logits: Tensor, mask: Tensor, variant: str) -> Tensor:
    """Mean over rows of ``lse(row) - positive term``; ``mask`` marks the positives."""
    npos = mask.sum(dim=1)
    if bool((npos == 0).any()):
        raise ClipforgeError(
            "losses: a query has no positive among the columns (ids of the two sides disagree)"
        )
    lse = torch.logsumexp(logits, dim=1)
    if variant == "mean":
        pos = (
            torch.where(mask, logits, torch.zeros((), dtype=logits.dtype, device=logits.device)).sum(1) / npos
        )
    else:
        pos = torch.logsumexp(logits.masked_fill(~mask, -math.inf), dim=1)
    return (lse - pos).mean()


def multi_positive_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor | float,
    ids: Tensor,
    *,
    variant: str = "mean",
    hard_negatives: Tensor | None = None,
    local_rows: tuple[Tensor, Tensor, Tensor] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Functional multi-positive InfoNCE over already-gathered features.

    ``image``/``text``/``ids`` are the whole batch; ``hard_negatives`` ``[H, D]`` extra text
    columns for the image->text rows. ``local_rows=(image_rows, text_rows, row_ids)`` computes
    only those rows against all columns (``local_loss``). ``chunk_size`` switches to the tiled
    form that never builds the ``B x B`` matrices.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"losses: positives must be one of {list(VARIANTS)}, got {variant!r}")
    scale = _as_scale(logit_scale, image)
    img_rows, txt_rows, row_ids = local_rows if local_rows is not None else (image, text, ids)
    cols_t, ids_t = text, ids
    if hard_negatives is not None and hard_negatives.shape[0]:
        cols_t = torch.cat([text, hard_negatives.to(text.dtype)])
        ids_t = torch.cat([ids, _never_matching_ids(hard_negatives.shape[0], ids)])
    if chunk_size is not None:
        lse_pos = variant == "lse"
        loss_i = _ChunkedMultiPositive.apply(img_rows, cols_t, scale, row_ids, ids_t, lse_pos, chunk_size)
        loss_t = _ChunkedMultiPositive.apply(txt_rows, image, scale, row_ids, ids, lse_pos, chunk_size)
        return (loss_i + loss_t) / 2
    logits_i = (scale * img_rows) @ cols_t.T
    loss_i = _rows_loss(logits_i, row_ids[:, None] == ids_t[None, :], variant)
    if local_rows is None:  # all rows: the text->image logits are the transpose of the first B columns
        logits_t = logits_i[:, : text.shape[0]].T
    else:
        logits_t = (scale * txt_rows) @ image.T
    loss_t = _rows_loss(logits_t, row_ids[:, None] == ids[None, :], variant)
    return (loss_i + loss_t) / 2


# --------------------------------------------------------------------------------------------- #
# Chunked form
# --------------------------------------------------------------------------------------------- #


def _merge_lse(stats: tuple[Tensor, Tensor], idx: slice, tile_max: Tensor, tile_sum: Tensor) -> None:
    """Merge a tile's ``(max, sum exp(x - max))`` into running stats; rows may be all ``-inf``."""
    run_max, run_sum = stats
    old = run_max[idx]
    new = torch.maximum(old, tile_max)
    safe = new.clamp_min(torch.finfo(new.dtype).min)  # all -inf so far: keep exp() finite (0, not NaN)
    run_sum[idx] = run_sum[idx] * (old - safe).exp() + tile_sum * (tile_max - safe).exp()
    run_max[idx] = new


class _ChunkedMultiPositive(torch.autograd.Function):
    """``mean_i [lse_j S_ij - pos_i]`` over ``S = scale * q @ k.T`` in tiles, one direction.

    ``pos_i`` is ``mean_{j in P_i} S_ij`` (``lse_pos=False``) or ``lse_{j in P_i} S_ij``, with
    ``P_i = {j : k_ids[j] == q_ids[i]}``. Writing ``G = dloss/dS = (softmax_rows(S) - T) / n``
    with ``T_ij = [j in P_i] / |P_i|`` (mean) or ``[j in P_i] softmax_{P_i}(S_i)_j`` (lse):
    ``dq = scale * G @ k``, ``dk = scale * G.T @ q`` and ``dscale = sum(q * (G @ k))``.
    Saved: the inputs and four ``[n]`` statistics; backward recomputes each tile once.
    """

    @staticmethod
    def forward(ctx, q, k, scale, q_ids, k_ids, lse_pos: bool, chunk: int):  # type: ignore[override]
        if chunk < 1:
            raise ClipforgeError(f"losses: chunk_size must be >= 1, got {chunk}")
        n = q.shape[0]
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        q_scaled = q * scale.to(q.dtype)
        row = _stats(n, q, acc)
        pos = _stats(n, q, acc)  # (max, sum) for lse; (unused, sum of S) for mean
        npos = torch.zeros(n, device=q.device, dtype=acc)
        for rows in _blocks(n, chunk):
            for cols in _blocks(k.shape[0], chunk):
                tile = (q_scaled[rows] @ k[cols].T).to(acc)
                mask = q_ids[rows, None] == k_ids[None, cols]
                npos[rows] += mask.sum(1)
                if lse_pos:
                    ptile = tile.masked_fill(~mask, -math.inf)
                    pmax = ptile.amax(1)
                    psum = (ptile - pmax.clamp_min(torch.finfo(acc).min)[:, None]).exp().sum(1)
                    _merge_lse(pos, rows, pmax, psum)
                else:
                    pos[1][rows] += torch.where(mask, tile, torch.zeros((), dtype=acc, device=q.device)).sum(
                        1
                    )
                row_max = tile.amax(1)
                _merge_lse(row, rows, row_max, (tile - row_max[:, None]).clamp_min_(_EXP_FLOOR).exp_().sum(1))
        if bool((npos == 0).any()):
            raise ClipforgeError(
                "losses: a query has no positive among the columns (ids of the two sides disagree)"
            )
        logsum = row[1].log()
        if lse_pos:
            per_row = (row[0] - pos[0]) + (logsum - pos[1].log())
            pos_norm = pos[0] + pos[1].log()  # lse over the positives, for backward
        else:
            per_row = (row[0] - pos[1] / npos) + logsum
            pos_norm = npos
        ctx.save_for_backward(q, k, scale, q_ids, k_ids, row[0], logsum, pos_norm)
        ctx.lse_pos, ctx.chunk = lse_pos, chunk
        return (per_row.sum() / n).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        q, k, scale, q_ids, k_ids, row_max, logsum, pos_norm = ctx.saved_tensors
        n, chunk, acc = q.shape[0], ctx.chunk, row_max.dtype
        q_scaled = q * scale.to(q.dtype)
        q_acc, k_acc = q.to(acc), k.to(acc)
        g_k = torch.zeros(n, q.shape[1], device=q.device, dtype=acc)  # H @ k
        g_q = torch.zeros(k.shape[0], q.shape[1], device=q.device, dtype=acc)  # H.T @ q
        for rows in _blocks(n, chunk):
            for cols in _blocks(k.shape[0], chunk):
                tile = (q_scaled[rows] @ k[cols].T).to(acc)
                mask = q_ids[rows, None] == k_ids[None, cols]
                if ctx.lse_pos:
                    target = (tile - pos_norm[rows, None]).clamp_min(_EXP_FLOOR).exp() * mask
                else:
                    target = mask / pos_norm[rows, None]
                tile.sub_(row_max[rows, None]).sub_(logsum[rows, None]).clamp_min_(_EXP_FLOOR).exp_()
                tile.sub_(target)
                g_k[rows].addmm_(tile, k_acc[cols])
                g_q[cols].addmm_(tile.T, q_acc[rows])
        weight = grad_output.to(acc) / n
        g_k.mul_(weight)
        g_q.mul_(weight)
        scale_acc = scale.to(acc)
        grad_scale = (
            (q_acc * g_k).sum().to(scale.dtype).reshape(scale.shape) if ctx.needs_input_grad[2] else None
        )
        grad_q = g_k.mul_(scale_acc).to(q.dtype) if ctx.needs_input_grad[0] else None
        grad_k = g_q.mul_(scale_acc).to(k.dtype) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_scale, None, None, None, None


def _stats(n: int, like: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return (
        torch.full((n,), -math.inf, device=like.device, dtype=dtype),
        torch.zeros(n, device=like.device, dtype=dtype),
    )


# --------------------------------------------------------------------------------------------- #
# Module
# --------------------------------------------------------------------------------------------- #


class MultiPositiveLoss(ClipLoss):
    """InfoNCE whose positives come from group ids, with optional hard negatives and chunking.

    Called like every loss, plus ``ids`` ``[N]`` (default: unique, i.e. plain InfoNCE) and
    ``hard_negatives`` ``[N * H, D]`` with ``hard_negatives_valid`` ``[N * H]``. Unique ids and no
    hard negatives delegate to :class:`ClipLoss` / :class:`ChunkedClipLoss` (identical bits).
    """

    def __init__(self, positives: str = "mean", chunk_size: int | None = None, **placement: Any) -> None:
        """``placement``: :class:`ClipLoss`'s keywords (local_loss, gather_with_grad, rank, world_size)."""
        super().__init__(**placement)
        if positives not in VARIANTS:
            raise ConfigError(
                f"loss 'multipos': option 'positives' must be one of {list(VARIANTS)}, got {positives!r}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"loss 'multipos': option 'chunk_size' must be >= 1, got {chunk_size}")
        self.positives, self.chunk_size = positives, chunk_size
        self.plain = (
            ClipLoss(**placement)
            if chunk_size is None
            else ChunkedClipLoss(chunk_size=chunk_size, **placement)
        )

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        *,
        ids: Tensor | None = None,
        hard_negatives: Tensor | None = None,
        hard_negatives_valid: Tensor | None = None,
    ) -> Tensor:
        _check_pair(image_features, text_features)
        n = image_features.shape[0]
        all_ids = None if ids is None else gather_ids(check_ids(ids, n), self.rank, self.world_size)
        unique = all_ids is None or int(all_ids.unique().numel()) == all_ids.numel()
        if unique and hard_negatives is None:
            return self.plain(image_features, text_features, logit_scale, logit_bias)
        if all_ids is None:  # unique ids: the sample's place in the global batch
            all_ids = torch.arange(max(self.world_size, 1) * n, device=image_features.device)
        all_image, all_text = self.gather(image_features, text_features)
        negatives = self._gather_negatives(hard_negatives, hard_negatives_valid)
        local = None
        if self.placement.local_rows:
            local = (image_features, text_features, all_ids[self.rank * n : (self.rank + 1) * n])
        loss = multi_positive_loss(
            all_image,
            all_text,
            logit_scale,
            all_ids,
            variant=self.positives,
            hard_negatives=negatives,
            local_rows=local,
            chunk_size=self.chunk_size,
        )
        if logit_bias is not None:  # shift-invariant; keep the bias in the graph (zero gradient) for DDP
            loss = loss + 0.0 * logit_bias.sum()
        return loss

    def _gather_negatives(self, negatives: Tensor | None, valid: Tensor | None) -> Tensor | None:
        """All ranks' hard negatives (with gradients), placeholders dropped."""
        if negatives is None:
            return None
        if valid is None:
            valid = torch.ones(negatives.shape[0], dtype=torch.bool, device=negatives.device)
        if valid.shape != negatives.shape[:1]:
            raise ClipforgeError("losses: hard_negatives_valid must have one flag per hard negative")
        if self.world_size > 1:
            _check_distributed(self.rank, self.world_size)
            negatives = _gather_one(
                negatives, with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size
            )
            valid = gather_ids(valid.to(torch.uint8), self.rank, self.world_size).bool()
        return negatives[valid]
