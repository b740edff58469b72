"""Image<->text retrieval metrics with several captions per image, computed in blocks.

Conventions (the same names as CLIP_benchmark):

* ``image_retrieval_recall@K``: text queries retrieve images; a text is a hit when its own image
  is among the top K images.
* ``text_retrieval_recall@K``: image queries retrieve captions; an image is a hit when ANY of
  its captions is among the top K captions (COCO/Flickr protocol).

Rank of a query = 1 + the number of non-matching candidates whose score is greater than OR EQUAL
to the best matching candidate's score. Ties therefore count against the model ("pessimistic"
ranks): a collapsed model whose scores are all equal gets recall ~0, never 1. Without exact ties
this is identical to CLIP_benchmark's top-k definition (hit iff a positive is in ``topk``),
whose tie-breaking is left to ``torch.topk`` and is therefore unspecified. Recall@K is
``rank <= K``; mean and median rank follow open_clip (median of an even count = the lower
middle value).

Memory: queries are processed in blocks of ``block_size`` rows; each block's scores against all
candidates (``block_size x N``, one matrix product) are reduced to ranks at once and dropped, so
a 100k x 500k similarity matrix never exists. The default block size keeps a block under
``2**26`` scores (256 MiB in float32). Positive scores are read out of the same block matrix
they are compared with, so ties are judged on bit-identical numbers, and positives are kept as a
sparse (query, candidate) pair list: no dense mask is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int | None = None,
    *,
    device: torch.device | str | None = None,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Recall@K in both directions, mean/median rank.

    ``image_features [N_img, D]`` and ``text_features [N_txt, D]`` should be L2-normalised (the
    metric is a dot product). ``text_to_image [N_txt]`` gives the image index of every caption.
    ``block_size`` is the number of query rows scored at once (default: memory-bounded).
    Images without any caption are left out of the image->text metrics (with a warning).
    With ``return_ranks`` the per-query 1-based ranks are included as tensors.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1).cpu()
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image.numel() != n_txt:
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {n_txt} captions")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image values must lie in [0, {n_img})")
    if image_features.shape[1:] != text_features.shape[1:]:
        raise ValueError(
            f"feature dims differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}"
        )
    device = torch.device(device) if device is not None else image_features.device
    text_ids = torch.arange(n_txt)

    # text -> image ("image retrieval"): positive pairs (text t, image t2i[t]), sorted by text
    t2i_ranks = query_ranks(text_features, image_features, text_ids, text_to_image, block_size, device)
    # image -> text ("text retrieval"): pairs (image, caption) sorted by image
    order = torch.argsort(text_to_image, stable=True)
    i2t_ranks = query_ranks(image_features, text_features, text_to_image[order], order, block_size, device)
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0
    if not bool(has_caption.all()):
        log.warning(
            "%d of %d images have no caption; left out of text retrieval", int((~has_caption).sum()), n_img
        )
    i2t_valid = i2t_ranks[has_caption]

    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = _recall(t2i_ranks, k)
        metrics[f"text_retrieval_recall@{k}"] = _recall(i2t_valid, k)
    metrics["image_retrieval_mean_rank"] = _mean(t2i_ranks)
    metrics["image_retrieval_median_rank"] = _median(t2i_ranks)
    metrics["text_retrieval_mean_rank"] = _mean(i2t_valid)
    metrics["text_retrieval_median_rank"] = _median(i2t_valid)
    metrics["num_images"] = n_img
    metrics["num_texts"] = n_txt
    if return_ranks:
        metrics["image_retrieval_ranks"] = t2i_ranks
        metrics["text_retrieval_ranks"] = i2t_ranks
    return metrics


def default_block_size(num_candidates: int, max_scores: int = 2**26) -> int:
    return max(1, min(8192, max_scores // max(num_candidates, 1)))


def query_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    pos_query: torch.Tensor,
    pos_candidate: torch.Tensor,
    block_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """1-based pessimistic rank of each query's best positive.

    Positives are the pairs ``(pos_query[p], pos_candidate[p])``, with ``pos_query`` sorted
    ascending. Queries without a positive get rank ``len(candidates) + 1``.
    """
    block_size = block_size or default_block_size(candidates.shape[0])
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    device = torch.device(device) if device is not None else queries.device
    pos_query = torch.as_tensor(pos_query, dtype=torch.long).cpu()
    pos_candidate = torch.as_tensor(pos_candidate, dtype=torch.long).cpu()
    if pos_query.numel() > 1 and bool((pos_query[1:] < pos_query[:-1]).any()):
        raise ValueError("pos_query must be sorted ascending")
    nq, nc = queries.shape[0], candidates.shape[0]
    cand = candidates.to(device, torch.float32)
    ranks = torch.full((nq,), nc + 1, dtype=torch.long)
    for q0 in range(0, nq, block_size):
        q1 = min(q0 + block_size, nq)
        lo, hi = torch.searchsorted(pos_query, torch.tensor([q0, q1])).tolist()
        if lo == hi:
            continue  # no positives in this block: ranks stay at N + 1
        scores = queries[q0:q1].to(device, torch.float32) @ cand.T  # [b, N]
        rows = (pos_query[lo:hi] - q0).to(device)
        pos_scores = scores[rows, pos_candidate[lo:hi].to(device)]
        best = torch.full((q1 - q0,), float("-inf"), device=device)
        best = best.scatter_reduce(0, rows, pos_scores, reduce="amax")
        at_or_above = (scores >= best[:, None]).sum(dim=1)
        # positives at or above the best (the best itself, plus tied positives) are not negatives
        pos_above = torch.zeros(q1 - q0, dtype=torch.long, device=device)
        pos_above = pos_above.scatter_add(0, rows, (pos_scores >= best[rows]).long())
        has_pos = torch.isfinite(best)
        block_ranks = at_or_above - pos_above + 1
        ranks[q0:q1] = torch.where(has_pos, block_ranks, torch.full_like(block_ranks, nc + 1)).cpu()
        del scores  # free this block before the next one is allocated
    return ranks


def topk_retrieve(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int = 5,
    block_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidate indices and scores per query (for report grids and demo searches).
    Ties go to the lower candidate index (stable sort)."""
    device = torch.device(device) if device is not None else queries.device
    block_size = block_size or default_block_size(candidates.shape[0])
    k = min(k, candidates.shape[0])
    cand = candidates.to(device, torch.float32)
    out_idx, out_val = [], []
    for q0 in range(0, queries.shape[0], block_size):
        scores = queries[q0 : q0 + block_size].to(device, torch.float32) @ cand.T
        vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
        out_idx.append(idx[:, :k].cpu())
        out_val.append(vals[:, :k].cpu())
    return torch.cat(out_idx), torch.cat(out_val)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return int((ranks <= k).sum()) / ranks.numel() if ranks.numel() else 0.0


def _mean(ranks: torch.Tensor) -> float:
    return int(ranks.sum()) / ranks.numel() if ranks.numel() else 0.0


def _median(ranks: torch.Tensor) -> float:
    return float(ranks.median()) if ranks.numel() else 0.0
