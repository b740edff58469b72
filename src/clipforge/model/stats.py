"""Parameter counts and FLOPs per image / per text, without allocating any weights.

Parameters are counted on a model built on the ``meta`` device (ViT-bigG costs nothing).
FLOPs are computed from closed-form formulas over the config, counting one multiply-add as one
FLOP (the fvcore convention behind open_clip's published tables, so the figures are comparable)
and only matmuls/convolutions/attention products; the test suite checks these formulas against
:class:`torch.utils.flop_counter.FlopCounterMode` on real forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig


@dataclass
class ModelStats:
    image_params: int
    text_params: int
    total_params: int
    image_gflops: float
    text_gflops: float


def count_params(config: CLIPConfig) -> tuple[int, int, int]:
    """(image tower, text tower, total) parameter counts; total includes logit scale/bias."""
    from clipforge.model.build import build_model

    with torch.device("meta"):
        model = build_model(config)
    image = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.text.parameters())
    return image, text, sum(p.numel() for p in model.parameters())


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)
    per_block = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * hidden
    return layers * per_block


def vit_macs(cfg: VisionConfig, embed_dim: int) -> int:
    grid, patch, width = cfg.grid_size, cfg.patch_size, cfg.width
    patch_embed = grid * grid * width * 3 * patch * patch
    return (
        patch_embed + _transformer_macs(grid * grid + 1, width, cfg.layers, cfg.mlp_ratio) + width * embed_dim
    )


def resnet_macs(cfg: VisionConfig, embed_dim: int) -> int:
    width, res = cfg.width, cfg.image_size // 2
    half = width // 2
    macs = res * res * 9 * (3 * half + half * half + half * width)  # 3-conv stem at 1/2 resolution
    res //= 2  # stem average pool
    inplanes = width
    for stage, depth in enumerate(cfg.layers):
        planes = width * 2**stage
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            out_res = res // stride
            macs += res * res * (inplanes * planes + 9 * planes * planes)  # conv1, conv2
            macs += out_res * out_res * planes * planes * 4  # conv3 after the anti-aliasing pool
            if block == 0 and (stride > 1 or inplanes != planes * 4):
                macs += out_res * out_res * inplanes * planes * 4  # downsample conv
            inplanes, res = planes * 4, out_res
    channels, tokens = width * 32, res * res + 1
    # Attention pool: k/v over all tokens, q for the single pooled query, then the output proj.
    macs += (
        2 * tokens * channels * channels + channels * channels + 2 * tokens * channels + channels * embed_dim
    )
    return macs


def text_macs(cfg: TextConfig, embed_dim: int, length: int | None = None) -> int:
    """MACs for one text of ``length`` tokens (default: the full context, as published tables do)."""
    tokens = length or cfg.context_length
    return _transformer_macs(tokens, cfg.width, cfg.layers, cfg.mlp_ratio) + cfg.width * embed_dim


def gflops(config: CLIPConfig) -> tuple[float, float]:
    """(per image, per text) GFLOPs; NaN for timm / Hugging Face towers (not modelled)."""
    v, t = config.vision, config.text
    if v.timm_model_name:
        image = float("nan")
    elif v.is_resnet:
        image = resnet_macs(v, config.embed_dim) / 1e9
    else:
        image = vit_macs(v, config.embed_dim) / 1e9
    text = float("nan") if t.hf_model_name else text_macs(t, config.embed_dim) / 1e9
    return image, text


def model_stats(config: CLIPConfig) -> ModelStats:
    image_p, text_p, total = count_params(config)
    image_f, text_f = gflops(config)
    return ModelStats(image_p, text_p, total, image_f, text_f)
