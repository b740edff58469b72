"""Architectures given as files, and honest names for architectures.

open_clip users keep architectures as JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) and
clipforge writes its own (``CLIPConfig.to_dict()``, or wrapped as ``model_config`` in a model
folder's ``config.json``). :func:`read_config_file` reads all of these (plus a Hugging Face
``CLIPModel`` ``config.json``) through the project's existing mappers, so ``--model my-arch.json``
means the same thing to every command.

:func:`architecture_name` is what outputs (embed manifests, index manifests, eval results, the
search page) call a model. It only ever says a registered name when the config *is* that
registered architecture, field for field; anything else is ``"custom"`` with where it came from,
and outputs store the config itself next to the name so the model can be rebuilt exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipforge.errors import ClipforgeError, ConfigError
from clipforge.model.config import CLIPConfig

__all__ = [
    "architecture_name",
    "config_record",
    "is_config_file",
    "model_label",
    "model_source",
    "read_config_file",
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


def is_config_file(value: Any) -> bool:
    """True for a ``*.json`` path: a model architecture given as a file, not a name or weights."""
    return isinstance(value, (str, Path)) and str(value).lower().endswith(".json")


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
    from clipforge.checkpoints.hf import config_from_hf
    from clipforge.checkpoints.load import config_from_open_clip

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
        return config_from_hf(data, source)
    if "vision" in data or "text" in data:
        return CLIPConfig.from_dict(data, source=source)
    raise ConfigError(
        f"{source}: not a model config; keys found: {sorted(data)}. Expected clipforge's "
        "('embed_dim', 'vision', 'text'), open_clip's ('embed_dim', 'vision_cfg', 'text_cfg') "
        "or Hugging Face's ('vision_config', 'text_config')"
    )


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
    from clipforge.model.registry import get_model_config, list_models

    plain = CLIPConfig.from_dict({**cfg.to_dict(), "quick_gelu": False})
    for name in list_models():
        if same_architecture(get_model_config(name), plain):
            return f"{name}-quickgelu" if cfg.quick_gelu else name
    return None


def architecture_name(cfg: CLIPConfig, requested: str | None = None, source: str | None = None) -> str:
    """What to call ``cfg`` in outputs; never a registered name the config differs from.

    ``requested`` is the name the user gave (kept when it still describes ``cfg``: it is the one
    pretrained tags are listed under); ``source`` is the file the config came from.
    """
    from clipforge.model.registry import get_model_config

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
    from clipforge.model.registry import get_model_config

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
        from clipforge.model.registry import get_model_config

        try:
            named = get_model_config(name)
        except ConfigError:
            return cfg
        if same_architecture(named, cfg):
            return name
    return cfg
