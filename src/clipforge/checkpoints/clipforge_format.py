"""clipforge's own checkpoint folder: ``model.safetensors`` + ``config.json``.

``config.json`` carries everything needed to use the weights correctly - the model config, the
preprocessing (image size, mean/std, resize mode, interpolation) and the tokenizer settings - so
``create_model_and_transforms(pretrained=dir)`` restores all three. Loading weights with the
wrong preprocessing is silent and costs accuracy; storing it beside the weights removes the guess.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.atomic import atomic_write_text
from clipforge.checkpoints.io import load_safetensors, save_safetensors
from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

#: Version of this folder layout; readers refuse folders from a newer clipforge.
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class ClipforgeCheckpoint:
    """What a clipforge folder holds, before a model is built from it."""

    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig
    preprocess_cfg: dict[str, Any] | None = None
    tokenizer_cfg: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def is_clipforge_dir(path: str | Path) -> bool:
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_config" in data


def save_pretrained(
    model: torch.nn.Module,
    directory: str | Path,
    tokenizer_cfg: dict[str, Any] | None = None,
    *,
    preprocess_cfg: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (each atomically) into ``directory``.

    The config is written last, so a folder with a config always has the matching weights.
    ``tokenizer_cfg`` defaults to ``model.tokenizer_cfg`` (set when the model was loaded) or
    CLIP's BPE tokenizer at the model's context length.
    """
    from clipforge import __version__
    from clipforge.transforms import PreprocessConfig

    directory = Path(directory)
    config: CLIPConfig = model.config
    pre = PreprocessConfig.stored_dict(
        preprocess_cfg if preprocess_cfg is not None else getattr(model, "preprocess_cfg", None),
        config.vision.image_size,
    )
    tok = tokenizer_cfg or getattr(model, "tokenizer_cfg", None)
    if tok is not None and hasattr(tok, "to_dict"):
        tok = tok.to_dict()
    if not tok:  # CLIP BPE, or the Hugging Face tokenizer the text config names
        from clipforge.hf_tokenizer import tokenizer_cfg_for

        tok = tokenizer_cfg_for(config.text)
    tok = dict(tok)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        model.state_dict(),
        directory / WEIGHTS_NAME,
        metadata={"format": "pt", "clipforge_format_version": str(FORMAT_VERSION)},
    )
    document = {
        "format_version": FORMAT_VERSION,
        "clipforge_version": __version__,
        "model_config": config.to_dict(),
        "preprocess_cfg": _jsonable(pre),
        "tokenizer_cfg": _jsonable(tok),
    }
    label = getattr(model, "architecture", None)  # e.g. "custom (from my-arch.json)"; see create_model
    if isinstance(label, str) and label:
        extra = {"architecture": label, **(extra or {})}
    if extra:
        document["extra"] = _jsonable(extra)
    atomic_write_text(directory / CONFIG_NAME, json.dumps(document, indent=2) + "\n")
    log.info("saved clipforge checkpoint to %s", directory)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json``, refusing folders written by a newer clipforge."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict) or "model_config" not in data:
        raise CheckpointError(f"{path}: not a clipforge config (no 'model_config')")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} was written by clipforge "
            f"{data.get('clipforge_version', '?')}; this clipforge reads format_version <= {FORMAT_VERSION}. "
            "Upgrade clipforge (pip install -U clipforge) to load it."
        )
    return data


def read_pretrained_dir(directory: str | Path) -> ClipforgeCheckpoint:
    directory = Path(directory)
    data = read_config(directory)
    try:
        config = CLIPConfig.from_dict(data["model_config"], source=f"{directory / CONFIG_NAME}: model_config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (config.json is there but the weights are not)")
    state_dict, _ = load_safetensors(weights)
    return ClipforgeCheckpoint(
        state_dict=state_dict,
        config=config,
        preprocess_cfg=data.get("preprocess_cfg"),
        tokenizer_cfg=data.get("tokenizer_cfg"),
        extra=data.get("extra") or {},
    )
