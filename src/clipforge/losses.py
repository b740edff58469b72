"""Contrastive losses for CLIP training, all in one file.

Every loss is called the same way::

    loss = loss_fn(image_features, text_features, logit_scale, logit_bias=None)

``image_features`` / ``text_features`` are the *local* batch ``[N, D]`` (normally L2-normalised),
``logit_scale`` is the temperature already exponentiated (``model.logit_scale.exp()``; clamping it to
100 is the training task's job, done on the parameter after each step) and ``logit_bias`` is SigLIP's
learned bias. The result is a 0-dim tensor.

What is here and why:

* :class:`ClipLoss` - symmetric InfoNCE (CLIP): cross-entropy over the similarity matrix, rows
  (image->text) and columns (text->image), label of row ``i`` is column ``i``. Materialises the
  ``[B, B]`` logits: simplest, fine up to a batch of ~16k.
* :class:`ChunkedClipLoss` - the same value and gradients without ever holding ``[B, B]``: the
  similarity matrix is visited in square tiles, the row-wise and column-wise log-sum-exp are built
  online, only the features and the two LSE vectors are saved, and the tiles are recomputed in
  backward. Memory is ``O(B * D + chunk**2)`` instead of ``O(B**2)``.
* :class:`SigLipLoss` - SigLIP's pairwise sigmoid loss with a learned bias.
* :func:`gather_features` - collect features from all ranks so every rank sees every negative.

Distributed equivalence (why ``gather_with_grad=True`` is the default): with the gathered features,
rank ``r`` computes a loss ``L_r``. The all-gather with gradient sums, in backward, the gradient
every rank computed for rank ``r``'s features, so rank ``r`` receives ``d(sum_r L_r)/d f_r``; DDP
then averages parameter gradients over the ``W`` ranks. Without ``local_loss`` every rank computes
the full loss (``sum_r L_r = W * L``); with ``local_loss`` rank ``r`` computes only its rows
(``sum_r L_r = W * L`` again, since each ``L_r`` is a mean over ``N`` rows of the ``W*N``). Either
way the averaged gradient is exactly the single-process gradient of the global batch. Gathering
*without* gradient gives each rank only its own share, so encoder gradients come out ``W`` times too
small after DDP's average (open_clip's default behaviour); it is kept as an option because it
saves a little communication in backward.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.errors import ClipforgeError

__all__ = [
    "ChunkedClipLoss",
    "ClipLoss",
    "SigLipLoss",
    "chunked_clip_loss",
    "gather_features",
]


# --------------------------------------------------------------------------------------------- #
# Gathering across ranks
# --------------------------------------------------------------------------------------------- #


def _check_distributed(rank: int, world_size: int) -> None:
    """Fail with a useful message instead of torch's opaque errors or, worse, silently wrong grads."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ClipforgeError(
            f"losses: world_size={world_size} but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (torchrun does it in clipforge train)"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ClipforgeError(
            f"losses: loss built with rank={rank}, world_size={world_size} but the process group says "
            f"rank={dist.get_rank()}, world_size={dist.get_world_size()}"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums, over ranks, the gradient each rank computed for our slice.

    Written here instead of using ``torch.distributed.nn.functional.all_gather`` (deprecated, and
    emulating reduce-scatter with scatters on gloo): backward is one ``all_reduce`` of the
    ``[W * N, D]`` gradient followed by taking our rows, which every backend supports.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # SUM
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


def _gather_one(x: Tensor, *, with_grad: bool, rank: int, world_size: int) -> Tensor:
    """All-gather ``x`` ``[N, D]`` from every rank into ``[world_size * N, D]`` (rank order)."""
    import torch.distributed as dist

    if with_grad:
        return _AllGatherWithGrad.apply(x, rank, world_size)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    # The gathered copies carry no graph; put our own tensor back so its gradient still flows.
    parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Return ``(all_image_features, all_text_features)`` concatenated over ranks in rank order.

    With ``world_size == 1`` the inputs are returned unchanged. ``gather_with_grad=True`` uses the
    differentiable all-gather (exact DDP equivalence, see module docstring); ``False`` gathers
    without graph and re-inserts the local features so at least their gradients flow.
    ``local_loss`` does not change what is gathered (both directions need all columns); it is
    accepted so callers can pass one set of options around.
    """
    del local_loss  # same gather either way; kept for a uniform call signature
    if world_size <= 1:
        return image_features, text_features
    _check_distributed(rank, world_size)
    all_image = _gather_one(image_features, with_grad=gather_with_grad, rank=rank, world_size=world_size)
    all_text = _gather_one(text_features, with_grad=gather_with_grad, rank=rank, world_size=world_size)
    return all_image, all_text


def _as_scale(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    """Accept a Python float or a 0-dim tensor for the temperature."""
    if isinstance(logit_scale, Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), device=like.device, dtype=like.dtype)


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ClipforgeError(
            "losses: image_features and text_features must both be [N, D] with equal shapes, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


# --------------------------------------------------------------------------------------------- #
# Plain InfoNCE
# --------------------------------------------------------------------------------------------- #


#: A temperature: already exponentiated, as a tensor or a plain number.
Scale = Tensor | float


class PairLoss(nn.Module):
    """The call every loss of this module shares: check the pair, then compute :meth:`loss`."""

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scale,
        logit_bias: Tensor | None = None,
    ) -> Tensor:
        _check_pair(image_features, text_features)
        return self.loss(image_features, text_features, logit_scale, logit_bias)

    def loss(self, image: Tensor, text: Tensor, logit_scale: Scale, logit_bias: Tensor | None) -> Tensor:
        """The loss of an already checked pair (each subclass's own computation)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Placement:
    """Where an InfoNCE loss runs: the distributed options of :class:`ClipLoss` and its wrappers.

    One value instead of the same four keywords threaded through ``ChunkedClipLoss``,
    ``MultiPositiveLoss`` and ``CoCaLoss`` by hand; those take them as ``**placement`` and hand them
    to :class:`ClipLoss`, so the keywords (the objective registry's options) stay as they were.
    """

    local_loss: bool = False
    gather_with_grad: bool = True
    rank: int = 0
    world_size: int = 1

    @property
    def local_rows(self) -> bool:
        """Whether each rank scores only its own rows (``local_loss`` means nothing on one rank)."""
        return self.world_size > 1 and self.local_loss

    def label_offset(self, n: int) -> int:
        """The global index of this rank's first row when it scores only its own ``n`` rows."""
        return self.rank * n if self.local_rows else 0


class ClipLoss(PairLoss):
    """Symmetric InfoNCE over the full ``[B, B]`` logits (B = global batch).

    ``local_loss=True`` (only matters with ``world_size > 1``): each rank computes the rows of its
    own ``N`` samples against all ``B`` columns - an ``[N, B]`` matrix per direction - with labels
    ``arange(N) + rank * N``. Same gradients, ``world_size`` times less logits memory per rank.
    Subclasses change only :meth:`loss` (the checked features in, the scalar out).
    """

    def __init__(
        self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size

    @property
    def placement(self) -> Placement:
        """The distributed options as one value (read from the attributes, so never stale)."""
        return Placement(self.local_loss, self.gather_with_grad, self.rank, self.world_size)

    def gather(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """Features of the whole global batch (this rank's own rows keep their gradients)."""
        return gather_features(image_features, text_features, **asdict(self.placement))

    def get_logits(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """``(logits_per_image, logits_per_text)``; the scale multiplies ``[N, D]``, not ``[B, B]``."""
        logit_scale = _as_scale(logit_scale, image_features)
        all_image, all_text = self.gather(image_features, text_features)
        if self.placement.local_rows:
            logits_per_image = (logit_scale * image_features) @ all_text.T
            logits_per_text = (logit_scale * text_features) @ all_image.T
        else:
            logits_per_image = (logit_scale * all_image) @ all_text.T
            logits_per_text = logits_per_image.T
        return logits_per_image, logits_per_text

    # PairLoss's hook: plain InfoNCE (ChunkedClipLoss computes the same value tile by tile).
    def loss(self, image: Tensor, text: Tensor, logit_scale: Scale, logit_bias: Tensor | None) -> Tensor:
        logits_per_image, logits_per_text = self.get_logits(image, text, logit_scale)
        if logit_bias is not None:
            # A constant shift cancels in softmax; added so the bias stays in the graph (zero grad).
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        n = logits_per_image.shape[0]
        offset = self.placement.label_offset(n)
        labels = torch.arange(offset, offset + n, device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# --------------------------------------------------------------------------------------------- #
# Chunked (memory-efficient) InfoNCE
# --------------------------------------------------------------------------------------------- #


def _blocks(n: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]


# exp() of anything below this is < 2e-35: negligible next to the row/column maximum's exp(0) = 1,
# but still a normal float32. Clamping first keeps exp() from producing denormals, which are ~10x
# slower on x86 and appear in practice once the logit scale nears 100.
_EXP_FLOOR = -80.0


class _TileBuffers:
    """Reusable ``chunk x chunk`` scratch tiles: no 64 MiB malloc/page-faulting per tile.

    The second (``work``) tile is only needed for the column statistics of the symmetric loss.
    """

    def __init__(self, rows: int, cols: int, like: Tensor, dtype: torch.dtype, with_work: bool) -> None:
        self.tile = torch.empty(rows * cols, device=like.device, dtype=dtype)
        self.work = torch.empty(rows * cols, device=like.device, dtype=dtype) if with_work else self.tile

    def similarity(self, q_scaled: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(q_scaled @ k.T, scratch)`` as ``[len(q), len(k)]`` views of the buffers."""
        r, c = q_scaled.shape[0], k.shape[0]
        tile, work = self.tile[: r * c].view(r, c), self.work[: r * c].view(r, c)
        if q_scaled.dtype == tile.dtype:
            torch.mm(q_scaled, k.T, out=tile)
        else:  # low-precision matmul, float32 softmax statistics
            tile.copy_(q_scaled @ k.T)
        return tile, work


class _OnlineLSE:
    """Running log-sum-exp of rows (or columns) kept as ``(max, sum of exp(x - max))``.

    Kept split rather than as one ``lse`` number because backward needs ``S - lse`` and, with
    logits near 100, rounding ``max + log(sum)`` to float32 costs ~1e-5 of relative accuracy in every
    softmax entry; ``(S - max) - log(sum)`` stays as exact as the plain loss's log-softmax.
    """

    def __init__(self, size: int, like: Tensor, dtype: torch.dtype) -> None:
        self.max = torch.full((size,), -math.inf, device=like.device, dtype=dtype)
        self.sum = torch.zeros(size, device=like.device, dtype=dtype)

    def update(self, idx: slice, tile_max: Tensor, tile_sum: Tensor) -> None:
        """Merge a tile's ``(max, sum of exp(x - max))`` for the entries ``idx``."""
        old_max = self.max[idx]
        new_max = torch.maximum(old_max, tile_max)
        self.sum[idx] = self.sum[idx] * (old_max - new_max).exp() + tile_sum * (tile_max - new_max).exp()
        self.max[idx] = new_max

    def finish(self) -> tuple[Tensor, Tensor]:
        """``(max, log(sum))``; their sum is the log-sum-exp."""
        return self.max, self.sum.log()


class _ChunkedInfoNCE(torch.autograd.Function):
    """Cross-entropy over the rows (and, if ``symmetric``, the columns) of ``S = scale * q @ k.T``.

    ``q`` is ``[n, D]``, ``k`` is ``[m, D]``; row ``i``'s label is column ``i + offset``.
    ``symmetric=True`` (requires ``n == m`` and ``offset == 0``) returns
    ``(mean_i CE(row_i) + mean_j CE(col_j)) / 2`` - the whole CLIP loss from one pass over ``S``.
    ``symmetric=False`` returns ``mean_i CE(row_i)`` - one direction, used for ``local_loss``.

    Math. With ``lse_r``/``lse_c`` the row/column log-sum-exp of ``S``:
    ``loss = c * sum(lse_r) + c * sum(lse_c) - (1/n) * sum_i S[i, i + offset]`` and
    ``dloss/dS = c * softmax_rows(S) + c * softmax_cols(S) - (1/n) * onehot(labels)`` with
    ``c = 1/(2n)`` (symmetric: the label weight ``1/n`` is ``2c``) or ``c = 1/n`` and no column
    terms. Writing ``G = dloss/dS``: ``dq = scale * G @ k``, ``dk = scale * G.T @ q`` and
    ``dscale = sum(G * q @ k.T) = sum(q * (G @ k))`` - so the scale gradient costs ``O(n D)`` once
    ``G @ k`` is accumulated; no extra tile pass.
    Per tile: forward = 1 matmul + row/column max, exp, sum; backward = 1 matmul (recompute) +
    2 matmuls into the gradient accumulators.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, offset: int, symmetric: bool, chunk: int):  # type: ignore[override]
        n, m = q.shape[0], k.shape[0]
        if offset < 0 or offset + n > m or (symmetric and (n != m or offset)):
            raise ClipforgeError(f"losses: bad chunked InfoNCE shapes n={n}, m={m}, offset={offset}")
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        q_scaled = q * scale.to(q.dtype)
        buffers = _TileBuffers(min(chunk, n), min(chunk, m), q, acc, with_work=symmetric)
        row_stats = _OnlineLSE(n, q, acc)
        col_stats = _OnlineLSE(m, q, acc) if symmetric else None
        for rows in _blocks(n, chunk):
            for cols in _blocks(m, chunk):
                tile, work = buffers.similarity(q_scaled[rows], k[cols])
                row_max = tile.amax(dim=1)
                if col_stats is not None:
                    col_max = tile.amax(dim=0)
                    torch.sub(tile, col_max, out=work).clamp_min_(_EXP_FLOOR).exp_()
                    col_stats.update(cols, col_max, work.sum(dim=0))
                tile.sub_(row_max[:, None]).clamp_min_(_EXP_FLOOR).exp_()
                row_stats.update(rows, row_max, tile.sum(dim=1))
        del buffers
        # Per-sample cross-entropies (max - positive) + log(sum) are small numbers; summing them,
        # not the ~scale-sized maxima and positives separately, keeps float32 accuracy.
        positives = (q_scaled.to(acc) * k[offset : offset + n].to(acc)).sum(dim=1)
        max_r, logsum_r = row_stats.finish()
        loss = ((max_r - positives) + logsum_r).sum()
        max_c, logsum_c = col_stats.finish() if col_stats is not None else (max_r, logsum_r)
        if col_stats is not None:  # symmetric: column j's label is row j, so the positives coincide
            loss = (loss + ((max_c - positives) + logsum_c).sum()) / (2 * n)
        else:
            loss = loss / n
        ctx.save_for_backward(q, k, scale, max_r, logsum_r, max_c, logsum_c)
        ctx.offset, ctx.symmetric, ctx.chunk = offset, symmetric, chunk
        return loss.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        q, k, scale, max_r, logsum_r, max_c, logsum_c = ctx.saved_tensors
        offset, symmetric, chunk = ctx.offset, ctx.symmetric, ctx.chunk
        n, m = q.shape[0], k.shape[0]
        acc = max_r.dtype
        q_scaled = q * scale.to(q.dtype)
        q_acc, k_acc = q.to(acc), k.to(acc)
        buffers = _TileBuffers(min(chunk, n), min(chunk, m), q, acc, with_work=symmetric)
        # Accumulate g_k = H @ k and g_q = H.T @ q with H = G / c, i.e.
        # H = softmax_rows(S) (+ softmax_cols(S)) - label_ratio * onehot; c is applied once at the end.
        # The label is subtracted inside the tile, element-wise like the plain loss does, rather than
        # from the accumulated product: that would cancel two O(1) sums and lose float32 precision.
        label_ratio = 2.0 if symmetric else 1.0
        g_k = torch.zeros(n, q.shape[1], device=q.device, dtype=acc)
        g_q = torch.zeros(m, q.shape[1], device=q.device, dtype=acc)
        for rows in _blocks(n, chunk):
            for cols in _blocks(m, chunk):
                tile, work = buffers.similarity(q_scaled[rows], k[cols])
                if symmetric:
                    work = torch.sub(tile, max_c[cols], out=work).sub_(logsum_c[cols])
                    work.clamp_min_(_EXP_FLOOR).exp_()
                tile.sub_(max_r[rows, None]).sub_(logsum_r[rows, None]).clamp_min_(_EXP_FLOOR).exp_()
                if symmetric:
                    tile.add_(work)
                diag = rows.start + offset - cols.start  # labels (i, i + offset) on this tile's diagonal
                if -tile.shape[0] < diag < tile.shape[1]:
                    tile.diagonal(diag).sub_(label_ratio)
                g_k[rows].addmm_(tile, k_acc[cols])
                g_q[cols].addmm_(tile.T, q_acc[rows])
        del buffers
        go = grad_output.to(acc)
        weight = go / (2 * n) if symmetric else go / n  # c times dL
        g_k.mul_(weight)  # now G @ k
        g_q.mul_(weight)  # now G.T @ q
        scale_acc = scale.to(acc)
        grad_q = grad_k = grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = (q_acc * g_k).sum().to(scale.dtype).reshape(scale.shape)
        if ctx.needs_input_grad[0]:
            grad_q = g_k.mul_(scale_acc).to(q.dtype)
        if ctx.needs_input_grad[1]:
            grad_k = g_q.mul_(scale_acc).to(k.dtype)
        return grad_q, grad_k, grad_scale, None, None, None


def chunked_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    *,
    chunk_size: int = 4096,
    local_rows: tuple[Tensor, Tensor] | None = None,
    offset: int = 0,
) -> Tensor:
    """Functional chunked InfoNCE.

    Without ``local_rows``: the full symmetric loss over ``image_features @ text_features.T``.
    With ``local_rows=(local_image, local_text)``: the ``local_loss`` form - local image rows
    against all ``text_features`` plus local text rows against all ``image_features``, labels
    starting at ``offset``.
    """
    if chunk_size < 1:
        raise ClipforgeError(f"losses: chunk_size must be >= 1, got {chunk_size}")
    scale = _as_scale(logit_scale, image_features)
    if local_rows is None:
        return _ChunkedInfoNCE.apply(image_features, text_features, scale, 0, True, chunk_size)
    local_image, local_text = local_rows
    loss_i = _ChunkedInfoNCE.apply(local_image, text_features, scale, offset, False, chunk_size)
    loss_t = _ChunkedInfoNCE.apply(local_text, image_features, scale, offset, False, chunk_size)
    return (loss_i + loss_t) / 2


class ChunkedClipLoss(ClipLoss):
    """:class:`ClipLoss` with the same value and gradients, computed tile by tile.

    Peak extra memory is a few ``chunk_size x chunk_size`` tiles plus ``O(B * D)`` for the
    gradients, so batches of 64k+ fit in a few GiB where the plain loss needs ``~4 * B**2 * 4`` bytes.
    Cost: one extra ``B x B x D`` matmul (the tiles are recomputed in backward), i.e. 4/3 of the
    plain loss's matmul work, more than repaid on CPU by never streaming ``B**2`` floats through
    memory: benchmarks/loss_memory.py measured it 0.73x the plain loss's time and 1/16 of its peak
    memory at batch 16,384. Large tiles (default 4096) keep the matmuls efficient.
    """

    def __init__(self, chunk_size: int = 4096, **placement: Any) -> None:
        """``placement``: :class:`ClipLoss`'s keywords (local_loss, gather_with_grad, rank, world_size)."""
        super().__init__(**placement)
        if chunk_size < 1:
            raise ClipforgeError(f"losses: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = chunk_size

    def loss(self, image: Tensor, text: Tensor, logit_scale: Scale, logit_bias: Tensor | None) -> Tensor:
        all_image, all_text = self.gather(image, text)
        if self.placement.local_rows:
            loss = chunked_clip_loss(
                all_image,
                all_text,
                logit_scale,
                chunk_size=self.chunk_size,
                local_rows=(image, text),
                offset=self.placement.label_offset(image.shape[0]),
            )
        else:
            loss = chunked_clip_loss(all_image, all_text, logit_scale, chunk_size=self.chunk_size)
        if logit_bias is not None:
            # InfoNCE is invariant to a constant shift; keep the bias in the graph with zero grad
            # so DDP does not see an unused parameter.
            loss = loss + 0.0 * logit_bias.sum()
        return loss


# --------------------------------------------------------------------------------------------- #
# SigLIP
# --------------------------------------------------------------------------------------------- #


class SigLipLoss(PairLoss):
    """SigLIP: ``-sum_ij log sigmoid(z_ij * (scale * <img_i, txt_j> + bias)) / N``.

    ``z_ij = +1`` for the matching pair, ``-1`` otherwise; the sum runs over the local images and
    *all* texts, divided by the local batch ``N`` (the paper's normalisation).

    Distributed: text features are all-gathered with gradient and each rank scores its images
    against every text - an ``[N, B]`` matrix. The paper's ring exchange (pass text chunks to the
    neighbour ``W - 1`` times) holds only ``[N, N]`` at a time but needs hand-written
    send/recv autograd; the gather gives the identical loss and gradients with far less code, and
    ``N x B`` is what :class:`ClipLoss` with ``local_loss`` holds too. Summed over ranks the loss is
    ``W`` times the single-process loss and the gather's backward sums gradients, so after DDP's
    average the gradients equal the single-process ones (see the module docstring).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad

    def loss(self, image: Tensor, text: Tensor, logit_scale: Scale, logit_bias: Tensor | None) -> Tensor:
        logit_scale = _as_scale(logit_scale, image)
        n = image.shape[0]
        all_text = text
        if self.world_size > 1:
            _check_distributed(self.rank, self.world_size)
            all_text = _gather_one(
                text, with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size
            )
        logits = (logit_scale * image) @ all_text.T
        if logit_bias is not None:
            logits = logits + logit_bias
        offset = self.rank * n if self.world_size > 1 else 0
        signs = torch.full_like(logits, -1.0)
        idx = torch.arange(n, device=logits.device)
        signs[idx, idx + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n
