"""Tiny instances of open_clip's timm-built families, for tests, demos and CPU smoke runs.

Each entry keeps its family's structure exactly as ``config_from_open_clip`` maps the real
config (same timm model, ``timm_pool``/``timm_proj``, SigLIP's bidirectional last-token text
tower with projection bias, logit bias) and shrinks only the sizes, through
``vision.timm_kwargs`` for the timm trunk and small widths for the text tower. They use CLIP's
BPE tokenizer: the families' own tokenizers (T5 / Gemma SentencePiece) live on the Hugging Face
hub, and a registered entry must build offline. Multilingual (Hugging Face) text towers have no
entry here for the same reason; tests build those from a tiny local ``transformers`` config.
"""

from __future__ import annotations

import math

from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig

#: timm kwargs that shrink a ViT-style trunk to 2 blocks of width 64 on 32x32 inputs (16 patches).
_TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
_SIGLIP_LOGITS = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}


def _text(**kw) -> TextConfig:
    return TextConfig(width=64, heads=2, layers=2, **kw)


def _siglip_text(**kw) -> TextConfig:
    """SigLIP's text tower: bidirectional, last-token pooling, projection bias, eps 1e-6."""
    return _text(no_causal_mask=True, pool_type="last", proj_bias=True, norm_eps=1e-6, **kw)


def _timm(name: str, image_size: int, pool: str, proj: str, kwargs: dict, **extra) -> VisionConfig:
    return VisionConfig(
        image_size=image_size, timm_model_name=name, timm_pool=pool, timm_proj=proj,
        timm_kwargs=dict(kwargs), **extra,
    )  # fmt: skip


def tiny_configs() -> dict[str, CLIPConfig]:
    """name -> config for every tiny family instance (fresh objects on each call)."""
    siglip_vision = _timm("vit_base_patch16_siglip_224", 32, "map", "none", _TINY_VIT)
    return {
        # ViT-B-16-SigLIP: timm MAP-pooled ViT, no projection (trunk width == embed_dim).
        "tiny-siglip": CLIPConfig(
            embed_dim=64, vision=siglip_vision, text=_siglip_text(), custom_text=True, **_SIGLIP_LOGITS
        ),
        # ViT-B-16-SigLIP2: the same image tower, GELU-tanh in the text tower.
        "tiny-siglip2": CLIPConfig(
            embed_dim=64,
            vision=_timm("vit_base_patch16_siglip_224", 32, "map", "none", _TINY_VIT),
            text=_siglip_text(act_approximate="tanh"),
            custom_text=True,
            **_SIGLIP_LOGITS,
        ),  # fmt: skip
        # convnext_base_w: timm ConvNeXt, its own pooling ('' keeps it), open_clip's linear head.
        "tiny-convnext": CLIPConfig(
            embed_dim=64,
            vision=_timm(
                "convnext_base",
                32,
                "",
                "linear",
                {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
                timm_drop_path=0.1,
            ),
            text=_text(),
        ),
        # EVA02-B-16: RoPE ViT, class-token pool, timm's classifier head as the projection.
        "tiny-eva02": CLIPConfig(
            embed_dim=64,
            vision=_timm("eva02_base_patch16_clip_224", 32, "token", "head", _TINY_VIT),
            text=_text(),
            custom_text=True,
        ),  # fmt: skip
        # MobileCLIP2-S0: FastViT MCi0 (RepMixer stages, attention last), timm's head, bidirectional text.
        "tiny-mobileclip": CLIPConfig(
            embed_dim=64,
            vision=_timm(
                "fastvit_mci0",
                32,
                "avg",
                "head",
                {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)},
                timm_drop_path=0.0,
            ),
            text=_text(no_causal_mask=True),
            custom_text=True,
        ),
        # PE-Core-B-16: timm's Perception Encoder ViT (RoPE, MAP pool), timm's head projects.
        "tiny-pe": CLIPConfig(
            embed_dim=64,
            vision=_timm("vit_pe_core_base_patch16_224", 32, "map", "head", _TINY_VIT),
            text=_text(context_length=32),
            custom_text=True,
        ),  # fmt: skip
    }


def register_tiny_models(register) -> None:
    """Register every tiny instance with ``register(name, config)`` (the registry's ``register_model``)."""
    for name, cfg in tiny_configs().items():
        register(name, cfg)
