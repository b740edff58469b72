"""Named pretrained weights: the tags open_clip users already type, as a table of facts.

Each entry says where the weights live on the Hugging Face Hub, which file holds them, and what
the weights need from the model and the preprocessing (QuickGELU for OpenAI-trained towers,
mean/std, resize mode). Those facts are the part other libraries lose when weights are loaded by
hand, so they travel with the tag. Repositories and preprocessing follow open_clip's published
pretrained list (tags are the same strings, so switching libraries needs no lookup).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from clipforge.errors import ConfigError
from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

#: Files open_clip writes to its Hub repositories; the safetensors one is preferred when present.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class PretrainedWeights:
    """Where one named set of weights lives and what it needs to be used correctly."""

    model: str
    tag: str
    hf_hub: str
    filenames: tuple[str, ...] = OPEN_CLIP_FILES
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"hf-hub:{self.hf_hub}"

    def preprocess_dict(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments for ``clipforge.transforms.PreprocessConfig``."""
        return {
            "image_size": image_size,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


_TABLE: dict[str, dict[str, PretrainedWeights]] = {}


def _add(model: str, tag: str, repo: str, **kw: Any) -> None:
    _TABLE.setdefault(model, {})[tag] = PretrainedWeights(model=model, tag=tag, hf_hub=repo, **kw)


def _openai(model: str, timm_name: str) -> None:
    _add(model, "openai", f"timm/{timm_name}.openai", quick_gelu=True, notes="OpenAI CLIP (WIT-400M)")


# --- modified ResNets -----------------------------------------------------------------------------
_openai("RN50", "resnet50_clip")
_add("RN50", "yfcc15m", "timm/resnet50_clip.yfcc15m", quick_gelu=True)
_add("RN50", "cc12m", "timm/resnet50_clip.cc12m", quick_gelu=True)
_openai("RN101", "resnet101_clip")
_add("RN101", "yfcc15m", "timm/resnet101_clip.yfcc15m", quick_gelu=True)
_openai("RN50x4", "resnet50x4_clip")
_openai("RN50x16", "resnet50x16_clip")
_openai("RN50x64", "resnet50x64_clip")

# --- ViT-B-32 -------------------------------------------------------------------------------------
_openai("ViT-B-32", "vit_base_patch32_clip_224")
_add("ViT-B-32", "laion400m_e31", "timm/vit_base_patch32_clip_224.laion400m_e31", quick_gelu=True)
_add("ViT-B-32", "laion400m_e32", "timm/vit_base_patch32_clip_224.laion400m_e32", quick_gelu=True)
_add("ViT-B-32", "laion2b_e16", "timm/vit_base_patch32_clip_224.laion2b_e16")
_add("ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
_add("ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K")
_add("ViT-B-32", "datacomp_m_s128m_b4k", "laion/CLIP-ViT-B-32-DataComp.M-s128M-b4K")
_add("ViT-B-32", "datacomp_s_s13m_b4k", "laion/CLIP-ViT-B-32-DataComp.S-s13M-b4K")
for _filt in ("clip", "laion", "image", "text", "basic", ""):
    _sfx = f".{_filt}" if _filt else ""
    _tag = f"_{_filt}" if _filt else ""
    _add("ViT-B-32", f"commonpool_m{_tag}_s128m_b4k", f"laion/CLIP-ViT-B-32-CommonPool.M{_sfx}-s128M-b4K")
    _add("ViT-B-32", f"commonpool_s{_tag}_s13m_b4k", f"laion/CLIP-ViT-B-32-CommonPool.S{_sfx}-s13M-b4K")
    _add("ViT-B-16", f"commonpool_l{_tag}_s1b_b8k", f"laion/CLIP-ViT-B-16-CommonPool.L{_sfx}-s1B-b8K")
_add("ViT-B-32", "metaclip_400m", "timm/vit_base_patch32_clip_224.metaclip_400m", quick_gelu=True)
_add("ViT-B-32", "metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", quick_gelu=True)

# --- ViT-B-16 -------------------------------------------------------------------------------------
_openai("ViT-B-16", "vit_base_patch16_clip_224")
_add("ViT-B-16", "laion400m_e31", "timm/vit_base_patch16_clip_224.laion400m_e31")
_add("ViT-B-16", "laion400m_e32", "timm/vit_base_patch16_clip_224.laion400m_e32")
_add("ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K")
_add("ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K")
_add("ViT-B-16", "datacomp_l_s1b_b8k", "laion/CLIP-ViT-B-16-DataComp.L-s1B-b8K")
_add("ViT-B-16", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", quick_gelu=True)
_add("ViT-B-16", "metaclip_400m", "timm/vit_base_patch16_clip_224.metaclip_400m", quick_gelu=True)
_add("ViT-B-16", "metaclip_fullcc", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", quick_gelu=True)

# --- ViT-L-14 -------------------------------------------------------------------------------------
_openai("ViT-L-14", "vit_large_patch14_clip_224")
_add("ViT-L-14", "laion400m_e31", "timm/vit_large_patch14_clip_224.laion400m_e31")
_add("ViT-L-14", "laion400m_e32", "timm/vit_large_patch14_clip_224.laion400m_e32")
_add(
    "ViT-L-14",
    "laion2b_s32b_b82k",
    "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    mean=INCEPTION_MEAN,
    std=INCEPTION_STD,
)
_add("ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K")
_add("ViT-L-14", "commonpool_xl_clip_s13b_b90k", "laion/CLIP-ViT-L-14-CommonPool.XL.clip-s13B-b90K")
_add("ViT-L-14", "commonpool_xl_laion_s13b_b90k", "laion/CLIP-ViT-L-14-CommonPool.XL.laion-s13B-b90K")
_add("ViT-L-14", "commonpool_xl_s13b_b90k", "laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K")
_add("ViT-L-14", "metaclip_400m", "timm/vit_large_patch14_clip_224.metaclip_400m", quick_gelu=True)
_add("ViT-L-14", "metaclip_fullcc", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", quick_gelu=True)
_add("ViT-L-14", "dfn2b", "apple/DFN2B-CLIP-ViT-L-14", quick_gelu=True)
_add("ViT-L-14", "dfn2b_s39b", "apple/DFN2B-CLIP-ViT-L-14-39B")
_openai("ViT-L-14-336", "vit_large_patch14_clip_336")

# --- ViT-H / g / bigG -----------------------------------------------------------------------------
_add("ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
_add("ViT-H-14", "metaclip_fullcc", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", quick_gelu=True)
_add("ViT-H-14", "metaclip_altogether", "timm/vit_huge_patch14_clip_224.metaclip_altogether")
_add("ViT-H-14", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14", quick_gelu=True, resize_mode="squash")
_add("ViT-g-14", "laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K")
_add("ViT-g-14", "laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K")
_add("ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")
_add("ViT-bigG-14", "metaclip_fullcc", "timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", quick_gelu=True)

# --- CoCa -----------------------------------------------------------------------------------------
for _coca, _size in (("coca_ViT-B-32", "B-32"), ("coca_ViT-L-14", "L-14")):
    _add(_coca, "laion2b_s13b_b90k", f"laion/CoCa-ViT-{_size}-laion2B-s13B-b90k")
    _add(
        _coca,
        "mscoco_finetuned_laion2b_s13b_b90k",
        f"laion/mscoco_finetuned_CoCa-ViT-{_size}-laion2B-s13B-b90k",
        notes="fine-tuned for COCO captioning",
    )


def register_pretrained(weights: PretrainedWeights) -> None:
    """Add or replace a tag (tests and private deployments register their own repositories)."""
    _TABLE.setdefault(weights.model, {})[weights.tag.lower()] = weights


def list_pretrained(model: str | None = None) -> list[tuple[str, str]]:
    """``(model, tag)`` pairs, like ``open_clip.list_pretrained()``."""
    models = [model.removesuffix("-quickgelu")] if model else list(_TABLE)
    return [(m, t) for m in models for t in _TABLE.get(m, {})]


def pretrained_tags(model: str) -> list[str]:
    return list(_TABLE.get(model.removesuffix("-quickgelu"), {}))


def is_pretrained_tag(model: str | None, tag: str) -> bool:
    return model is not None and tag.lower() in _TABLE.get(model.removesuffix("-quickgelu"), {})


def resolve_pretrained(model: str, tag: str) -> PretrainedWeights:
    """The table entry for ``(model, tag)``, or a ``ConfigError`` listing the tags that exist."""
    base = model.removesuffix("-quickgelu")
    tags = _TABLE.get(base, {})
    entry = tags.get(tag.lower())
    if entry is not None:
        return entry
    if not tags:
        raise ConfigError(
            f"No pretrained weights are known for model {model!r}. Models with named weights: "
            f"{', '.join(_TABLE)}. Pass a file, a directory or 'hf-hub:org/name' instead."
        )
    close = difflib.get_close_matches(tag.lower(), list(tags), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown pretrained tag {tag!r} for {model}.{hint} Known tags: {', '.join(tags)}")
