"""The rest of the contrastive family: triplet, NT-Xent and contrastive binary cross-entropy.

All three take group ids (``ids``, default unique) so several captions of one image are
positives, gather features across ranks with gradients, and let each rank compute its own rows
against every column: summed over ranks that is ``W`` times the single-process loss, which the
gather's summed backward and DDP's average turn back into the single-process gradients (see
:mod:`clipforge.losses`). Each is normalised per query row, so equal local batches keep that
identity exact.

* :class:`TripletLoss` - ``relu(margin + s(a, n) - s(a, p))`` on cosine similarities (the
  temperature is not used), both directions, one term per (anchor, positive) pair, averaged per
  anchor. ``hardest``: the most similar negative of the anchor. ``semihard`` (FaceNet): the most
  similar negative that is still less similar than the positive; when there is none, the least
  similar negative (as TensorFlow Addons' ``triplet_semihard_loss`` does).
* :class:`NTXentLoss` - SimCLR's normalised-temperature cross-entropy over the ``2B`` items of
  both sides: an item's positives are the other items with its id (its pair), its negatives are
  everything else *including* items of its own side. :func:`nt_xent` is also the SLIP-style
  image-image term over two augmented views (``--image-ssl ntxent``).
* :class:`ContrastiveBCELoss` - binary cross-entropy of ``sigmoid(scale * s + bias)`` against
  ``[same id]`` averaged over all ``B x B`` pairs (SigLIP sums over pairs and divides by ``B``;
  this is the plain mean, with a ``pos_weight`` for the ``B``-to-1 class imbalance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.losses import _as_scale, _check_pair, gather_features
from clipforge.objectives.multipos import _rows_loss, check_ids, gather_ids

MINING = ("hardest", "semihard")


class _Rows(nn.Module):
    """Shared plumbing: gather features and ids, and know where this rank's rows sit."""

    def __init__(self, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.gather_with_grad, self.rank, self.world_size = gather_with_grad, rank, world_size

    def gathered(
        self, image: Tensor, text: Tensor, ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """``(all_image, all_text, local_ids, all_ids, offset of our rows)``."""
        _check_pair(image, text)
        n = image.shape[0]
        offset = self.rank * n if self.world_size > 1 else 0
        if ids is None:
            local_ids = torch.arange(offset, offset + n, device=image.device)
            all_ids = torch.arange(max(self.world_size, 1) * n, device=image.device)
        else:
            local_ids = check_ids(ids, n)
            all_ids = gather_ids(local_ids, self.rank, self.world_size)
        all_image, all_text = gather_features(
            image, text, gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size
        )
        return all_image, all_text, local_ids, all_ids, offset


def _keep_in_graph(loss: Tensor, *params: Tensor | None) -> Tensor:
    """Add ``0 * p`` for parameters the loss does not use, so DDP sees no unused parameter."""
    for p in params:
        if isinstance(p, Tensor) and p.requires_grad:
            loss = loss + 0.0 * p.sum()
    return loss


# --------------------------------------------------------------------------------------------- #
# Triplet
# --------------------------------------------------------------------------------------------- #


def triplet_rows(sim: Tensor, positive: Tensor, margin: float, mining: str) -> Tensor:
    """Mean over anchors (rows of ``sim``) of the mean triplet loss over the anchor's positives."""
    anchor, pos_col = positive.nonzero(as_tuple=True)
    s_pos = sim[anchor, pos_col]
    negative = ~positive[anchor]  # [pairs, m]
    s_row = sim[anchor]
    if mining == "hardest":
        s_neg = s_row.masked_fill(~negative, -torch.inf).amax(1)
    else:
        inside = negative & (s_row < s_pos[:, None])
        semi = s_row.masked_fill(~inside, -torch.inf).amax(1)
        easiest = s_row.masked_fill(~negative, torch.inf).amin(1)
        s_neg = torch.where(inside.any(1), semi, easiest)
    has_negative = negative.any(1)
    per_pair = torch.where(has_negative, F.relu(margin + s_neg - s_pos), torch.zeros_like(s_pos))
    per_anchor = torch.zeros(sim.shape[0], dtype=sim.dtype, device=sim.device).index_add(0, anchor, per_pair)
    counts = positive.sum(1).clamp_min(1).to(sim.dtype)
    return (per_anchor / counts).mean()


class TripletLoss(_Rows):
    """Margin triplet loss with in-batch mining; see the module docstring."""

    def __init__(self, margin: float = 0.2, mining: str = "hardest", **dist: object) -> None:
        super().__init__(**dist)  # type: ignore[arg-type]
        if mining not in MINING:
            raise ConfigError(
                f"loss 'triplet': option 'mining' must be one of {list(MINING)}, got {mining!r}"
            )
        if margin < 0:
            raise ConfigError(f"loss 'triplet': option 'margin' must be >= 0, got {margin}")
        self.margin, self.mining = float(margin), mining

    def forward(self, image, text, logit_scale, logit_bias=None, *, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        all_image, all_text, local_ids, all_ids, _ = self.gathered(image, text, ids)
        positive = local_ids[:, None] == all_ids[None, :]
        loss_i = triplet_rows(image @ all_text.T, positive, self.margin, self.mining)
        loss_t = triplet_rows(text @ all_image.T, positive, self.margin, self.mining)
        return _keep_in_graph((loss_i + loss_t) / 2, logit_scale, logit_bias)


# --------------------------------------------------------------------------------------------- #
# NT-Xent
# --------------------------------------------------------------------------------------------- #


def nt_xent(
    a: Tensor,
    b: Tensor,
    all_a: Tensor,
    all_b: Tensor,
    scale: Tensor,
    local_ids: Tensor,
    all_ids: Tensor,
    offset: int,
) -> Tensor:
    """NT-Xent of this rank's rows ``a``, ``b`` (``[n, D]`` each, rows ``offset..`` of ``all_a``/``all_b``).

    Items: ``cat(all_a, all_b)``. Each local item's logits against all ``2B`` items, itself
    excluded; positives: the other items with the same id (mean over them, SupCon's L_out; with
    unique ids exactly SimCLR's single positive).
    """
    n, big_b = a.shape[0], all_a.shape[0]
    items = torch.cat([all_a, all_b])
    item_ids = torch.cat([all_ids, all_ids])
    rows = torch.cat([a, b])
    row_ids = torch.cat([local_ids, local_ids])
    own = torch.arange(n, device=a.device) + offset
    self_col = torch.cat([own, own + big_b])
    is_self = torch.zeros(2 * n, 2 * big_b, dtype=torch.bool, device=a.device)
    is_self[torch.arange(2 * n, device=a.device), self_col] = True
    logits = ((scale * rows) @ items.T).masked_fill(is_self, -torch.inf)
    positive = (row_ids[:, None] == item_ids[None, :]) & ~is_self
    return _rows_loss(logits, positive, "mean")


class NTXentLoss(_Rows):
    """SimCLR's NT-Xent over images and texts together, at the model's temperature."""

    def forward(self, image, text, logit_scale, logit_bias=None, *, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        all_image, all_text, local_ids, all_ids, offset = self.gathered(image, text, ids)
        scale = _as_scale(logit_scale, image)
        loss = nt_xent(image, text, all_image, all_text, scale, local_ids, all_ids, offset)
        return _keep_in_graph(loss, logit_bias)


# --------------------------------------------------------------------------------------------- #
# Contrastive BCE
# --------------------------------------------------------------------------------------------- #


class ContrastiveBCELoss(_Rows):
    """Mean binary cross-entropy over all image-text pairs; positives by id."""

    def __init__(self, pos_weight: float = 1.0, **dist: object) -> None:
        super().__init__(**dist)  # type: ignore[arg-type]
        if pos_weight <= 0:
            raise ConfigError(f"loss 'bce': option 'pos_weight' must be > 0, got {pos_weight}")
        self.pos_weight = float(pos_weight)

    def forward(self, image, text, logit_scale, logit_bias=None, *, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        _, all_text, local_ids, all_ids, _ = self.gathered(image, text, ids)
        logits = (_as_scale(logit_scale, image) * image) @ all_text.T
        if logit_bias is not None:
            logits = logits + logit_bias
        target = (local_ids[:, None] == all_ids[None, :]).to(logits.dtype)
        weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        total = F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="sum")
        return total / (image.shape[0] * all_text.shape[0])
