"""Build models (and their preprocessing and tokenizer) from names, configs and checkpoints.

The names and signatures are open_clip's (``create_model_and_transforms("ViT-B-32",
pretrained="laion2b_s34b_b79k")``) so switching takes minutes. ``pretrained`` may be a named tag,
``hf-hub:org/name``, a file or a folder; a checkpoint that carries its own config (clipforge or
Hugging Face folders, open_clip Hub repos) rebuilds its model without a name, and one that does
not has its architecture inferred from the weight shapes.

The function bodies are short compositions of named steps: resolve the weights, choose the
config, build, load, attach preprocessing and tokenizer settings.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.hub import hub_file, is_hub_spec, resolve_hub
from clipforge.checkpoints.load import (
    LoadedCheckpoint,
    _warn_activation,
    apply_state_dict,
    load_any,
)
from clipforge.checkpoints.pretrained import PretrainedWeights, is_pretrained_tag, resolve_pretrained
from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.architecture import architecture_name, is_config_file, same_architecture
from clipforge.model.config import CLIPConfig
from clipforge.model.registry import get_model_config

log = logging.getLogger(__name__)

__all__ = [
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_tokenizer",
    "make_preprocess_cfg",
]


@dataclass
class _Weights:
    """Where ``pretrained`` pointed, after resolution."""

    loaded: LoadedCheckpoint
    entry: PretrainedWeights | None = None  # set for named tags


def make_preprocess_cfg(data: dict[str, Any] | Any) -> Any:
    """A ``PreprocessConfig`` from a stored dict (or an existing config, returned unchanged)."""
    from clipforge.transforms import PreprocessConfig

    return PreprocessConfig.coerce(data if isinstance(data, PreprocessConfig) else dict(data))


def _default_preprocess_dict(image_size: int) -> dict[str, Any]:
    from clipforge.checkpoints.clipforge_format import default_preprocess_dict

    return default_preprocess_dict(image_size)


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\", ".")) or value.startswith("~")


def resolve_weights(
    name: str | None, pretrained: str | Path, cache_dir: str | Path | None = None
) -> _Weights:
    """Turn ``pretrained`` (tag, ``hf-hub:``, file or folder) into loaded weights."""
    spec = str(pretrained)
    if name is not None and not Path(spec).expanduser().exists() and is_pretrained_tag(name, spec):
        entry = resolve_pretrained(name, spec)
        path = hub_file(entry.hf_hub, entry.filenames, cache_dir=cache_dir)
        assert path is not None
        log.info("pretrained %s/%s -> %s", name, entry.tag, path)
        return _Weights(load_any(path), entry)
    if is_hub_spec(spec):
        return _Weights(load_any(resolve_hub(spec, cache_dir=cache_dir)))
    path = Path(spec).expanduser()
    if path.exists():
        return _Weights(load_any(path))
    if name is not None and not _looks_like_path(spec):
        resolve_pretrained(name, spec)  # raises a ConfigError listing the known tags
    raise CheckpointError(
        f"pretrained={spec!r}: no such file or directory, and not a known tag or 'hf-hub:' reference"
    )


def _choose_config(
    name_or_config: str | CLIPConfig | None, weights: _Weights | None, overrides: dict[str, Any]
) -> CLIPConfig:
    """Stored config > explicit config/name > inferred from shapes; then overrides on top."""
    named: CLIPConfig | None = None
    if isinstance(name_or_config, CLIPConfig):
        named = CLIPConfig.from_dict(name_or_config.to_dict())
    elif name_or_config is not None:
        named = get_model_config(name_or_config)  # a registered name or a *.json model config
    stored = weights.loaded.config if weights is not None else None
    if stored is not None:
        if named is not None and not same_architecture(named, stored):
            log.warning(
                "%s carries its own config, which differs from %r; using the checkpoint's",
                weights.loaded.path,
                name_or_config if isinstance(name_or_config, str) else "the given config",
            )
        cfg = stored
    elif named is not None:
        cfg = named
    elif weights is not None:
        cfg = weights.loaded.resolve_config()
    else:
        raise ConfigError("create_model needs a model name, a CLIPConfig or pretrained weights")
    if weights is not None and weights.entry is not None and weights.entry.quick_gelu:
        cfg.quick_gelu = True  # the tag's weights were trained with QuickGELU (as open_clip does)
    if stored is None and weights is not None and weights.loaded.quick_gelu is not None:
        # The file format proves the activation (all of OpenAI's releases use QuickGELU), so an
        # explicit non-quickgelu name gets it too, as the 'openai' tag does; quick_gelu= still wins.
        cfg.quick_gelu = bool(weights.loaded.quick_gelu)
    return cfg.replace(**overrides) if overrides else cfg


def _architecture_label(cfg: CLIPConfig, requested: str | None, weights: _Weights | None) -> str:
    """The name outputs give this model: the one stored with the weights when it still describes
    ``cfg``, else :func:`~clipforge.model.architecture.architecture_name` (never a registered name
    the config differs from)."""
    stored = weights.loaded.config if weights is not None else None
    label = weights.loaded.extra.get("architecture") if weights is not None else None
    if isinstance(label, str) and label and stored is not None and same_architecture(stored, cfg):
        return label
    if requested is not None and is_config_file(requested):
        return architecture_name(cfg, source=requested)
    return architecture_name(cfg, requested)


_INIT_FUNCTIONS = (
    "normal_",
    "uniform_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
)


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s random initialisers no-ops while a model is built.

    Every parameter is about to be overwritten by a strict checkpoint load, and drawing ~100M+
    random numbers first costs seconds on CPU for nothing (transformers does the same). Not
    thread-safe: it patches module attributes for the duration of the build.
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _attach_settings(
    model: torch.nn.Module, weights: _Weights | None, image_overrides: dict[str, Any]
) -> None:
    """Set ``model.preprocess_cfg`` and ``model.tokenizer_cfg`` from the checkpoint or defaults.

    Preprocessing is layered: the weights' origin's convention (``PreprocessConfig.defaults_for``:
    open_clip/OpenAI files and tags -> open_clip's, HF folders -> CLIPImageProcessor's), then the
    tag's facts, then what the checkpoint stores, then explicit ``image_*`` arguments.
    """
    from clipforge.transforms import PreprocessConfig

    cfg: CLIPConfig = model.config
    origin = weights.loaded.format if weights is not None else "clipforge"
    pre = PreprocessConfig.defaults_for(origin, cfg.vision.image_size)
    tok: dict[str, Any] | None = None
    if weights is not None:
        if weights.entry is not None:
            pre.update(weights.entry.preprocess_dict(cfg.vision.image_size))
        pre.update(weights.loaded.preprocess_cfg or {})
        tok = weights.loaded.tokenizer_cfg
    alpha = image_overrides.pop("alpha", None)
    pre.update({k: v for k, v in image_overrides.items() if v is not None})
    model.preprocess_cfg = make_preprocess_cfg(pre).with_alpha(alpha)
    model.tokenizer_cfg = _tokenizer_cfg(cfg, tok, weights.loaded.path if weights is not None else None)


def _tokenizer_cfg(
    cfg: CLIPConfig, stored: dict[str, Any] | None, weights_path: Path | None
) -> dict[str, Any]:
    """The checkpoint's stored tokenizer settings, else those its config implies (CLIP BPE, or a
    Hugging Face tokenizer when ``text.hf_tokenizer_name`` is set). A Hugging Face tokenizer is
    looked for first in the folder of the weights (open_clip Hub repos ship it there)."""
    from clipforge.hf_tokenizer import tokenizer_cfg_for, with_model_dir

    model_dir = None
    if weights_path is not None:
        model_dir = weights_path if weights_path.is_dir() else weights_path.parent
    if stored:
        return with_model_dir(dict(stored), model_dir)
    return tokenizer_cfg_for(cfg.text, model_dir)


def create_model(
    name_or_config: str | CLIPConfig | None = None,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    strict: bool = True,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    image_interpolation: str | None = None,
    image_resize_mode: str | None = None,
    image_alpha: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """A CLIP model, optionally with weights (``pretrained``: tag, ``hf-hub:...``, file or folder).

    ``name_or_config`` is a registered name (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``), a
    ``CLIPConfig``, a ``*.json`` model config (clipforge's or open_clip's), or None when the
    weights describe themselves. ``model.architecture`` names what was built (see
    :func:`~clipforge.model.architecture.architecture_name`).

    ``overrides`` replace config fields (``quick_gelu=True``, ``vision={"patch_dropout": 0.5}``).
    ``image_alpha`` ("composite", "composite:#RRGGBB", "drop") overrides the weights' alpha rule.
    Like open_clip, the model is returned in train mode; call ``.eval()`` for inference.
    """
    from clipforge.model.clip import build_model

    if isinstance(name_or_config, str) and is_hub_spec(name_or_config):
        if pretrained is not None:
            raise ConfigError(f"give either an 'hf-hub:' model ({name_or_config!r}) or pretrained=, not both")
        name_or_config, pretrained = None, name_or_config  # open_clip style: create_model("hf-hub:org/name")
    requested = name_or_config if isinstance(name_or_config, str) else None
    tag_name = None if requested is None or is_config_file(requested) else requested  # tags need a name
    weights = resolve_weights(tag_name, pretrained, cache_dir) if pretrained else None
    cfg = _choose_config(name_or_config, weights, overrides)
    with _skip_random_init() if weights is not None and strict else contextlib.nullcontext():
        model = build_model(cfg)
    if weights is not None:
        _warn_activation(model, weights.loaded)
        apply_state_dict(
            model, weights.loaded.state_dict, f"{weights.loaded.path} ({weights.loaded.format})", strict
        )
    image_overrides = {
        "mean": image_mean,
        "std": image_std,
        "interpolation": image_interpolation,
        "resize_mode": image_resize_mode,
        "alpha": image_alpha,  # "composite", "composite:#RRGGBB" or "drop"; overrides the stored one
    }
    _attach_settings(model, weights, image_overrides)
    model.architecture = _architecture_label(cfg, requested, weights)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def create_model_and_transforms(
    name_or_config: str | CLIPConfig | None = None,
    pretrained: str | Path | None = None,
    *,
    aug_cfg: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, Any, Any]:
    """``(model, preprocess_train, preprocess_val)``; preprocessing follows the weights' settings."""
    from clipforge.transforms import image_transform

    model = create_model(name_or_config, pretrained, **kwargs)
    train = image_transform(model.preprocess_cfg, is_train=True, **(aug_cfg or {}))
    val = image_transform(model.preprocess_cfg, is_train=False)
    return model, train, val


def create_model_from_pretrained(
    name_or_config: str | CLIPConfig | None = None, pretrained: str | Path | None = None, **kwargs: Any
) -> tuple[torch.nn.Module, Any]:
    """``(model, preprocess_val)`` with weights required (as in open_clip)."""
    if pretrained is None and not (isinstance(name_or_config, str) and _is_source(name_or_config)):
        raise ConfigError(
            "create_model_from_pretrained needs pretrained= (a tag, 'hf-hub:...', a file or a folder)"
        )
    if pretrained is None:  # create_model_from_pretrained("hf-hub:org/name") / ("path/to/dir")
        name_or_config, pretrained = None, name_or_config
    model, _, val = create_model_and_transforms(name_or_config, pretrained, **kwargs)
    return model, val


def _is_source(value: str) -> bool:
    """Weights to load (``hf-hub:`` or a path), as opposed to an architecture name or ``*.json``."""
    if is_config_file(value):
        return False
    return is_hub_spec(value) or Path(value).expanduser().exists()


def _tokenizer_settings(source: str) -> dict[str, Any]:
    """Tokenizer settings stored with a checkpoint, read from its config alone when there is one."""
    from clipforge.checkpoints import clipforge_format, hf

    path = resolve_hub(source) if is_hub_spec(source) else Path(source).expanduser()
    if path.is_dir() and clipforge_format.is_clipforge_dir(path):
        data = clipforge_format.read_config(path)
        text = data["model_config"].get("text", {})
        stored = data.get("tokenizer_cfg")
        if stored:
            from clipforge.hf_tokenizer import with_model_dir

            return with_model_dir({"context_length": text.get("context_length", 77), **stored}, path)
        config = CLIPConfig.from_dict(data["model_config"], source=str(path / clipforge_format.CONFIG_NAME))
        return _tokenizer_cfg(config, None, path)
    if path.is_dir() and hf.is_hf_dir(path):
        return _tokenizer_cfg(hf.load_hf_config(path), None, path)
    loaded = load_any(path)
    config = loaded.resolve_config()
    settings = _tokenizer_cfg(config, loaded.tokenizer_cfg, loaded.path)
    settings.setdefault("context_length", config.text.context_length)
    return settings


def _build_tokenizer(settings: dict[str, Any]) -> Any:
    """The tokenizer a ``tokenizer_cfg`` describes: ``clip_bpe`` (the default) or ``hf``."""
    kind = settings.get("type", "clip_bpe")
    if kind == "hf":
        from clipforge.hf_tokenizer import HFTokenizer

        return HFTokenizer.from_dict(settings)
    if kind == "clip_bpe":
        from clipforge.tokenizer import Tokenizer

        return Tokenizer.from_dict(settings)
    raise ConfigError(
        f"tokenizer_cfg type {kind!r} is not one of 'clip_bpe' (CLIP BPE) or 'hf' (Hugging Face)"
    )


def get_tokenizer(name_or_model: Any = None, context_length: int | None = None, **kwargs: Any) -> Any:
    """The tokenizer a model (or a model name, ``hf-hub:`` ref or checkpoint folder) expects.

    CLIP's BPE unless the model's text config names a Hugging Face tokenizer
    (``text.hf_tokenizer_name``: SigLIP, SigLIP 2, XLM-R, mT5, NLLB towers), which is loaded offline
    (:class:`clipforge.hf_tokenizer.HFTokenizer`). ``kwargs`` override the stored settings.
    """
    from clipforge.hf_tokenizer import tokenizer_cfg_for

    settings: dict[str, Any] = {"type": "clip_bpe"}
    if isinstance(name_or_model, torch.nn.Module):
        model_cfg = getattr(name_or_model, "config", None)
        stored = getattr(name_or_model, "tokenizer_cfg", None)
        if stored:
            settings = dict(stored)
        elif model_cfg is not None:
            settings = tokenizer_cfg_for(model_cfg.text)
        if model_cfg is not None:
            settings.setdefault("context_length", model_cfg.text.context_length)
    elif isinstance(name_or_model, CLIPConfig):
        settings = tokenizer_cfg_for(name_or_model.text)
    elif isinstance(name_or_model, str) and _is_source(name_or_model):
        settings = _tokenizer_settings(name_or_model)
    elif isinstance(name_or_model, str):
        settings = tokenizer_cfg_for(get_model_config(name_or_model).text)
    if context_length is not None:
        settings["context_length"] = context_length
    settings.update(kwargs)
    return _build_tokenizer(settings)
