"""Write a model in any supported format (``clipforge.factory.convert_checkpoint`` = load any + this).

Targets: ``clipforge`` (folder), ``hf`` (transformers ``CLIPModel`` folder), ``open_clip`` (a
state-dict file, or a Hub-style folder with ``open_clip_config.json``) and ``openai`` (a plain
state dict that OpenAI's ``clip.load(jit=False)`` and open_clip's OpenAI loader accept).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clipforge.atomic import atomic_save, atomic_write_text
from clipforge.checkpoints import clipforge_format, hf, hf_siglip, openai
from clipforge.checkpoints.io import save_safetensors
from clipforge.checkpoints.open_clip import clipforge_to_open_clip, open_clip_layout_is_custom_text
from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

TARGETS = ("clipforge", "open_clip", "hf", "openai")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: ``--dtype`` spellings of ``convert_checkpoint`` (:mod:`clipforge.factory`).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def config_to_open_clip(cfg: CLIPConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` dict for ``cfg`` (the inverse of ``load.config_from_open_clip``).

    Every field is written in open_clip's names and meanings: ``timm_proj='head'`` is open_clip's
    ``timm_proj: null``, ``norm_eps``/``act_approximate`` are ``norm_kwargs``/``act_kwargs``, the
    Hugging Face pooler gets its ``_pooler`` suffix back, and ``custom_text`` says which model
    class open_clip builds. A field open_clip has no name for (``vision.timm_kwargs``) is refused.
    """
    out: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": _vision_to_open_clip(cfg.vision),
        "text_cfg": _text_to_open_clip(cfg.text),
    }
    if cfg.quick_gelu:
        out["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    if cfg.init_logit_scale != _DEFAULT.init_logit_scale:
        out["init_logit_scale"] = cfg.init_logit_scale
    if cfg.custom_text or cfg.text.hf_model_name:
        out["custom_text"] = True
    if cfg.multimodal is not None:
        m = cfg.multimodal
        out["multimodal_cfg"] = {
            "width": m.width, "heads": m.heads, "layers": m.layers, "mlp_ratio": m.mlp_ratio,
            "context_length": m.context_length, "vocab_size": m.vocab_size,
            **({"ls_init_value": m.ls_init_value} if m.ls_init_value is not None else {}),
        }  # fmt: skip
    return out


_DEFAULT = CLIPConfig()
#: Fields written only when they differ from the default (the same in both libraries).
_VISION_OPTIONAL = (
    "head_width mlp_ratio ls_init_value patch_dropout no_ln_pre final_ln_after_pool pool_type "
    "attentional_pool attn_pooler_queries attn_pooler_heads"
).split()
_TIMM_FIELDS = "timm_pool timm_proj_bias timm_drop timm_drop_path".split()
_TEXT_OPTIONAL = (
    "mlp_ratio ls_init_value pad_id eos_id pool_type proj_bias proj_type no_causal_mask embed_cls "
    "correct_cls_mask hf_tokenizer_name"
).split()


def _vision_to_open_clip(v: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"image_size": v.image_size}
    if v.timm_model_name:
        if v.timm_kwargs:
            raise ConfigError(
                f"vision.timm_kwargs {v.timm_kwargs} has no open_clip equivalent: an open_clip config "
                "cannot describe this timm tower (write the state dict alone, or to clipforge's format)"
            )
        out.update(timm_model_name=v.timm_model_name, timm_model_pretrained=bool(v.timm_pretrained))
        out["timm_proj"] = None if v.timm_proj == "head" else v.timm_proj
        out.update({k: getattr(v, k) for k in _TIMM_FIELDS})
        return out
    out.update(layers=list(v.layers) if v.is_resnet else v.layers, width=v.width)
    if v.is_resnet:
        return out
    out["patch_size"] = v.patch_size
    default = _DEFAULT.vision
    out.update({k: getattr(v, k) for k in _VISION_OPTIONAL if getattr(v, k) != getattr(default, k)})
    return out


def _text_to_open_clip(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"context_length": t.context_length, "vocab_size": t.vocab_size}
    if t.hf_model_name:
        out.update(
            hf_model_name=t.hf_model_name,
            hf_model_pretrained=False,  # the weights come from the checkpoint, not the Hub
            hf_pooler_type=f"{t.hf_pooler_type}_pooler",
            hf_proj_type=t.hf_proj_type,
        )
    else:
        out.update(width=t.width, heads=t.heads, layers=t.layers)
    default = _DEFAULT.text
    out.update({k: getattr(t, k) for k in _TEXT_OPTIONAL if getattr(t, k) != getattr(default, k)})
    if t.tokenizer_kwargs:
        out["tokenizer_kwargs"] = dict(t.tokenizer_kwargs)
    if t.norm_eps != default.norm_eps:
        out["norm_kwargs"] = {"eps": t.norm_eps}
    if t.act_approximate != default.act_approximate:
        out["act_kwargs"] = {"approximate": t.act_approximate}
    return out


def save_open_clip(model: torch.nn.Module, dst: str | Path) -> Path:
    """A state-dict file (by suffix) or a folder like open_clip's Hub repositories."""
    dst = Path(dst)
    sd = clipforge_to_open_clip(
        {k: v.detach() for k, v in model.state_dict().items()},
        custom_text=open_clip_layout_is_custom_text(model.config),
    )
    if dst.suffix == ".safetensors":
        save_safetensors(sd, dst, metadata={"format": "pt"})
        return dst
    if dst.suffix in _FILE_SUFFIXES:
        atomic_save(sd, dst)
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, dst / "open_clip_model.safetensors", metadata={"format": "pt"})
    pre = clipforge_format.preprocess_to_dict(
        getattr(model, "preprocess_cfg", None), model.config.vision.image_size
    )
    document = {
        "model_cfg": config_to_open_clip(model.config),
        "preprocess_cfg": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in pre.items() if k != "image_size"
        },
    }
    atomic_write_text(dst / "open_clip_config.json", json.dumps(document, indent=2) + "\n")
    return dst


def save_as(model: torch.nn.Module, dst: str | Path, to: str) -> Path:
    """Write ``model`` to ``dst`` in format ``to`` (one of :data:`TARGETS`)."""
    if to == "clipforge":
        return clipforge_format.save_pretrained(model, dst)
    if to == "hf":
        if hf_siglip.is_siglip_config(model.config):  # SigLIP: a SiglipModel / Siglip2Model folder
            return hf_siglip.save_hf_siglip(model, dst)
        return hf.save_hf(model, dst)
    if to == "open_clip":
        return save_open_clip(model, dst)
    if to == "openai":
        return openai.save_openai(model, dst)
    raise ConfigError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
