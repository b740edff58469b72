"""OpenAI's released CLIP files (``ViT-B-32.pt``, ``RN50.pt``, ...).

They are TorchScript archives whose module names are exactly open_clip's state-dict names, plus
three hyper-parameter entries (``input_resolution``, ``context_length``, ``vocab_size``). We read
their tensors with :func:`clipforge.checkpoints.io.load_torchscript_state_dict` (no TorchScript or
pickle code runs), then reuse the open_clip key mapping. OpenAI's weights were trained with
QuickGELU, which the hyper-parameter entries let us recognise.

Writing produces a plain ``torch.save`` state dict in the same naming, which OpenAI's
``clip.load(path, jit=False)`` and open_clip's ``load_openai_model`` both accept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipforge.atomic import atomic_save
from clipforge.checkpoints.io import is_torchscript_archive, safe_torch_load
from clipforge.checkpoints.open_clip import clipforge_to_open_clip, infer_config, open_clip_to_clipforge
from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")


def is_openai_state_dict(sd: Mapping[str, Any]) -> bool:
    """OpenAI layout = open_clip layout + the hyper-parameter entries OpenAI's files carry."""
    return any(k in sd for k in OPENAI_SCALARS) and any(k.startswith("visual.") for k in sd)


def is_openai_file(path: str | Path) -> bool:
    return is_torchscript_archive(path)


def load_openai(path: str | Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """clipforge-named weights and the inferred config (``quick_gelu=True``) of an OpenAI file."""
    raw = safe_torch_load(path)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected an OpenAI CLIP state dict, got {type(raw).__name__}")
    config = infer_config(raw, quick_gelu=True)
    return open_clip_to_clipforge(raw), config


def openai_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in OpenAI naming, with OpenAI's hyper-parameter entries."""
    cfg: CLIPConfig = model.config
    sd = clipforge_to_open_clip({k: v.detach() for k, v in model.state_dict().items()})
    if cfg.text.hf_model_name or cfg.vision.timm_model_name:
        raise CheckpointError("OpenAI's format only holds CLIP's own towers (no timm / Hugging Face towers)")
    sd["input_resolution"] = torch.tensor(cfg.vision.image_size)
    sd["context_length"] = torch.tensor(cfg.text.context_length)
    sd["vocab_size"] = torch.tensor(cfg.text.vocab_size)
    return sd


def save_openai(model: torch.nn.Module, path: str | Path) -> Path:
    """Write OpenAI's layout. The format cannot say "GELU": OpenAI's ``clip.load`` and clipforge
    read every such file as QuickGELU, so a GELU model is written with a warning."""
    path = Path(path)
    if not model.config.quick_gelu:
        log.warning(
            "%s: OpenAI's format implies QuickGELU, but this model uses GELU; loaders will run it with "
            "QuickGELU unless told quick_gelu=False (use the clipforge, open_clip or hf format to keep GELU)",
            path,
        )
    atomic_save(openai_state_dict(model), path)
    return path
