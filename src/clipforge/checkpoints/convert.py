"""Write a model in any supported format (``clipforge.factory.convert_checkpoint`` = load any + this).

Targets: ``clipforge`` (folder), ``hf`` (transformers ``CLIPModel`` folder), ``open_clip`` (a
state-dict file, or a Hub-style folder with ``open_clip_config.json``) and ``openai`` (a plain
state dict that OpenAI's ``clip.load(jit=False)`` and open_clip's OpenAI loader accept).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from clipforge.atomic import atomic_save, atomic_write_text
from clipforge.checkpoints import clipforge_format, hf, hf_siglip, openai
from clipforge.checkpoints.io import save_safetensors
from clipforge.checkpoints.open_clip import clipforge_to_open_clip, open_clip_layout_is_custom_text
from clipforge.checkpoints.open_clip_config import config_to_open_clip
from clipforge.errors import ConfigError

log = logging.getLogger(__name__)

TARGETS = ("clipforge", "open_clip", "hf", "openai")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: ``--dtype`` spellings of ``convert_checkpoint`` (:mod:`clipforge.factory`).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    from clipforge.transforms import PreprocessConfig

    pre = PreprocessConfig.stored_dict(getattr(model, "preprocess_cfg", None), model.config.vision.image_size)
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
