"""Build models (and their preprocessing and tokenizer) from names, configs and checkpoints.

The names and signatures are open_clip's (``create_model_and_transforms("ViT-B-32",
pretrained="laion2b_s34b_b79k")``) so switching takes minutes. ``pretrained`` may be a named tag,
``hf-hub:org/name``, a file or a folder (see :mod:`clipforge.weights`); a checkpoint that carries
its own config (clipforge or Hugging Face folders, open_clip Hub repos) rebuilds its model without
a name, and one that does not has its architecture inferred from the weight shapes.

This module is the layer above :mod:`clipforge.model` (which only builds modules from configs)
and :mod:`clipforge.checkpoints` (which only reads and writes files): building a model *from
weights* needs both, so it lives here and neither of them imports it. The function bodies are
short compositions of named steps: resolve the weights, choose the config, build, load, attach
preprocessing and tokenizer settings.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints.config_file import read_config_file
from clipforge.checkpoints.hub import is_hub_spec
from clipforge.checkpoints.load import apply_state_dict, load_any, warn_activation
from clipforge.errors import ConfigError
from clipforge.model import registry
from clipforge.model.architecture import architecture_name, same_architecture
from clipforge.model.build import build_model
from clipforge.model.config import CLIPConfig
from clipforge.model.registry import is_config_file
from clipforge.model.skeleton import meta_tensor_names, parameters_on_meta
from clipforge.weights import Weights, is_source, resolve_weights, source_path

log = logging.getLogger(__name__)

__all__ = [
    "convert_checkpoint",
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_model_config",
    "get_tokenizer",
    "load_pretrained_dir",
    "resolve_weights",
]


def get_model_config(name: str | Path) -> CLIPConfig:
    """The architecture a name or a ``*.json`` model config file describes.

    Names are the registry's (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``); a file may be in
    clipforge's, open_clip's or Hugging Face's form (read by ``checkpoints.config_file``), so every
    place that takes an architecture name takes a file too.
    """
    if is_config_file(name):
        return read_config_file(name)
    return registry.get_model_config(str(name))


def _choose_config(
    name_or_config: str | CLIPConfig | None, weights: Weights | None, overrides: dict[str, Any]
) -> CLIPConfig:
    """Stored config > explicit config/name > inferred from shapes; then overrides on top."""
    named: CLIPConfig | None = None
    if isinstance(name_or_config, CLIPConfig):
        named = name_or_config
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
        cfg = dataclasses.replace(cfg, quick_gelu=True)  # the tag's weights were trained with QuickGELU
    if stored is None and weights is not None and weights.loaded.quick_gelu is not None:
        # The file format proves the activation (all of OpenAI's releases use QuickGELU), so an
        # explicit non-quickgelu name gets it too, as the 'openai' tag does; quick_gelu= still wins.
        cfg = dataclasses.replace(cfg, quick_gelu=bool(weights.loaded.quick_gelu))
    return cfg.replace(**overrides) if overrides else cfg


def _architecture_label(cfg: CLIPConfig, requested: str | None, weights: Weights | None) -> str:
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


def _build_loaded(cfg: CLIPConfig, weights: Weights | None, strict: bool) -> torch.nn.Module:
    """The model for ``cfg`` with ``weights`` loaded (randomly initialised when there are none).

    A strict load replaces every parameter, so the model is built with its parameters on the
    meta device (no random numbers drawn: seconds on CPU for large towers) and the checkpoint's
    tensors are assigned in, copied to the model's dtypes and layout exactly as
    ``load_state_dict`` copies them. A non-strict load keeps the random init of what is missing.
    """
    if weights is None:
        return build_model(cfg)
    loaded = weights.loaded
    source = f"{loaded.path} ({loaded.format})"
    if not strict:
        model = build_model(cfg)
        warn_activation(model, loaded)
        apply_state_dict(model, loaded.state_dict, source, strict=False)
        return model
    with parameters_on_meta():
        model = build_model(cfg)
    warn_activation(model, loaded)
    apply_state_dict(model, loaded.state_dict, source, strict=True, assign=True)
    left = meta_tensor_names(model)
    if left:  # something built from a parameter's value in __init__: build it the ordinary way
        log.debug("%s: %d tensors stayed on the meta device (%s...); rebuilding", source, len(left), left[0])
        model = build_model(cfg)
        apply_state_dict(model, loaded.state_dict, source, strict=True)
    return model


def _attach_settings(
    model: torch.nn.Module, weights: Weights | None, image_overrides: dict[str, Any]
) -> None:
    """Set ``model.preprocess_cfg`` and ``model.tokenizer_cfg`` from the checkpoint or defaults.

    Preprocessing is layered: the weights' origin's convention (``PreprocessConfig.defaults_for``:
    open_clip/OpenAI files and tags -> open_clip's, HF folders -> CLIPImageProcessor's), then the
    tag's facts, then what the checkpoint stores, then explicit ``image_*`` arguments.
    """
    from clipforge.transforms import PreprocessConfig

    naflex = image_overrides.pop("naflex", None)
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
    model.preprocess_cfg = _naflex_choice(PreprocessConfig.coerce(pre).with_alpha(alpha), naflex)
    model.tokenizer_cfg = _tokenizer_cfg(cfg, tok, weights.loaded.path if weights is not None else None)


def _naflex_choice(pre: Any, naflex: bool | None) -> Any:
    """``image_naflex`` applied to a ``PreprocessConfig``: None keeps the weights' own choice
    (NaFlex for a ``Siglip2ImageProcessor`` folder, as transformers preprocesses it), False the
    fixed-size square resize underneath it; True insists on NaFlex and fails where there is none."""
    has = pre.naflex_max_patches is not None
    if naflex is None or bool(naflex) == has:
        return pre
    if not naflex:
        return dataclasses.replace(pre, naflex_max_patches=None)
    raise ConfigError(
        "image_naflex=True: these weights' preprocessing is fixed-size (no naflex_max_patches); NaFlex "
        "comes from a Siglip2ImageProcessor folder or a checkpoint saved with preprocess naflex_max_patches"
    )


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
    image_naflex: bool | None = None,
    image_naflex_resize: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """A CLIP model, optionally with weights (``pretrained``: tag, ``hf-hub:...``, file or folder).

    ``name_or_config`` is a registered name (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``), a
    ``CLIPConfig``, a ``*.json`` model config (clipforge's or open_clip's), or None when the
    weights describe themselves. ``model.architecture`` names what was built (see
    :func:`~clipforge.model.architecture.architecture_name`).

    ``overrides`` replace config fields (``quick_gelu=True``, ``vision={"patch_dropout": 0.5}``).
    ``image_alpha`` ("composite", "composite:#RRGGBB", "drop") overrides the weights' alpha rule.
    ``image_naflex=False`` preprocesses at the fixed square ``image_size`` where the weights'
    preprocessing is NaFlex (SigLIP 2 at native aspect ratio: the default of ``Siglip2Model``
    folders with a ``Siglip2ImageProcessor``, as in transformers, and of checkpoints saved so).
    ``image_naflex_resize`` ("siglip2" or "timm") overrides whose NaFlex resize runs: by default
    the weights' origin's (timm's for open_clip main's NaFlex tags and repositories, transformers'
    ``Siglip2ImageProcessor`` for Siglip2 folders). Like open_clip, the model is returned in
    train mode; call ``.eval()`` for inference.
    """
    if isinstance(name_or_config, str) and is_hub_spec(name_or_config):
        if pretrained is not None:
            raise ConfigError(f"give either an 'hf-hub:' model ({name_or_config!r}) or pretrained=, not both")
        name_or_config, pretrained = None, name_or_config  # open_clip style: create_model("hf-hub:org/name")
    requested = name_or_config if isinstance(name_or_config, str) else None
    tag_name = None if requested is None or is_config_file(requested) else requested  # tags need a name
    weights = resolve_weights(tag_name, pretrained, cache_dir) if pretrained else None
    cfg = _choose_config(name_or_config, weights, overrides)
    model = _build_loaded(cfg, weights, strict)
    image_overrides = {
        "mean": image_mean,
        "std": image_std,
        "interpolation": image_interpolation,
        "resize_mode": image_resize_mode,
        "alpha": image_alpha,  # "composite", "composite:#RRGGBB" or "drop"; overrides the stored one
        "naflex": image_naflex,  # False: the fixed-size square resize instead of NaFlex
        "naflex_resize": image_naflex_resize,  # "siglip2" / "timm": whose NaFlex resize
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
    if pretrained is None and not (isinstance(name_or_config, str) and is_source(name_or_config)):
        raise ConfigError(
            "create_model_from_pretrained needs pretrained= (a tag, 'hf-hub:...', a file or a folder)"
        )
    if pretrained is None:  # create_model_from_pretrained("hf-hub:org/name") / ("path/to/dir")
        name_or_config, pretrained = None, name_or_config
    model, _, val = create_model_and_transforms(name_or_config, pretrained, **kwargs)
    return model, val


def load_pretrained_dir(
    directory: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """Rebuild a saved model folder, with ``preprocess_cfg`` and ``tokenizer_cfg`` restored on it."""
    return create_model(None, pretrained=str(directory), device=device, dtype=dtype)


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
    from clipforge.checkpoints.convert import DTYPES, TARGETS, save_as

    if to not in TARGETS:
        raise ConfigError(f"unknown target format {to!r}; choose one of {', '.join(TARGETS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model = create_model(model_name, pretrained=str(src), cache_dir=cache_dir)
    if dtype is not None:
        model.to(DTYPES[dtype])
    out = save_as(model, dst, to)
    log.info("converted %s -> %s (%s)", src, out, to)
    return out


# --- tokenizers ------------------------------------------------------------------------------------
def _tokenizer_settings(source: str) -> dict[str, Any]:
    """Tokenizer settings stored with a checkpoint, read from its config alone when there is one."""
    from clipforge.checkpoints import clipforge_format, hf, hf_siglip
    from clipforge.hf_tokenizer import with_model_dir

    path = source_path(source)
    if path.is_dir() and clipforge_format.is_clipforge_dir(path):
        data = clipforge_format.read_config(path)
        text = data["model_config"].get("text", {})
        stored = data.get("tokenizer_cfg")
        if stored:
            return with_model_dir({"context_length": text.get("context_length", 77), **stored}, path)
        config = CLIPConfig.from_dict(data["model_config"], source=str(path / clipforge_format.CONFIG_NAME))
        return _tokenizer_cfg(config, None, path)
    if path.is_dir() and hf_siglip.is_siglip_dir(path):
        return _tokenizer_cfg(hf_siglip.load_siglip_config(path), None, path)
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
    elif isinstance(name_or_model, str) and is_source(name_or_model):
        settings = _tokenizer_settings(name_or_model)
    elif isinstance(name_or_model, str):
        settings = tokenizer_cfg_for(get_model_config(name_or_model).text)
    if context_length is not None:
        settings["context_length"] = context_length
    settings.update(kwargs)
    return _build_tokenizer(settings)
