"""Image<->text retrieval metrics with several captions per image, computed in blocks.

Three families of keys, each meaning what the tool it is named after computes on the same
features:

* CLIP_benchmark's names, ``image_retrieval_recall@K`` (text queries retrieve images) and
  ``text_retrieval_recall@K`` (image queries retrieve captions; an image is a hit when ANY of its
  captions is retrieved): a query is a hit when a positive is among the indices ``torch.topk``
  returns for K, called on the same float32 scores, on the same device, once per K, exactly as
  ``clip_benchmark.metrics.zeroshot_retrieval.recall_at_k`` does. Tied scores at the K-th place
  are therefore broken however ``torch.topk`` breaks them (on CPU that depends on libstdc++'s
  ``nth_element``/``partial_sort``, not on the index order), so no rule is re-implemented here:
  ``topk`` itself is asked. Scores are the rows (text queries) or columns (image queries) of the
  one text-major product ``texts @ images.T``, as in CLIP_benchmark. Images without a caption
  count as misses in the denominator, as in CLIP_benchmark.
* open_clip's names, ``image_to_text_R@K`` / ``text_to_image_R@K`` / ``..._mean_rank`` /
  ``..._median_rank`` (K = 1, 5, 10), only for one caption per image (image i <-> text i), the
  only case ``open_clip_train.train.get_clip_metrics`` defines: the rank is the position of the
  ground truth in ``torch.argsort(logits, descending=True)`` on CPU with
  ``logits = (logit_scale * images) @ texts.T``, mean = mean + 1, median = floor(numpy median) +
  1. ``argsort`` is only run for the rows where the ground truth ties another score; elsewhere
  the position is the count of strictly greater scores, which is what any sort gives.
* clipforge's own, tie-independent keys: ``image_retrieval_pessimistic_recall@K``,
  ``text_retrieval_pessimistic_recall@K``, ``image_retrieval_mean_rank`` /
  ``..._median_rank`` (and ``text_retrieval_...``): rank = 1 + the number of non-matching
  candidates scoring greater than OR EQUAL to the best positive, so a collapsed model whose
  scores are all equal gets recall ~0, never 1; the median of an even count is the lower middle
  value; images without a caption are left out (with a warning).

Ties are reported: ``..._tied_queries`` counts queries whose best positive ties a negative,
``..._boundary_ties@K`` the queries whose recall@K hit depends on how ties are broken
(optimistic rank <= K < pessimistic rank). Without exact ties all three families agree.

Memory: queries are processed in blocks of ``block_size`` rows; each block's scores against all
candidates (``block_size x N``, one matrix product) are reduced at once and dropped, so a
100k x 500k similarity matrix never exists. The default block size keeps a block under
``2**26`` scores (256 MiB in float32). Positive scores are read out of the same block matrix
they are compared with, so ties are judged on bit-identical numbers, and positives are kept as a
sparse (query, candidate) pair list: no dense mask of the whole problem is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    logit_scale: float | torch.Tensor = 1.0,
) -> dict[str, Any]:
    """Recall@K in both directions under CLIP_benchmark's, clipforge's pessimistic and (for one
    caption per image) open_clip's names, plus tie counts; see the module doc for each.

    ``image_features [N_img, D]`` and ``text_features [N_txt, D]`` should be L2-normalised (the
    metric is a dot product). ``text_to_image [N_txt]`` gives the image index of every caption.
    ``block_size`` is the number of query rows scored at once (default: memory-bounded).
    ``logit_scale`` only enters open_clip's keys (its logits are ``scale * image @ text.T``).
    With ``return_ranks`` the per-query 1-based pessimistic ranks are included as tensors.
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
    t2i = _query_stats(text_features, image_features, text_ids, text_to_image, ks, block_size, device)
    # image -> text ("text retrieval"): pairs (image, caption) sorted by image; the scores are the
    # columns of the same text-major product, as CLIP_benchmark reads ``scores.T``
    order = torch.argsort(text_to_image, stable=True)
    i2t = _query_stats(
        image_features, text_features, text_to_image[order], order, ks, block_size, device, transposed=True
    )
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0
    if not bool(has_caption.all()):
        log.warning(
            "%d of %d images have no caption: misses in text_retrieval_recall@K (as in CLIP_benchmark), "
            "left out of the pessimistic keys and ranks",
            int((~has_caption).sum()),
            n_img,
        )
    metrics: dict[str, Any] = {}
    for prefix, stats, valid in (("image", t2i, None), ("text", i2t, has_caption)):
        metrics.update(_direction_metrics(f"{prefix}_retrieval", stats, ks, valid))
    metrics["num_images"] = n_img
    metrics["num_texts"] = n_txt
    if n_img == n_txt and torch.equal(text_to_image, text_ids):
        metrics.update(open_clip_metrics(image_features, text_features, logit_scale, block_size))
    if return_ranks:
        metrics["image_retrieval_ranks"] = t2i.pessimistic
        metrics["text_retrieval_ranks"] = i2t.pessimistic
    return metrics


def _direction_metrics(
    prefix: str, stats: _QueryStats, ks: Sequence[int], valid: torch.Tensor | None
) -> dict[str, Any]:
    """One direction's keys. CLIP_benchmark's recall averages over every query; the pessimistic
    keys and ranks over the queries in ``valid`` (those with a positive)."""
    pess = stats.pessimistic if valid is None else stats.pessimistic[valid]
    opt = stats.optimistic if valid is None else stats.optimistic[valid]
    out: dict[str, Any] = {}
    n = stats.pessimistic.numel()
    for k in ks:  # a float32 mean, as CLIP_benchmark's ``(recall > 0).float().mean().item()``
        out[f"{prefix}_recall@{k}"] = stats.topk_hits[k].float().mean().item() if n else 0.0
    for k in ks:
        out[f"{prefix}_pessimistic_recall@{k}"] = _recall(pess, k)
    out[f"{prefix}_mean_rank"] = _mean(pess)
    out[f"{prefix}_median_rank"] = _median(pess)
    out[f"{prefix}_tied_queries"] = int((opt != pess).sum())
    for k in ks:
        out[f"{prefix}_boundary_ties@{k}"] = int(((opt <= k) & (pess > k)).sum())
    return out


def default_block_size(num_candidates: int, max_scores: int = 2**26) -> int:
    return max(1, min(8192, max_scores // max(num_candidates, 1)))


@dataclass
class _QueryStats:
    """Per query: pessimistic rank (ties count against it), optimistic rank (ties count for
    it), and for each K whether ``torch.topk(scores, K)`` returned one of its positives."""

    pessimistic: torch.Tensor
    optimistic: torch.Tensor
    topk_hits: dict[int, torch.Tensor] = field(default_factory=dict)


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
    device = torch.device(device) if device is not None else queries.device
    return _query_stats(queries, candidates, pos_query, pos_candidate, (), block_size, device).pessimistic


def _query_stats(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    pos_query: torch.Tensor,
    pos_candidate: torch.Tensor,
    ks: Sequence[int],
    block_size: int | None,
    device: torch.device,
    transposed: bool = False,
) -> _QueryStats:
    """Ranks and top-K hits of every query, one block of queries at a time. With ``transposed``
    a block's scores are ``(candidates @ block.T).T``: the same numbers as the other direction's
    product, so both directions judge ties on one matrix (CLIP_benchmark's ``scores.T``)."""
    block_size = block_size or default_block_size(candidates.shape[0])
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    pos_query = torch.as_tensor(pos_query, dtype=torch.long).cpu()
    pos_candidate = torch.as_tensor(pos_candidate, dtype=torch.long).cpu()
    if pos_query.numel() > 1 and bool((pos_query[1:] < pos_query[:-1]).any()):
        raise ValueError("pos_query must be sorted ascending")
    nq, nc = queries.shape[0], candidates.shape[0]
    cand = candidates.to(device, torch.float32)
    stats = _QueryStats(
        torch.full((nq,), nc + 1, dtype=torch.long),
        torch.full((nq,), nc + 1, dtype=torch.long),
        {k: torch.zeros(nq, dtype=torch.bool) for k in ks},
    )
    for q0 in range(0, nq, block_size):
        q1 = min(q0 + block_size, nq)
        lo, hi = torch.searchsorted(pos_query, torch.tensor([q0, q1])).tolist()
        if lo == hi:
            continue  # no positives in this block: ranks stay at N + 1, no hits
        block = queries[q0:q1].to(device, torch.float32)
        scores = (cand @ block.T).T if transposed else block @ cand.T  # [b, N]
        rows = (pos_query[lo:hi] - q0).to(device)
        cols = pos_candidate[lo:hi].to(device)
        _block_ranks(stats, q0, q1, scores, rows, cols)
        for k in ks:
            stats.topk_hits[k][q0:q1] = _topk_hits(scores, rows, cols, k).cpu()
        del scores  # free this block before the next one is allocated
    return stats


def _block_ranks(
    stats: _QueryStats, q0: int, q1: int, scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> None:
    """Pessimistic and optimistic ranks of the best positive of each query of one block."""
    nc = scores.shape[1]
    pos_scores = scores[rows, cols]
    best = torch.full((q1 - q0,), float("-inf"), device=scores.device)
    best = best.scatter_reduce(0, rows, pos_scores, reduce="amax")
    at_or_above = (scores >= best[:, None]).sum(dim=1)
    above = (scores > best[:, None]).sum(dim=1)  # all negatives: no positive beats the best
    # positives at or above the best (the best itself, plus tied positives) are not negatives
    pos_above = torch.zeros(q1 - q0, dtype=torch.long, device=scores.device)
    pos_above = pos_above.scatter_add(0, rows, (pos_scores >= best[rows]).long())
    has_pos = torch.isfinite(best)
    none = torch.full_like(above, nc + 1)
    stats.pessimistic[q0:q1] = torch.where(has_pos, at_or_above - pos_above + 1, none).cpu()
    stats.optimistic[q0:q1] = torch.where(has_pos, above + 1, none).cpu()


def _topk_hits(scores: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, k: int) -> torch.Tensor:
    """CLIP_benchmark's hit: a positive is among ``torch.topk(scores, k).indices`` of its row.
    ``topk`` is called with this very ``k`` (its tie choice may differ between k's) on the same
    scores; ``k`` beyond the number of candidates means all of them (CLIP_benchmark would fail)."""
    b, nc = scores.shape
    top = torch.topk(scores, min(k, nc), dim=1).indices
    in_top = torch.zeros(b, nc, dtype=torch.bool, device=scores.device).scatter_(1, top, True)
    hit = torch.zeros(b, dtype=torch.long, device=scores.device)
    return hit.scatter_reduce(0, rows, in_top[rows, cols].long(), reduce="amax").bool()


def open_clip_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor = 1.0,
    block_size: int | None = None,
) -> dict[str, float]:
    """open_clip_train's ``get_clip_metrics`` for image i <-> text i, computed in blocks on CPU:
    ``{image_to_text,text_to_image}_{mean_rank,median_rank,R@1,R@5,R@10}``."""
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(
            f"open_clip metrics pair image i with text i: {n} images, {text_features.shape[0]} texts"
        )
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).detach().cpu()
    img = scale * image_features.detach().cpu().float()
    txt = text_features.detach().cpu().float()
    block_size = block_size or default_block_size(n)
    out: dict[str, float] = {}
    for name in ("image_to_text", "text_to_image"):
        preds = torch.empty(n, dtype=torch.long)
        for q0 in range(0, n, block_size):
            q1 = min(q0 + block_size, n)
            # rows of logits_per_image, or of its transpose (= columns of the same product)
            logits = img[q0:q1] @ txt.T if name == "image_to_text" else (img @ txt[q0:q1].T).T
            preds[q0:q1] = _argsort_positions(logits, torch.arange(q0, q1))
        out.update(_open_clip_summary(name, preds))
    return out


def _argsort_positions(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """0-based position of ``truth[r]`` in ``torch.argsort(logits[r], descending=True)``. Only
    rows where the truth ties another score are sorted; elsewhere any sort puts it after exactly
    the strictly greater scores."""
    rows = torch.arange(logits.shape[0])
    gt = logits[rows, truth]
    pos = (logits > gt[:, None]).sum(dim=1)
    tied = ((logits == gt[:, None]).sum(dim=1) > 1).nonzero().flatten()
    if tied.numel():
        order = torch.argsort(logits[tied], dim=1, descending=True)
        pos[tied] = (order == truth[tied][:, None]).long().argmax(dim=1)
    return pos


def _open_clip_summary(name: str, preds: torch.Tensor) -> dict[str, float]:
    """open_clip's reductions of 0-based positions: mean + 1, floor(numpy median) + 1, and
    R@K = share of positions < K for K in (1, 5, 10)."""
    n = preds.numel()
    if not n:
        return {}
    ordered = torch.sort(preds).values.tolist()
    mid = n // 2
    median = ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) // 2  # floor of the mean
    out = {f"{name}_mean_rank": int(preds.sum()) / n + 1, f"{name}_median_rank": float(median + 1)}
    for k in (1, 5, 10):
        out[f"{name}_R@{k}"] = int((preds < k).sum()) / n
    return out


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
