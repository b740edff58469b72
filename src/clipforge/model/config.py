"""Typed model configuration.

A config is the single source of truth for an architecture: it is what the registry stores, what
``create_model`` builds from, and what every checkpoint carries in ``config.json`` so that a
checkpoint alone can rebuild its model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError

#: Bumped when the meaning of a saved config changes; loaders refuse configs from the future.
CONFIG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class VisionConfig:
    """Image tower. ``patch_size=None`` with a 4-tuple ``layers`` means CLIP's modified ResNet."""

    image_size: int = 224
    patch_size: int | None = 32
    width: int = 768
    layers: int | tuple[int, int, int, int] = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    patch_dropout: float = 0.0
    pool_type: str = "tok"  # "tok" (class token) | "avg" (mean of patch tokens)
    final_ln_after_pool: bool = False  # open_clip variant: LN applied after pooling, not to all tokens
    no_ln_pre: bool = False
    # A timm image tower, with open_clip's TimmModel options (its names and meanings): ``timm_pool``
    # is timm's ``global_pool`` ("" = none, "avg", "token", "map", ...) or open_clip's "abs_attn" /
    # "rot_attn"; ``timm_proj`` the projection after it: "linear" or "mlp" (open_clip's head),
    # "none" (trunk features pass through) or "head" (timm's own classifier head, built with
    # ``num_classes=embed_dim``: what open_clip does for ``timm_proj: null``).
    timm_model_name: str | None = None
    timm_pretrained: bool = False
    timm_pool: str = "avg"
    timm_proj: str = "linear"
    timm_proj_bias: bool = False
    timm_drop: float = 0.0
    timm_drop_path: float | None = None
    # Extra keyword arguments for ``timm.create_model`` (e.g. ``embed_dim``/``depth`` for the small
    # instances tests and demos train); open_clip has no such field, so it is never read from its configs.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # CoCa (open_clip's names): an attention pooler over the final tokens replaces the class token;
    # its first query is the contrastive embedding and the rest are the captioning decoder's memory.
    attentional_pool: bool = False
    attn_pooler_queries: int = 256
    attn_pooler_heads: int = 8

    @property
    def is_resnet(self) -> bool:
        return self.timm_model_name is None and self.patch_size is None

    @property
    def heads(self) -> int:
        # The ResNet's attention pool uses 64-wide heads over its final 32*width channels.
        if self.is_resnet:
            return self.width * 32 // 64
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        if self.patch_size is None:
            raise ConfigError("grid_size is only defined for ViT image towers")
        return self.image_size // self.patch_size

    def validate(self) -> None:
        if self.timm_model_name is not None:
            return
        if self.is_resnet:
            if not (isinstance(self.layers, (tuple, list)) and len(self.layers) == 4):
                raise ConfigError(f"vision.layers must be 4 stage depths for a ResNet, got {self.layers!r}")
            if self.image_size % 32:
                raise ConfigError(
                    f"vision.image_size must be a multiple of 32 for a ResNet, got {self.image_size}"
                )
            return
        if not isinstance(self.layers, int):
            raise ConfigError(f"vision.layers must be an int for a ViT, got {self.layers!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}"
            )
        if self.width % self.head_width:
            raise ConfigError(
                f"vision.width {self.width} is not a multiple of vision.head_width {self.head_width}"
            )
        if self.pool_type not in ("tok", "avg"):
            raise ConfigError(f"vision.pool_type must be 'tok' or 'avg', got {self.pool_type!r}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"vision.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.attentional_pool and self.attn_pooler_queries < 2:
            raise ConfigError(
                f"vision.attn_pooler_queries must be >= 2 (one contrastive query plus caption tokens), "
                f"got {self.attn_pooler_queries}"
            )


@dataclass(frozen=True)
class TextConfig:
    """Text transformer (open_clip's ``text_cfg`` names and defaults), or a Hugging Face encoder.

    SigLIP-style towers set ``no_causal_mask`` (bidirectional attention), ``pool_type="last"``,
    ``proj_bias``, ``norm_eps=1e-6`` and, for SigLIP 2, ``act_approximate="tanh"``.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    pool_type: str = "argmax"  # "argmax" (EOT = highest id, CLIP) | "eos" (first eos_id) | "last" | "first"
    proj_bias: bool = False
    proj_type: str = "linear"  # "linear" | "none" (identity: needs width == embed_dim)
    pad_id: int = 0
    eos_id: int = 2  # open_clip's default; read by pool_type="eos"
    no_causal_mask: bool = False  # bidirectional attention (SigLIP, MobileCLIP text towers)
    norm_eps: float = 1e-5  # LayerNorm epsilon (SigLIP: 1e-6)
    act_approximate: str = "none"  # GELU approximation: "none" | "tanh" (SigLIP 2)
    hf_model_name: str | None = None  # optional Hugging Face text tower
    hf_pooler_type: str = "mean"
    hf_proj_type: str = "linear"
    # The tokenizer the weights were trained with (open_clip's names): a Hugging Face tokenizer
    # (hub id or local folder) instead of CLIP's BPE, and open_clip HFTokenizer's options.
    hf_tokenizer_name: str | None = None
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    # CoCa (open_clip's names): a learned class token appended after the text, pooled for the
    # contrastive embedding. open_clip's released CoCa weights were trained with its original mask,
    # which is shifted by one position; ``correct_cls_mask=True`` selects the fixed one.
    embed_cls: bool = False
    correct_cls_mask: bool = False

    def validate(self) -> None:
        if self.hf_model_name is not None:
            return
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} is not a multiple of text.heads {self.heads}")
        if self.pool_type not in ("argmax", "eos", "last", "first"):
            raise ConfigError(
                f"text.pool_type must be 'argmax', 'eos', 'last' or 'first', got {self.pool_type!r}"
            )
        if self.proj_type not in ("linear", "none"):
            raise ConfigError(f"text.proj_type must be 'linear' or 'none', got {self.proj_type!r}")
        if self.act_approximate not in ("none", "tanh"):
            raise ConfigError(f"text.act_approximate must be 'none' or 'tanh', got {self.act_approximate!r}")
        if self.context_length < 2:
            raise ConfigError(f"text.context_length must be >= 2 (SOT and EOT), got {self.context_length}")


@dataclass(frozen=True)
class MultimodalConfig:
    """CoCa's captioning decoder: causal self-attention plus cross-attention to the image tokens.

    ``width`` must equal the model's ``embed_dim`` (the pooled image tokens it attends to have
    that width, as in open_clip). Its LM head predicts ``vocab_size`` tokens.
    """

    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    context_length: int = 76
    vocab_size: int = 49408

    def validate(self, embed_dim: int) -> None:
        if self.width % self.heads:
            raise ConfigError(
                f"multimodal.width {self.width} is not a multiple of multimodal.heads {self.heads}"
            )
        if self.width != embed_dim:
            raise ConfigError(
                f"multimodal.width {self.width} must equal embed_dim {embed_dim}: the decoder "
                "cross-attends to the pooled image tokens, which have embed_dim channels"
            )
        if self.context_length < 2:
            raise ConfigError(f"multimodal.context_length must be >= 2, got {self.context_length}")


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: two towers projected into one ``embed_dim`` space."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI's released weights were trained with x * sigmoid(1.702 x)
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # set (e.g. -10) for SigLIP models
    format_version: int = CONFIG_FORMAT_VERSION
    multimodal: MultimodalConfig | None = None  # set for CoCa (captioning decoder)
    # open_clip's CustomTextCLIP layout: its state dicts keep the text tower under ``text.``
    # (clipforge always does). Only the key layout written back to open_clip depends on it.
    custom_text: bool = False

    def validate(self) -> CLIPConfig:
        if self.embed_dim <= 0:
            raise ConfigError(f"embed_dim must be positive, got {self.embed_dim}")
        if self.format_version > CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {self.format_version} is newer than this clipforge understands "
                f"({CONFIG_FORMAT_VERSION}); upgrade clipforge to load it"
            )
        self.vision.validate()
        self.text.validate()
        if self.multimodal is not None:
            self._validate_coca()
        return self

    def _validate_coca(self) -> None:
        """A captioner needs CoCa's two towers: the attention pooler and the class-token text encoder."""
        self.multimodal.validate(self.embed_dim)
        if not self.vision.attentional_pool or self.vision.is_resnet or self.vision.timm_model_name:
            raise ConfigError(
                "a CoCa model (multimodal set) needs a ViT image tower with attentional_pool=True"
            )
        if not self.text.embed_cls or self.text.hf_model_name:
            raise ConfigError(
                "a CoCa model (multimodal set) needs the built-in text tower with embed_cls=True"
            )
        if self.multimodal.vocab_size != self.text.vocab_size:
            raise ConfigError(
                f"multimodal.vocab_size {self.multimodal.vocab_size} differs from text.vocab_size "
                f"{self.text.vocab_size}: the decoder reads the text tower's tokens"
            )

    @property
    def is_coca(self) -> bool:
        return self.multimodal is not None

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> CLIPConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        vision = _build(VisionConfig, data.pop("vision", {}), f"{source}: vision")
        text = _build(TextConfig, data.pop("text", {}), f"{source}: text")
        multimodal = data.pop("multimodal", None)
        if multimodal is not None:
            multimodal = _build(MultimodalConfig, multimodal, f"{source}: multimodal")
        cfg = _build(cls, data, source, vision=vision, text=text, multimodal=multimodal)
        return cfg.validate()

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> CLIPConfig:
        path = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        source = str(path) if path else "config"
        raw = path.read_text() if path else str(text_or_path)
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{source}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
        if isinstance(data, dict) and "model_config" in data:  # clipforge's config.json wraps it
            data = data["model_config"]
        return cls.from_dict(data, source)

    def replace(self, **overrides: Any) -> CLIPConfig:
        """Copy with overrides; ``vision``/``text``/``multimodal`` accept dicts of field overrides."""
        vision = self.vision
        text = self.text
        multimodal = self.multimodal
        if isinstance(overrides.get("vision"), dict):
            vision = dataclasses.replace(vision, **overrides.pop("vision"))
        if isinstance(overrides.get("text"), dict):
            text = dataclasses.replace(text, **overrides.pop("text"))
        if isinstance(overrides.get("multimodal"), dict):
            changes = overrides.pop("multimodal")
            multimodal = (
                dataclasses.replace(multimodal, **changes) if multimodal else MultimodalConfig(**changes)
            )
        multimodal = overrides.pop("multimodal", multimodal)
        return dataclasses.replace(
            self, vision=vision, text=text, multimodal=multimodal, **overrides
        ).validate()


def _build(kind: type, data: Any, source: str, **extra: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; known fields: {sorted(names - set(extra))}")
    data = dict(data)
    if "layers" in data and isinstance(data["layers"], list):
        data["layers"] = tuple(data["layers"])
    try:
        return kind(**data, **extra)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
