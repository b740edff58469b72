"""SigLIP with group ids, across ranks either by all-gather or by passing text chunks around a ring.

The pairwise sigmoid loss of rank ``r`` is a sum of independent blocks, one per text chunk:
``L_r = sum_s block(I_r, T_s) / N`` with ``block(I, T) = -sum log sigmoid(z * (scale * I @ T.T + bias))``
and ``z = +1`` where the ids match. The SigLIP paper never gathers: each rank scores its images
against its own texts, passes the texts to its right neighbour and receives the left one's,
``W - 1`` times. :class:`_RingSigLip` does exactly that in forward *and* in backward, where the
chunks go around again together with a gradient buffer each rank adds its share to; one last hop
brings every buffer home. Nothing per step is kept for backward, so a rank holds one ``[N, N]``
block and a few ``[N, D]`` chunks whatever ``W`` is (the gathered form holds ``[N, W*N]``
logits and ``W`` chunks saved for backward). Value and gradients equal the gathered loss's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.losses import SigLipLoss, _as_scale, _check_distributed, _check_pair, _gather_one
from clipforge.objectives.multipos import check_ids, gather_ids

EXCHANGES = ("neighbour", "gather")


def _signs(row_ids: Tensor, col_ids: Tensor, dtype: torch.dtype) -> Tensor:
    return (row_ids[:, None] == col_ids[None, :]).to(dtype) * 2 - 1


def _block_loss(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, row_ids: Tensor, col_ids: Tensor
) -> Tensor:
    logits = (scale * image) @ text.T + bias
    return -F.logsigmoid(_signs(row_ids, col_ids, logits.dtype) * logits).sum()


@torch.no_grad()
def _block_value(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, row_ids: Tensor, col_ids: Tensor
) -> Tensor:
    """:func:`_block_loss` without a graph, in place: two ``[N, N]`` buffers at a time."""
    x = image @ text.T
    x.mul_(scale).add_(bias).mul_(_signs(row_ids, col_ids, x.dtype))
    return -F.logsigmoid(x).sum()


@torch.no_grad()
def _block_grad(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, row_ids: Tensor, col_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """``(raw, g)``: ``raw = image @ text.T`` and ``g = d block / d logits = -z sigmoid(-z logits)``."""
    raw = image @ text.T
    z = _signs(row_ids, col_ids, raw.dtype)
    g = raw * scale
    g.add_(bias).mul_(z).neg_().sigmoid_().mul_(z).neg_()
    return raw, g


def _shift_right(tensors: list[Tensor], rank: int, world_size: int) -> list[Tensor]:
    """Send each tensor to rank+1 and receive the same-shaped tensors from rank-1."""
    import torch.distributed as dist

    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), right) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, left) for r in received]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _RingSigLip(torch.autograd.Function):
    """Ring-exchanged SigLIP loss of this rank's images against every rank's texts (sum / N)."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, ids, rank: int, world_size: int):  # type: ignore[override]
        total = image.new_zeros((), dtype=torch.float64 if image.dtype == torch.float64 else torch.float32)
        chunk, chunk_ids = text, ids
        with torch.no_grad():
            for step in range(world_size):
                if step:
                    chunk, chunk_ids = _shift_right([chunk, chunk_ids], rank, world_size)
                total = total + _block_value(image, chunk, scale, bias, ids, chunk_ids).to(total.dtype)
        ctx.save_for_backward(image, text, scale, bias, ids)
        ctx.rank, ctx.world_size = rank, world_size
        return (total / image.shape[0]).to(image.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        image, text, scale, bias, ids = ctx.saved_tensors
        rank, world_size, n = ctx.rank, ctx.world_size, image.shape[0]
        chunk, chunk_ids, chunk_grad = text, ids, torch.zeros_like(text)
        grad_image = torch.zeros_like(image)
        grad_scale, grad_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        weight = grad_output / n
        for step in range(world_size):
            if step:
                chunk, chunk_ids, chunk_grad = _shift_right([chunk, chunk_ids, chunk_grad], rank, world_size)
            raw, g = _block_grad(image, chunk, scale, bias, ids, chunk_ids)
            g.mul_(weight)
            grad_image.addmm_(g, chunk, alpha=float(scale))
            chunk_grad.addmm_(g.T, image, alpha=float(scale))
            grad_scale += raw.mul_(g).sum()
            grad_bias += g.sum()
            del raw, g
        if world_size > 1:  # the buffer visited every rank; one more hop takes it to its owner
            (chunk_grad,) = _shift_right([chunk_grad], rank, world_size)
        return grad_image, chunk_grad, grad_scale, grad_bias, None, None, None


class SigLip(nn.Module):
    """SigLIP with ids (default unique) and the cross-rank ``exchange`` of the module docstring.

    ``exchange="gather"`` with unique ids is :class:`clipforge.losses.SigLipLoss` itself.
    """

    def __init__(
        self, exchange: str = "neighbour", gather_with_grad: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        if exchange not in EXCHANGES:
            raise ConfigError(
                f"loss 'siglip': option 'siglip_exchange' must be one of {list(EXCHANGES)}, got {exchange!r}"
            )
        if exchange == "neighbour" and not gather_with_grad:
            raise ConfigError("loss 'siglip': --no-gather-with-grad applies to siglip_exchange 'gather' only")
        self.exchange, self.gather_with_grad, self.rank, self.world_size = (
            exchange,
            gather_with_grad,
            rank,
            world_size,
        )
        self.plain = SigLipLoss(rank=rank, world_size=world_size, gather_with_grad=gather_with_grad)

    def forward(self, image, text, logit_scale, logit_bias=None, *, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        _check_pair(image, text)
        n = image.shape[0]
        if self.exchange == "gather" and ids is None:
            return self.plain(image, text, logit_scale, logit_bias)
        scale = _as_scale(logit_scale, image)
        bias = logit_bias if logit_bias is not None else image.new_zeros(())
        offset = self.rank * n if self.world_size > 1 else 0
        ids = torch.arange(offset, offset + n, device=image.device) if ids is None else check_ids(ids, n)
        if self.world_size > 1:
            _check_distributed(self.rank, self.world_size)
        if self.exchange == "neighbour":
            return _RingSigLip.apply(image, text, scale, bias, ids, self.rank, max(self.world_size, 1))
        all_text, all_ids = text, ids
        if self.world_size > 1:
            all_text = _gather_one(
                text, with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size
            )
            all_ids = gather_ids(ids, self.rank, self.world_size)
        return _block_loss(image, all_text, scale, bias, ids, all_ids) / n
