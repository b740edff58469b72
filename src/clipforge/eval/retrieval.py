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

Memory: scores are produced in ``block_size x block_size`` tiles and reduced immediately, so a
100k x 500k similarity matrix never exists. Two passes over the tiles: the first finds each
query's best positive score, the second counts negatives at or above it. Both passes use the same
tiles, so the positive scores compared are bit-identical to the scores they are compared with.
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
    block_size: int = 4096,
    *,
    device: torch.device | str | None = None,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """Recall@K in both directions, mean/median rank.

    ``image_features [N_img, D]`` and ``text_features [N_txt, D]`` should be L2-normalised (the
    metric is a dot product). ``text_to_image [N_txt]`` gives the image index of every caption.
    Images without any caption are left out of the image->text metrics (with a warning).
    With ``return_ranks`` the per-query 1-based ranks are included as tensors.
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if text_to_image.numel() != n_txt:
        raise ValueError(f"text_to_image has {text_to_image.numel()} entries for {n_txt} captions")
    if n_txt and (text_to_image.min() < 0 or text_to_image.max() >= n_img):
        raise ValueError(f"text_to_image values must lie in [0, {n_img})")
    if image_features.shape[1:] != text_features.shape[1:]:
        raise ValueError(f"feature dims differ: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    device = torch.device(device) if device is not None else image_features.device
    image_ids = torch.arange(n_img)

    # text -> image ("image retrieval"): query key = its image, candidate key = image index
    t2i_ranks = query_ranks(text_features, image_features, text_to_image, image_ids, block_size, device)
    # image -> text ("text retrieval"): query key = image index, candidate key = caption's image
    i2t_ranks = query_ranks(image_features, text_features, image_ids, text_to_image, block_size, device)
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0
    if not bool(has_caption.all()):
        log.warning("%d of %d images have no caption; left out of text retrieval", int((~has_caption).sum()), n_img)
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


def query_ranks(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_keys: torch.Tensor,
    candidate_keys: torch.Tensor,
    block_size: int = 4096,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """1-based pessimistic rank of each query's best positive; candidate j is a positive of query
    i when ``query_keys[i] == candidate_keys[j]``. Queries without a positive get rank
    ``len(candidates) + 1``."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    device = torch.device(device) if device is not None else queries.device
    nq, nc = queries.shape[0], candidates.shape[0]
    ranks = torch.empty(nq, dtype=torch.long)
    for q0 in range(0, nq, block_size):
        q = queries[q0 : q0 + block_size].to(device, torch.float32)
        qk = query_keys[q0 : q0 + block_size].to(device)
        best = torch.full((q.shape[0],), float("-inf"), device=device)
        has_pos = torch.zeros(q.shape[0], dtype=torch.bool, device=device)
        for scores, pos in _tiles(q, qk, candidates, candidate_keys, block_size, device):
            best = torch.maximum(best, scores.masked_fill(~pos, float("-inf")).amax(dim=1))
            has_pos |= pos.any(dim=1)
        above = torch.zeros(q.shape[0], dtype=torch.long, device=device)
        for scores, pos in _tiles(q, qk, candidates, candidate_keys, block_size, device):
            above += ((scores >= best[:, None]) & ~pos).sum(dim=1)
        block_ranks = torch.where(has_pos, above + 1, torch.full_like(above, nc + 1))
        ranks[q0 : q0 + q.shape[0]] = block_ranks.cpu()
    return ranks


def _tiles(q, qk, candidates, candidate_keys, block_size, device):
    for c0 in range(0, candidates.shape[0], block_size):
        c = candidates[c0 : c0 + block_size].to(device, torch.float32)
        ck = candidate_keys[c0 : c0 + block_size].to(device)
        yield q @ c.T, qk[:, None] == ck[None, :]


def topk_retrieve(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int = 5,
    block_size: int = 4096,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k candidate indices and scores per query, merging per-tile top-k (for report grids and
    demo searches). Ties go to the lower candidate index."""
    device = torch.device(device) if device is not None else queries.device
    k = min(k, candidates.shape[0])
    out_idx, out_val = [], []
    for q0 in range(0, queries.shape[0], block_size):
        q = queries[q0 : q0 + block_size].to(device, torch.float32)
        best_val = torch.empty(q.shape[0], 0, device=device)
        best_idx = torch.empty(q.shape[0], 0, dtype=torch.long, device=device)
        for c0 in range(0, candidates.shape[0], block_size):
            s = q @ candidates[c0 : c0 + block_size].to(device, torch.float32).T
            idx = torch.arange(c0, c0 + s.shape[1], device=device).expand_as(s)
            vals, idxs = torch.cat([best_val, s], 1), torch.cat([best_idx, idx], 1)
            # stable sort by descending score keeps lower indices first among ties
            order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
            best_val, best_idx = vals.gather(1, order), idxs.gather(1, order)
        out_idx.append(best_idx.cpu())
        out_val.append(best_val.cpu())
    return torch.cat(out_idx), torch.cat(out_val)


def _recall(ranks: torch.Tensor, k: int) -> float:
    return int((ranks <= k).sum()) / ranks.numel() if ranks.numel() else 0.0


def _mean(ranks: torch.Tensor) -> float:
    return int(ranks.sum()) / ranks.numel() if ranks.numel() else 0.0


def _median(ranks: torch.Tensor) -> float:
    return float(ranks.median()) if ranks.numel() else 0.0
