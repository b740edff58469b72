"""Load any supported checkpoint: format detection, unwrapping, and errors that say what to do.

Formats: clipforge folders (``model.safetensors`` + ``config.json``), Hugging Face ``CLIPModel``
folders, open_clip state dicts and Hub folders (``open_clip_config.json``), OpenAI's files
(TorchScript or plain), and bare ``.safetensors``/``.pt``/``.bin`` state dicts in any of those
namings. Everything is converted to clipforge's key names here, so the rest of the library sees
one layout. Nothing executes pickled code (see :mod:`clipforge.checkpoints.io`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints import clipforge_format, hf, hf_siglip, openai
from clipforge.checkpoints.io import is_torchscript_archive, load_safetensors, safe_torch_load
from clipforge.checkpoints.open_clip import (
    infer_config,
    is_open_clip_state_dict,
    open_clip_to_clipforge,
    strip_prefixes,
)
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

FORMATS = ("clipforge", "hf", "open_clip", "openai")
#: Keys under which training loops store the model's weights, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "weights")
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass
class LoadedCheckpoint:
    """A state dict in clipforge naming plus what the checkpoint said about itself."""

    state_dict: dict[str, torch.Tensor]
    format: str
    path: Path
    config: CLIPConfig | None = None  # stored config (clipforge / HF / open_clip dirs), else None
    preprocess_cfg: dict[str, Any] | None = None
    tokenizer_cfg: dict[str, Any] | None = None
    quick_gelu: bool | None = None  # known from the format (OpenAI -> True), else None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_extra(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "preprocess_cfg": self.preprocess_cfg,
            "tokenizer_cfg": self.tokenizer_cfg,
            "quick_gelu": self.quick_gelu,
            "path": str(self.path),
            **self.extra,
        }

    def resolve_config(self) -> CLIPConfig:
        """The stored config, else one inferred from the weights' shapes."""
        if self.config is not None:
            return self.config
        return infer_config(self.state_dict, quick_gelu=self.quick_gelu)


# --- unwrapping and classification ----------------------------------------------------------------
def _has_tensors(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside ``obj``: a state dict, or a training checkpoint wrapping one."""
    for _ in range(3):  # wrappers can nest, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: expected a state dict (mapping), got {type(obj).__name__}")
        # A state dict's values are tensors, so a wrapper key holding a mapping is a wrapper.
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None and _has_tensors(obj):
            break
        if inner is None:
            raise CheckpointError(
                f"{source}: no model weights found; top-level keys are {sorted(map(str, obj))[:20]} "
                f"(expected tensors or one of {list(_WRAPPER_KEYS)})"
            )
        obj = inner
    return strip_prefixes({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _has_clipforge_names(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("text.", "visual.")) for k in sd)


#: ``(format, test)`` in the order they are tried: the first test that holds names the format
#: (the HF and OpenAI namings are the most specific; open_clip's overlaps clipforge's).
_STATE_DICT_TESTS: tuple[tuple[str, Callable[[Mapping[str, Any]], bool]], ...] = (
    ("hf", hf.is_hf_state_dict),
    ("openai", openai.is_openai_state_dict),
    ("open_clip", is_open_clip_state_dict),
    ("clipforge", _has_clipforge_names),
)
#: The folders :func:`detect_format` knows without reading weights.
_DIR_TESTS: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("clipforge", clipforge_format.is_clipforge_dir),
    ("hf", hf.is_hf_dir),
)


def _first_format(tests: tuple[tuple[str, Callable[[Any], bool]], ...], obj: Any) -> str | None:
    """The format of the first test ``obj`` passes (one detection ladder for dicts and folders)."""
    return next((fmt for fmt, test in tests if test(obj)), None)


def classify_state_dict(sd: Mapping[str, Any]) -> str:
    """Which naming a state dict uses: ``hf``, ``openai``, ``open_clip`` or ``clipforge``."""
    fmt = _first_format(_STATE_DICT_TESTS, sd)
    if fmt is None:
        raise CheckpointError(f"unrecognised state-dict layout; first keys: {list(sd)[:8]}")
    return fmt


def to_clipforge_names(sd: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "hf":
        return hf.hf_to_clipforge(sd)
    if fmt in ("open_clip", "openai"):
        return open_clip_to_clipforge(sd)
    return dict(sd)


# --- open_clip's config json ----------------------------------------------------------------------
def _read_open_clip_json(path: Path) -> tuple[CLIPConfig | None, dict[str, Any] | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read open_clip config: {e}") from None
    model_cfg = data.get("model_cfg")
    config = config_from_open_clip(model_cfg, str(path)) if isinstance(model_cfg, Mapping) else None
    pre = data.get("preprocess_cfg")
    if isinstance(pre, Mapping) and config is not None:
        from clipforge.transforms import PreprocessConfig

        # open_clip's own keys, plus the convention clipforge writes next to them (round trip);
        # a file open_clip wrote has none, so the open_clip defaults of the format apply.
        known = {f.name for f in dataclasses.fields(PreprocessConfig)} - {"image_size"}
        pre = {
            **PreprocessConfig.defaults_for("open_clip", config.vision.image_size),
            **({} if "naflex_max_patches" in pre else _naflex_fields(model_cfg, config)),
            **{k: pre[k] for k in known if k in pre},
        }
    return config, dict(pre) if isinstance(pre, Mapping) else None


def _naflex_fields(model_cfg: Mapping[str, Any], config: CLIPConfig) -> dict[str, Any]:
    """open_clip main's NaFlex fact as clipforge's preprocessing: a ``naflexvit`` trunk's
    ``vision_cfg.image_seq_len`` is the patch budget its eval transform keeps the aspect ratio in,
    and that transform is timm's (``naflex_resize`` "timm"). Only for files open_clip wrote: one
    clipforge wrote carries its own ``naflex_max_patches`` and resize (saved before the choice
    existed: Siglip2's, as it preprocessed then), so the caller skips this for it."""
    seq_len = (model_cfg.get("vision_cfg") or {}).get("image_seq_len")
    if seq_len is None or not (config.vision.timm_model_name or "").startswith("naflexvit"):
        return {}
    return {
        "naflex_max_patches": int(seq_len),
        "naflex_patch_size": config.vision.patch_size,
        "naflex_resize": "timm",
    }


# --- readers --------------------------------------------------------------------------------------
def _read_weight_file(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if path.suffix == ".safetensors":
        sd = strip_prefixes(load_safetensors(path)[0])
    else:
        sd = unwrap_state_dict(safe_torch_load(path), path)
    if not sd:
        raise CheckpointError(f"{path}: contains no tensors")
    try:
        fmt = classify_state_dict(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return sd, fmt


def _check_json(path: Path) -> None:
    """A config that exists but does not parse must stop the load, not be silently skipped."""
    if path.is_file():
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid JSON ({e}); fix or remove it") from None


def _load_dir(path: Path) -> LoadedCheckpoint:
    _check_json(path / "config.json")
    _check_json(path / "open_clip_config.json")
    if clipforge_format.is_clipforge_dir(path):
        ck = clipforge_format.read_pretrained_dir(path)
        return LoadedCheckpoint(
            ck.state_dict, "clipforge", path, ck.config, ck.preprocess_cfg, ck.tokenizer_cfg, extra=ck.extra
        )
    if hf_siglip.is_siglip_dir(path):
        sd, config, pre, tok, extra = hf_siglip.load_siglip_dir(path)
        return LoadedCheckpoint(sd, "hf", path, config, pre, tok, quick_gelu=False, extra=extra)
    if hf.is_hf_dir(path):
        sd, config = hf.load_hf_dir(path)
        pre = hf.read_preprocessor_config(path, config.vision.image_size)
        return LoadedCheckpoint(sd, "hf", path, config, pre, quick_gelu=config.quick_gelu)
    weights = next((path / n for n in _OPEN_CLIP_FILES if (path / n).is_file()), None)
    if weights is None:
        candidates = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        if len(candidates) != 1:
            raise CheckpointError(
                f"{path}: not a checkpoint folder (expected config.json + model.safetensors, a Hugging Face "
                f"CLIPModel folder, or open_clip weights); weight files found: {[p.name for p in candidates]}"
            )
        weights = candidates[0]
    loaded = _load_file(weights)
    oc_json = path / "open_clip_config.json"
    if oc_json.is_file():
        loaded.config, loaded.preprocess_cfg = _read_open_clip_json(oc_json)
    return loaded


def _load_file(path: Path) -> LoadedCheckpoint:
    if is_torchscript_archive(path):
        sd, config = openai.load_openai(path)
        return LoadedCheckpoint(sd, "openai", path, None, quick_gelu=True, extra={"torchscript": True})
    raw, fmt = _read_weight_file(path)
    sd = to_clipforge_names(raw, fmt)
    return LoadedCheckpoint(sd, fmt, path, None, quick_gelu=True if fmt == "openai" else None)


def load_any(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint file or folder of any supported format (``hf-hub:`` specs resolved first)."""
    from clipforge.checkpoints.hub import is_hub_spec, resolve_hub

    if is_hub_spec(path):
        path = resolve_hub(str(path))
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return _load_dir(path) if path.is_dir() else _load_file(path)


def load_state_dict_any(path: str | Path) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """``(state_dict in clipforge names, format, extra)``; extra holds any stored config/preprocessing."""
    loaded = load_any(path)
    return loaded.state_dict, loaded.format, loaded.as_extra()


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS` for a file or folder (reads the file's keys, never runs its code)."""
    path = Path(path)
    if path.is_dir():
        fmt = _first_format(_DIR_TESTS, path)
    else:
        fmt = "openai" if is_torchscript_archive(path) else None
    return fmt or load_any(path).format


# --- fitting a model ------------------------------------------------------------------------------
def _cfg_signature(cfg: CLIPConfig) -> tuple:
    v, t = cfg.vision, cfg.text
    return (
        v.is_resnet,
        v.width,
        v.layers,
        v.patch_size,
        v.image_size,
        t.width,
        t.layers,
        cfg.embed_dim,
        cfg.multimodal is not None,  # a CoCa is never the closest twin of a CLIP, nor the reverse
    )


def closest_architecture(cfg: CLIPConfig) -> tuple[str, bool]:
    """The registered name whose shapes are nearest to ``cfg``, and whether it matches exactly.

    "Exactly" means every architectural field (:func:`~clipforge.model.architecture.registered_match`),
    not only the shapes compared for nearness: a name is never claimed for a config that differs.
    """
    from clipforge.model.architecture import registered_match
    from clipforge.model.registry import get_model_config, list_models

    match = registered_match(cfg)
    if match is not None:
        return match, True
    target = _cfg_signature(cfg)
    best, best_score = "", -1
    for name in list_models():
        sig = _cfg_signature(get_model_config(name))
        score = sum(a == b for a, b in zip(sig, target))
        if score > best_score:
            best, best_score = name, score
    return best, False


def _fmt_list(keys: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def mismatch_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> str | None:
    """A human-readable description of how ``sd`` fails to fit ``model``, or None if it fits."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if not (missing or unexpected or shapes):
        return None
    lines = [f"{source}: checkpoint does not fit the model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_fmt_list(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_fmt_list(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_fmt_list(shapes, 8)}")
    try:
        name, exact = closest_architecture(infer_config(sd))
        kind = "matches" if exact else "is closest to"
        lines.append(
            f"  the checkpoint {kind} the registered architecture {name!r}: use create_model({name!r}, ...), "
            "or create_model(None, pretrained=...) to build the architecture inferred from the checkpoint"
        )
    except (CheckpointError, ConfigError, KeyError, ValueError, IndexError) as e:
        lines.append(f"  (could not infer the checkpoint's architecture: {e})")
    return "\n".join(lines)


def apply_state_dict(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str,
    strict: bool = True,
    *,
    assign: bool = False,
) -> Any:
    """``model.load_state_dict`` with a readable error; shape mismatches are always errors.

    ``assign=True`` (strict only) fills a model whose parameters are on the meta device: each
    tensor is first copied into a fresh one of the model's dtype and layout, so the result is
    bit-identical to an ordinary load and shares no storage with ``sd``.
    """
    report = mismatch_report(model, sd, source)
    if report is not None:
        own = model.state_dict()
        bad_shapes = any(k in own and tuple(v.shape) != tuple(own[k].shape) for k, v in sd.items())
        if strict or bad_shapes:
            raise CheckpointError(report)
        log.warning("%s", report)
    if not assign:
        return model.load_state_dict(dict(sd), strict=strict)
    if not strict:
        raise ValueError("apply_state_dict(assign=True) needs strict=True: every tensor must come from sd")
    return model.load_state_dict(_fresh_copies(model, sd), strict=True, assign=True)


def _fresh_copies(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd``'s tensors copied as ``load_state_dict`` would copy them into ``model``'s own
    (same dtype, shape and strides; a meta tensor's copy is made on the CPU)."""
    out = {}
    with torch.no_grad():
        for key, own in model.state_dict(keep_vars=True).items():
            device = torch.device("cpu") if own.is_meta else own.device
            out[key] = torch.empty_like(own, device=device).copy_(sd[key])
    return out


def warn_activation(model: torch.nn.Module, loaded: LoadedCheckpoint) -> None:
    config = getattr(model, "config", None)
    wanted = loaded.config.quick_gelu if loaded.config is not None else loaded.quick_gelu
    if config is not None and wanted is not None and bool(wanted) != bool(config.quick_gelu):
        act = "QuickGELU" if wanted else "GELU"
        log.warning(
            "%s: the weights were trained with %s but the model uses %s; features will be off. "
            "Build the model with quick_gelu=%s (e.g. the '-quickgelu' model name).",
            loaded.path,
            act,
            "QuickGELU" if config.quick_gelu else "GELU",
            bool(wanted),
        )


def load_checkpoint(model: torch.nn.Module, path: str | Path, strict: bool = True) -> Any:
    """Load weights of any supported format into ``model`` (format detected automatically).

    Raises ``CheckpointError`` listing missing/unexpected keys and shape mismatches and naming
    the closest registered architecture. Stored preprocessing/tokenizer settings are set on the
    model (``model.preprocess_cfg``, ``model.tokenizer_cfg``).
    """
    loaded = load_any(path)
    warn_activation(model, loaded)
    result = apply_state_dict(model, loaded.state_dict, f"{loaded.path} ({loaded.format})", strict=strict)
    if loaded.preprocess_cfg is not None:
        from clipforge.transforms import PreprocessConfig

        model.preprocess_cfg = PreprocessConfig.coerce(dict(loaded.preprocess_cfg))
    if loaded.tokenizer_cfg is not None:
        model.tokenizer_cfg = dict(loaded.tokenizer_cfg)
    return result


__all__ = [
    "FORMATS",
    "LoadedCheckpoint",
    "apply_state_dict",
    "classify_state_dict",
    "closest_architecture",
    "detect_format",
    "load_any",
    "load_checkpoint",
    "load_state_dict_any",
    "unwrap_state_dict",
]
