"""Architectures given as files, and honest names for architectures.

open_clip users keep architectures as JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) and
clipforge writes its own (``CLIPConfig.to_dict()``); :func:`is_config_file` tells such a file from
an architecture name, and :func:`clipforge.checkpoints.config_file.read_config_file` reads it
(the format mappers live in ``checkpoints/``), so ``--model my-arch.json`` means the same thing
to every command.

:func:`architecture_name` is what outputs (embed manifests, index manifests, eval results, the
search page) call a model. It only ever says a registered name when the config *is* that
registered architecture, field for field; anything else is ``"custom"`` with where it came from,
and outputs store the config itself next to the name so the model can be rebuilt exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig
from clipforge.model.registry import get_model_config, is_config_file, list_models, with_quickgelu

__all__ = [
    "architecture_name",
    "config_record",
    "model_label",
    "model_source",
    "same_architecture",
]

#: Fields that only matter at initialisation or for training, not for what the model computes
#: once its weights are loaded; two configs differing only here are the same architecture.
_NOT_ARCHITECTURE = {
    ("vision", "patch_dropout"),
    ("vision", "timm_pretrained"),
    ("vision", "timm_drop"),
    ("vision", "timm_drop_path"),
    ("init_logit_scale",),
    ("custom_text",),
    ("format_version",),
}
CUSTOM = "custom"


def _architecture_dict(cfg: CLIPConfig) -> dict[str, Any]:
    data = cfg.to_dict()
    for path in _NOT_ARCHITECTURE:
        node = data
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1], None)
    data["init_logit_bias"] = data.get("init_logit_bias") is not None  # only presence is structural
    for tower in ("vision", "text"):
        if isinstance(data[tower].get("layers"), list):
            data[tower]["layers"] = tuple(data[tower]["layers"])
    return data


def same_architecture(a: CLIPConfig, b: CLIPConfig) -> bool:
    """True when ``a`` and ``b`` build the same computation (every field but init/training ones)."""
    return _architecture_dict(a) == _architecture_dict(b)


def registered_match(cfg: CLIPConfig) -> str | None:
    """The registered name that is exactly ``cfg`` (``-quickgelu`` appended when it is on), or None."""
    plain = dataclasses.replace(cfg, quick_gelu=False)
    for name in list_models():
        if same_architecture(get_model_config(name), plain):
            return with_quickgelu(name, cfg.quick_gelu)
    return None


def architecture_name(cfg: CLIPConfig, requested: str | None = None, source: str | None = None) -> str:
    """What to call ``cfg`` in outputs; never a registered name the config differs from.

    ``requested`` is the name the user gave (kept when it still describes ``cfg``: it is the one
    pretrained tags are listed under); ``source`` is the file the config came from.
    """
    if requested and not is_config_file(requested):
        try:
            if same_architecture(get_model_config(requested), cfg):
                return requested
        except ConfigError:
            pass
    match = registered_match(cfg)
    if match is not None:
        return match
    return f"{CUSTOM} (from {Path(source).name})" if source else CUSTOM


def model_label(model: Any, requested: str | None = None) -> str | None:
    """The name outputs record for ``model``: ``model.architecture`` (set by ``create_model``),
    unless the caller gave one. A given *registered* name (or ``*.json`` file) is checked against
    the model's config and replaced when it does not describe it; a free-form label is kept."""
    cfg = getattr(model, "config", None)
    own = getattr(model, "architecture", None)
    if not isinstance(cfg, CLIPConfig):
        return requested or own
    if not requested or requested == own:
        return own or architecture_name(cfg)
    if is_config_file(requested):
        return architecture_name(cfg, source=requested)
    try:
        get_model_config(requested)
    except ConfigError:
        return requested  # not a registered name, so it claims nothing
    return architecture_name(cfg, requested)


def config_record(model: Any) -> dict[str, Any] | None:
    """``model.config`` as a JSON-able dict (what outputs store so the model can be rebuilt)."""
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if isinstance(cfg, CLIPConfig) else None


def model_source(name: str | None, config: Mapping[str, Any] | None) -> str | CLIPConfig | None:
    """What to hand ``create_model`` to rebuild a recorded model: the stored config when there is
    one (a name is only a label), the registered name when it is exactly that config (pretrained
    tags are looked up by name), else whatever name was recorded (older outputs)."""
    if not config:
        return name or None
    cfg = CLIPConfig.from_dict(dict(config), source="recorded model config")
    if name and not name.startswith(CUSTOM) and not is_config_file(name):
        try:
            named = get_model_config(name)
        except ConfigError:
            return cfg
        if same_architecture(named, cfg):
            return name
    return cfg
