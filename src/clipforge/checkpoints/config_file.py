"""Architectures given as JSON files, in clipforge's, open_clip's or Hugging Face's form.

open_clip users keep architectures as JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) and
clipforge writes its own (``CLIPConfig.to_dict()``, or wrapped as ``model_config`` in a model
folder's ``config.json``). :func:`read_config_file` reads all of these (plus a Hugging Face
``CLIPModel`` ``config.json``) through the format mappers of this package, so
``--model my-arch.json`` means the same thing to every command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.checkpoints.hf import config_from_hf
from clipforge.checkpoints.hf_siglip import config_from_hf_siglip, siglip_kind
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.model.config import CLIPConfig

__all__ = ["read_config_file"]


def read_config_file(path: str | Path) -> CLIPConfig:
    """The ``CLIPConfig`` in a JSON file, in clipforge's, open_clip's or Hugging Face's form.

    Recognised by their keys: clipforge ``{"embed_dim", "vision", "text"}`` (or a model folder's
    ``config.json`` with ``model_config``), open_clip ``{"embed_dim", "vision_cfg", "text_cfg"}``
    (or an open_clip Hub ``open_clip_config.json`` with ``model_cfg``), Hugging Face
    ``{"vision_config", "text_config"}``. Anything else is refused, naming the keys found.
    """
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read model config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a JSON object, got {type(data).__name__}")
    try:
        return _config_from_document(data, str(path))
    except ConfigError:
        raise
    except ClipforgeError as e:  # the mappers raise CheckpointError; here the file is a config
        raise ConfigError(str(e)) from None


def _config_from_document(data: dict[str, Any], source: str) -> CLIPConfig:
    """Dispatch on the keys that tell the formats apart (see :func:`read_config_file`)."""
    if isinstance(data.get("model_config"), dict):  # clipforge model folder config.json
        return CLIPConfig.from_dict(data["model_config"], source=f"{source}: model_config")
    if isinstance(data.get("model_cfg"), dict):  # open_clip Hub open_clip_config.json
        return config_from_open_clip(data["model_cfg"], f"{source}: model_cfg")
    if "vision_cfg" in data or "text_cfg" in data:
        for key in ("vision_cfg", "text_cfg"):
            if not isinstance(data.get(key), dict):
                raise ConfigError(f"{source}: open_clip model config needs an object under {key!r}")
        return config_from_open_clip(data, source)
    if "vision_config" in data or "text_config" in data:
        if siglip_kind(data) is not None:
            return config_from_hf_siglip(data, source)
        return config_from_hf(data, source)
    if "vision" in data or "text" in data:
        return CLIPConfig.from_dict(data, source=source)
    raise ConfigError(
        f"{source}: not a model config; keys found: {sorted(data)}. Expected clipforge's "
        "('embed_dim', 'vision', 'text'), open_clip's ('embed_dim', 'vision_cfg', 'text_cfg') "
        "or Hugging Face's ('vision_config', 'text_config')"
    )
