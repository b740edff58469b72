"""Write a model in any supported format; ``convert_checkpoint`` = load any + write one.

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

from clipforge.checkpoints import clipforge_format, hf, hf_siglip, openai
from clipforge.checkpoints.io import atomic_save, atomic_write_text, save_safetensors
from clipforge.checkpoints.open_clip import clipforge_to_open_clip
from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

TARGETS = ("clipforge", "open_clip", "hf", "openai")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def config_to_open_clip(cfg: CLIPConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` dict for ``cfg`` (the inverse of ``load.config_from_open_clip``)."""
    v, t = cfg.vision, cfg.text
    vision: dict[str, Any] = {"image_size": v.image_size, "layers": v.layers, "width": v.width}
    if v.is_resnet:
        vision["layers"] = list(v.layers)
    else:
        vision.update(patch_size=v.patch_size, head_width=v.head_width, mlp_ratio=v.mlp_ratio)
        for name in ("ls_init_value", "no_ln_pre", "final_ln_after_pool"):
            if getattr(v, name):
                vision[name] = getattr(v, name)
        if v.pool_type != "tok":
            vision["pool_type"] = v.pool_type
    text: dict[str, Any] = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_ratio,
    }
    for name in ("ls_init_value", "proj_bias"):
        if getattr(t, name):
            text[name] = getattr(t, name)
    if t.pool_type != "argmax":
        text["pool_type"] = t.pool_type
    out: dict[str, Any] = {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if cfg.quick_gelu:
        out["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    return out


def save_open_clip(model: torch.nn.Module, dst: str | Path) -> Path:
    """A state-dict file (by suffix) or a folder like open_clip's Hub repositories."""
    dst = Path(dst)
    sd = clipforge_to_open_clip({k: v.detach() for k, v in model.state_dict().items()})
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


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    to: str,
    *,
    model_name: str | None = None,
    dtype: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Load ``src`` (any format, or a tag with ``model_name``) and write it to ``dst`` as ``to``.

    ``model_name`` names the architecture when the source has no config (otherwise inferred).
    ``dtype`` ("fp32", "fp16", "bf16") casts the weights; default keeps them.
    """
    from clipforge.model.factory import create_model

    if to not in TARGETS:
        raise ConfigError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    model = create_model(model_name, pretrained=str(src), cache_dir=cache_dir)
    if dtype is not None:
        model.to(_DTYPES[dtype])
    out = save_as(model, dst, to)
    log.info("converted %s -> %s (%s)", src, out, to)
    return out
