"""Named architectures.

Hyper-parameters follow the published models (OpenAI CLIP and open_clip's configs), so weights
released for a name load into the model built from that name. Tiny entries keep the structure of
the real towers at a size the test suite and the CPU demo can afford.
"""

from __future__ import annotations

import difflib

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig

_REGISTRY: dict[str, CLIPConfig] = {}


def register_model(name: str, config: CLIPConfig) -> None:
    """Add an architecture; user code can register its own before calling ``create_model``."""
    _REGISTRY[name] = config.validate()


def list_models() -> list[str]:
    return sorted(_REGISTRY, key=_natural_key)


def get_model_config(name: str) -> CLIPConfig:
    """A fresh copy, so callers may mutate it without touching the registry.

    ``name`` may also be a ``*.json`` file (clipforge's or open_clip's model config), so every
    place that takes an architecture name takes a file too.
    """
    from clipforge.model.architecture import is_config_file, read_config_file

    if is_config_file(name):
        return read_config_file(name)
    key = name.removesuffix("-quickgelu")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"Unknown model {name!r}.{hint} Known models: {', '.join(list_models())}")
    cfg = CLIPConfig.from_dict(_REGISTRY[key].to_dict())
    if name.endswith("-quickgelu"):
        cfg.quick_gelu = True
    return cfg


def _natural_key(name: str) -> tuple:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _text(width: int, heads: int, layers: int = 12) -> TextConfig:
    return TextConfig(width=width, heads=heads, layers=layers)


def _vit(
    embed: int, width: int, layers: int, patch: int, text: TextConfig, image: int = 224, **kw
) -> CLIPConfig:
    vision = VisionConfig(image_size=image, patch_size=patch, width=width, layers=layers, **kw)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


def _rn(
    embed: int, layers: tuple[int, int, int, int], width: int, image: int, text: TextConfig
) -> CLIPConfig:
    vision = VisionConfig(image_size=image, patch_size=None, width=width, layers=layers)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


# --- modified ResNets (OpenAI) ------------------------------------------------------------------
register_model("RN50", _rn(1024, (3, 4, 6, 3), 64, 224, _text(512, 8)))
register_model("RN101", _rn(512, (3, 4, 23, 3), 64, 224, _text(512, 8)))
register_model("RN50x4", _rn(640, (4, 6, 10, 6), 80, 288, _text(640, 10)))
register_model("RN50x16", _rn(768, (6, 8, 18, 8), 96, 384, _text(768, 12)))
register_model("RN50x64", _rn(1024, (3, 15, 36, 10), 128, 448, _text(1024, 16)))

# --- vision transformers ------------------------------------------------------------------------
register_model("ViT-B-32", _vit(512, 768, 12, 32, _text(512, 8)))
register_model("ViT-B-16", _vit(512, 768, 12, 16, _text(512, 8)))
register_model("ViT-L-14", _vit(768, 1024, 24, 14, _text(768, 12)))
register_model("ViT-L-14-336", _vit(768, 1024, 24, 14, _text(768, 12), image=336))
register_model("ViT-H-14", _vit(1024, 1280, 32, 14, _text(1024, 16, 24), head_width=80))
register_model("ViT-g-14", _vit(1024, 1408, 40, 14, _text(1024, 16, 24), head_width=88, mlp_ratio=4.3637))
register_model("ViT-bigG-14", _vit(1280, 1664, 48, 14, _text(1280, 20, 32), head_width=104, mlp_ratio=4.9231))

# --- tiny sizes for tests and the CPU demo (same structure, small widths) ----------------------
register_model(
    "tiny-vit",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
)
register_model(
    "tiny-rn",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=None, width=16, layers=(1, 1, 1, 1)),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
)
register_model(
    "tiny-vit-siglip",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=TextConfig(width=64, heads=2, layers=2),
        init_logit_scale=2.302585092994046,  # log(10), as in SigLIP
        init_logit_bias=-10.0,
    ),
)


# --- CoCa (open_clip's coca_* configs): attention-pooled image tower, class-token text tower, decoder --
def _coca(
    embed: int, width: int, layers: int, patch: int, text_width: int, text_heads: int, pool_heads: int = 8
) -> CLIPConfig:
    vision = VisionConfig(
        image_size=224, patch_size=patch, width=width, layers=layers, attentional_pool=True,
        attn_pooler_heads=pool_heads,
    )
    text = TextConfig(context_length=76, width=text_width, heads=text_heads, layers=12, embed_cls=True)
    decoder = MultimodalConfig(width=text_width, heads=text_heads, layers=12, context_length=76)
    return CLIPConfig(embed_dim=embed, vision=vision, text=text, multimodal=decoder)


register_model("coca_ViT-B-32", _coca(512, 768, 12, 32, 512, 8))
register_model("coca_ViT-L-14", _coca(768, 1024, 24, 14, 768, 12))
register_model(
    "tiny-coca",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(
            image_size=32, patch_size=8, width=64, layers=2, head_width=32, attentional_pool=True,
            attn_pooler_queries=8, attn_pooler_heads=2,
        ),
        text=TextConfig(context_length=32, width=64, heads=2, layers=2, embed_cls=True),
        multimodal=MultimodalConfig(width=64, heads=2, layers=2, context_length=32),
    ),
)

# --- tiny instances of the timm-built families (SigLIP, ConvNeXt, EVA-02, MobileCLIP, PE) -------
from clipforge.model.zoo_tiny import register_tiny_models  # noqa: E402

register_tiny_models(register_model)
