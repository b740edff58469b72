"""clipforge: contrastive language-image models in one package.

The public API is resolved lazily so ``import clipforge`` stays cheap and the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    "CLIPConfig": "clipforge.model.config",
    "VisionConfig": "clipforge.model.config",
    "TextConfig": "clipforge.model.config",
    "list_models": "clipforge.model.registry",
    "get_model_config": "clipforge.factory",
    "register_model": "clipforge.model.registry",
    "CLIP": "clipforge.model.clip",
    "create_model": "clipforge.factory",
    "create_model_and_transforms": "clipforge.factory",
    "create_model_from_pretrained": "clipforge.factory",
    "get_tokenizer": "clipforge.factory",
    "list_pretrained": "clipforge.checkpoints.pretrained",
    "load_checkpoint": "clipforge.checkpoints.load",
    "save_pretrained": "clipforge.checkpoints.clipforge_format",
    "Tokenizer": "clipforge.tokenizer",
    "tokenize": "clipforge.tokenizer",
    "PreprocessConfig": "clipforge.transforms",
    "image_transform": "clipforge.transforms",
    "zero_shot_classifier": "clipforge.eval.zero_shot",
    "CLIPGuidance": "clipforge.guidance",
    "encode_text_for_conditioning": "clipforge.conditioning",
    "ClipforgeError": "clipforge.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'clipforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
