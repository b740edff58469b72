"""Packed text encoding: compute each caption's tokens, not the batch's longest caption's.

A padded batch is trimmed to its longest caption (``TextTransformer.forward``), but one long
caption still makes every short one cost as much. Two exact rearrangements remove that waste:

* **packed rows**: several captions laid end to end in one sequence, each with its own position
  ids (restarting at 0) and a block-diagonal causal mask, so no caption sees another. Every
  caption's EOT state is then exactly what it is alone; only float summation order changes.
* **length-sorted micro-batches**: captions sorted by length and cut into groups, each trimmed to
  its own longest caption and run with the ordinary causal kernel.

:func:`choose` prices the plain batch and both rearrangements with a cost model (the linear
layers' work per token, attention's per row, and a fixed cost per call that stands for kernel
launches and Python) and :func:`encode` runs the cheapest. Only inference uses it (the tower is in
eval mode), so training keeps its exact numbers, and ``forward_hidden`` (every token's states,
what conditioning reads) never goes through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipforge.model import prepack

#: Longest packed row: attention grows with the square of it, the linear layers do not.
MAX_ROW = 256
#: Fixed cost of one call, in tokens of linear-layer work: a matrix product over few rows is
#: bound by reading the weights (and on an accelerator by launching kernels), so a call costs at
#: least about this many tokens whatever it computes. Measured on a 2-core CPU: 57 tokens took as
#: long as ~100 in one call.
CALL_TOKENS = {"cpu": 96, "cuda": 2048}
#: Extra price of attention under an explicit mask (no fused causal kernel) relative to causal.
MASK_PENALTY = 2.0


@dataclass
class Plan:
    """What to run: ``kind`` "plain", "sorted" (``groups`` of caption indices) or "packed"
    (``rows`` of caption indices, each at most ``row_length`` tokens); ``cost`` is the estimate."""

    kind: str
    cost: float
    groups: list[list[int]] | None = None
    rows: list[list[int]] | None = None
    row_length: int = 0


def _cost(rows: int, length: int, width: int, layers: int, call: float, masked: bool = False) -> float:
    """Multiply-adds of one call over ``rows`` x ``length`` tokens, the fixed cost of a call
    (``call`` tokens' worth) included (per the module doc)."""
    linear = (rows * length + call) * 12 * width * width
    attention = rows * length * length * 2 * width * (MASK_PENALTY if masked else 1.0)
    return layers * (linear + attention)


def _sorted_groups(lengths: list[int], width: int, layers: int, call: float) -> tuple[float, list[list[int]]]:
    """Cheapest cut of the length-sorted captions into contiguous groups (dynamic programming
    over the distinct lengths, so at most ~77 x 77 steps whatever the batch size)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ends = [
        k + 1 for k in range(len(order)) if k + 1 == len(order) or lengths[order[k + 1]] != lengths[order[k]]
    ]
    best = [0.0] + [float("inf")] * len(ends)
    cut = [0] * (len(ends) + 1)
    for j in range(1, len(ends) + 1):
        hi = ends[j - 1]
        for i in range(j):
            lo = ends[i - 1] if i else 0
            c = best[i] + _cost(hi - lo, lengths[order[hi - 1]], width, layers, call)
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], len(ends)
    while j:
        i = cut[j]
        groups.append(order[(ends[i - 1] if i else 0) : ends[j - 1]])
        j = i
    return best[-1], groups[::-1]


def _packed_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: captions into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def choose(lengths: list[int], width: int, layers: int, device: str = "cpu") -> Plan:
    """The cheapest of plain / sorted micro-batches / packed rows for captions of ``lengths``."""
    call = CALL_TOKENS.get(device, CALL_TOKENS["cuda"])
    longest = max(lengths)
    best = Plan("plain", _cost(len(lengths), longest, width, layers, call))
    if len(lengths) < 2 or min(lengths) == longest:
        return best
    cost, groups = _sorted_groups(lengths, width, layers, call)
    if cost < best.cost and len(groups) > 1:
        best = Plan("sorted", cost, groups=groups)
    total = sum(lengths)
    # Rows as full as possible: capacities that split the tokens into k nearly equal rows.
    capacities = {max(longest, min(MAX_ROW, -(-total // k) + 2)) for k in range(1, 17)} | {longest}
    for capacity in sorted(capacities):
        rows = _packed_rows(lengths, capacity)
        used = max(sum(lengths[i] for i in row) for row in rows)
        cost = _cost(len(rows), used, width, layers, call, masked=True)
        if cost < best.cost and len(rows) < len(lengths):
            best = Plan("packed", cost, rows=rows, row_length=used)
    return best


def encode(tower: torch.nn.Module, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
    """Projected EOT features ``[B, E]`` of ``tokens`` as the cheapest plan computes them, or
    None when the plain trimmed batch is the cheapest (the caller runs it)."""
    lengths = (idx + 1).tolist()
    plan = choose(lengths, tower.width, len(tower.transformer.resblocks), tokens.device.type)
    if plan.kind == "plain":
        return None
    if plan.kind == "sorted":
        return _encode_sorted(tower, tokens, idx, plan.groups or [])
    return _encode_packed(tower, tokens, idx, plan.rows or [], plan.row_length)


def _encode_sorted(
    tower: torch.nn.Module, tokens: torch.Tensor, idx: torch.Tensor, groups: list[list[int]]
) -> torch.Tensor:
    out = None
    for group in groups:
        sel = torch.tensor(group, device=tokens.device)
        gi = idx[sel]
        feats = tower.encode_trimmed(tokens[sel, : int(gi.max()) + 1], gi)
        if out is None:
            out = feats.new_empty((tokens.shape[0], feats.shape[1]))
        out[sel] = feats
    return out


def _layout(
    rows: list[list[int]], lengths: list[int], row_length: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Where each caption goes: (its row, its first column) ``[B]`` each, and per packed token
    (flat destination, caption, position within the caption)."""
    n = len(lengths)
    row_of, start = [0] * n, [0] * n
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            row_of[i], start[i] = r, col
            col += lengths[i]
    row_t = torch.tensor(row_of, device=device)
    start_t = torch.tensor(start, device=device)
    n_t = torch.tensor(lengths, device=device)
    caption = torch.repeat_interleave(torch.arange(n, device=device), n_t)
    first = torch.cumsum(n_t, 0) - n_t
    pos = torch.arange(caption.numel(), device=device) - first[caption]
    dest = row_t[caption] * row_length + start_t[caption] + pos
    return row_t, start_t, dest, caption, pos


def _encode_packed(
    tower: torch.nn.Module, tokens: torch.Tensor, idx: torch.Tensor, rows: list[list[int]], row_length: int
) -> torch.Tensor:
    """Captions laid end to end in ``len(rows)`` sequences (see the module doc)."""
    device, ctx = tokens.device, tokens.shape[1]
    row_t, start_t, dest, caption, pos = _layout(rows, (idx + 1).tolist(), row_length, device)
    packed = torch.zeros(len(rows) * row_length, dtype=tokens.dtype, device=device)
    positions = torch.zeros_like(packed)
    segment = torch.full_like(packed, -1)
    packed[dest] = tokens.reshape(-1)[caption * ctx + pos]
    positions[dest], segment[dest] = pos, caption
    packed, positions, segment = (t.view(len(rows), row_length) for t in (packed, positions, segment))
    x = tower.token_embedding(packed)
    x = x + tower.positional_embedding[positions].to(x.dtype)
    causal = torch.ones(row_length, row_length, dtype=torch.bool, device=device).tril_()
    # Block-diagonal and causal; padding after the last caption sees only padding (no empty row).
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    blocks, linear = tower.transformer.resblocks, tower.fast_linear()
    for block in blocks[:-1]:
        x = (
            block(x, mask[:, None])
            if linear is None
            else prepack.block_forward(block, x, linear, mask[:, None])
        )
    cols = start_t + idx
    keys = torch.arange(row_length, device=device)
    key_mask = (keys[None, :] >= start_t[:, None]) & (keys[None, :] <= cols[:, None])
    # One query per caption, not one per row (why the block's own forward_at does not fit).
    pooled = prepack.block_at(
        blocks[-1], x, prepack.plain_linear if linear is None else linear, row_t, cols, key_mask
    )
    return tower.project(tower.ln_final(pooled))
