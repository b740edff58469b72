"""NaFlex forward for a SigLIP 2 timm tower: variable patch count, per-image position grid, masks.

A SigLIP 2 NaFlex checkpoint is the fixed-resolution timm ``vit_*_siglip_*`` trunk clipforge
already loads (its patch Linear stored as timm's conv, its square position table as timm's
``pos_embed``). Only the forward differs, and it needs no extra weights:

- patches arrive flattened as (row, column, channel): the conv weight is reordered to that Linear;
- the learned square table is resized to each image's (rows, columns) grid with bilinear,
  antialiased interpolation in float32 (what ``Siglip2VisionEmbeddings`` does), padding rows get 0;
- the 0/1 patch mask becomes an additive key mask for every block and for the MAP pooling head;
- the trunk's ``grad_checkpointing`` flag recomputes each block in backward, as timm's forward does.

open_clip's named NaFlex models (``ViT-B-16-SigLIP2-naflex``, ``ViT-SO400M-16-SigLIP2-naflex``) are
built as open_clip builds them, on timm's ``NaFlexVit`` (``embeds.proj`` Linear, ``(1, 16, 16, C)``
position grid), so their published weights load unchanged; that trunk does the same computation
itself and is handed the patches with each one's (row, column) instead of the grid shapes.

The input is the dict :mod:`clipforge.naflex_transforms` makes (``patches``, ``patch_mask``,
``spatial_shapes``); transformers' processor names (``pixel_values``, ``pixel_attention_mask``)
are accepted too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.errors import ConfigError

#: transformers' names for the same three inputs.
HF_NAMES = {"pixel_values": "patches", "pixel_attention_mask": "patch_mask"}


def naflex_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(patches, patch_mask, spatial_shapes)`` from clipforge's or transformers' key names."""
    named = {HF_NAMES.get(k, k): v for k, v in batch.items()}
    missing = [k for k in ("patches", "patch_mask", "spatial_shapes") if k not in named]
    if missing:
        raise ConfigError(f"NaFlex input lacks {missing}; it has {sorted(batch)}")
    return named["patches"], named["patch_mask"], torch.as_tensor(named["spatial_shapes"])


def _trunk(tower: nn.Module) -> nn.Module:
    trunk = getattr(tower, "trunk", None)
    if trunk is None or not hasattr(trunk, "patch_embed") or getattr(trunk, "attn_pool", None) is None:
        raise ConfigError(
            f"NaFlex needs a timm SigLIP trunk with a MAP head (attn_pool); {type(tower).__name__} has none"
        )
    if getattr(trunk, "num_prefix_tokens", 0):
        raise ConfigError("NaFlex needs a trunk without class/register tokens")
    return trunk


def resized_positions(pos_embed: torch.Tensor, shapes: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length, D) position embeddings: the square table resized to each image's grid."""
    table = pos_embed.reshape(-1, pos_embed.shape[-1])
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ConfigError(f"NaFlex needs a square position table; it has {table.shape[0]} rows")
    grid = table.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
    out = torch.zeros(len(shapes), length, table.shape[-1], dtype=pos_embed.dtype, device=pos_embed.device)
    for i, (h, w) in enumerate(shapes.tolist()):
        if h * w > length:
            raise ConfigError(f"image {i}: spatial shape {h}x{w} has more patches than the {length} given")
        resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        out[i, : h * w] = resized[0].reshape(table.shape[-1], h * w).T.to(pos_embed.dtype)
    return out


def _key_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) 0/1 -> (B, 1, 1, N) additive mask (dtype min where padded), as transformers builds it."""
    keep = mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def is_naflexvit(trunk: object) -> bool:
    """True for timm's ``NaFlexVit`` (its patch embedding is ``embeds``, not ``patch_embed``)."""
    return type(trunk).__name__ == "NaFlexVit" and hasattr(trunk, "embeds")


def patch_coords(mask: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) (row, column) of each patch in its image's grid, 0 for padding: what timm's
    NaFlex collator gives ``NaFlexVit`` where clipforge's batch has ``spatial_shapes``."""
    cols = shapes[:, 1:].to(mask.device)
    index = torch.arange(mask.shape[1], device=mask.device)[None]
    valid = mask.to(torch.bool)
    if not bool((index < shapes[:, :1].to(mask.device) * cols).eq(valid).all()):
        raise ConfigError("NaFlex patch_mask must mark the first rows*columns patches of each image")
    return torch.stack([(index // cols) * valid, (index % cols) * valid], dim=-1)


def _naflexvit_features(tower: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Features through a ``NaFlexVit`` trunk: it takes patches with coordinates and a validity mask."""
    patches, mask, shapes = naflex_inputs(batch)
    proj = tower.trunk.embeds.proj
    if patches.shape[-1] != proj.in_features:
        raise ConfigError(
            f"NaFlex patches have {patches.shape[-1]} values; the tower takes {proj.in_features}"
        )
    inputs = {
        "patches": patches.to(proj.weight.dtype),
        "patch_coord": patch_coords(mask, shapes),
        "patch_valid": mask.to(torch.bool),
    }
    return tower.head(tower.trunk(inputs))


def naflex_features(tower: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pooled, projected image features of a NaFlex batch through ``tower`` (a timm SigLIP tower,
    or a timm ``NaFlexVit`` one)."""
    if is_naflexvit(getattr(tower, "trunk", None)):
        return _naflexvit_features(tower, batch)
    trunk = _trunk(tower)
    patches, mask, shapes = naflex_inputs(batch)
    conv = trunk.patch_embed.proj
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)
    if patches.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"NaFlex patches have {patches.shape[-1]} values; the tower takes {weight.shape[1]}"
        )
    x = F.linear(patches.to(weight.dtype), weight, conv.bias)
    x = x + resized_positions(trunk.pos_embed, shapes, x.shape[1]).to(x.dtype)
    x = trunk.norm_pre(trunk.pos_drop(x))
    attn_mask = _key_mask(mask, x.dtype)
    # set_grad_checkpointing sets the trunk's flag; its own forward is bypassed here, so honour it
    recompute = getattr(trunk, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block in trunk.blocks:
        if recompute:
            x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    x = trunk.norm(x)
    x = trunk.attn_pool(x, attn_mask=attn_mask)
    x = trunk.head(trunk.head_drop(trunk.fc_norm(x)))
    return tower.head(x)
