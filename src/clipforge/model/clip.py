"""CLIP: an image tower and a text tower projected into one embedding space."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.model.layers import activation
from clipforge.model.naflex import naflex_features


@dataclass
class CLIPOutput:
    """``forward``'s result: L2-normalised features and the exp()'d logit scale (and bias)."""

    image_features: torch.Tensor | None
    text_features: torch.Tensor | None
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None


def build_image_tower(cfg: VisionConfig, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    """ViT, modified ResNet or timm model, chosen by the config."""
    if cfg.timm_model_name:
        from clipforge.model.towers import TimmImageTower

        return TimmImageTower(cfg, embed_dim)
    if cfg.is_resnet:
        from clipforge.model.resnet import ModifiedResNet

        return ModifiedResNet(cfg, embed_dim)
    from clipforge.model.vision import VisionTransformer

    return VisionTransformer(cfg, embed_dim, activation(quick_gelu))


def build_text_tower(cfg: TextConfig, embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    """CLIP's causal text transformer, or a Hugging Face encoder when ``hf_model_name`` is set."""
    if cfg.hf_model_name:
        from clipforge.model.hf_text import HFTextTower

        return HFTextTower(cfg, embed_dim)
    from clipforge.model.text import TextTransformer

    return TextTransformer(cfg, embed_dim, activation(quick_gelu))


def _default_preprocess_cfg(image_size: int) -> Any:
    try:
        from clipforge.transforms import PreprocessConfig
    except ImportError:  # transforms not importable (e.g. torchvision missing): factory sets it later
        return None
    return PreprocessConfig(image_size=image_size)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.visual = build_image_tower(config.vision, config.embed_dim, config.quick_gelu)
        self.text = build_text_tower(config.text, config.embed_dim, config.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        bias = config.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.preprocess_cfg = _default_preprocess_cfg(config.vision.image_size)

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def init_parameters(self) -> None:
        """Re-initialise both towers (each already does this on construction) with OpenAI's scheme."""
        for tower in (self.visual, self.text):
            if hasattr(tower, "init_parameters"):
                tower.init_parameters()

    # --- encoders ---------------------------------------------------------------------------------
    def encode_image(
        self, images: torch.Tensor | Mapping[str, torch.Tensor], normalize: bool = False
    ) -> torch.Tensor:
        # a dict is a NaFlex batch (patches, patch_mask, spatial_shapes) at native aspect ratio
        features = (
            naflex_features(self.visual, images) if isinstance(images, Mapping) else self.visual(images)
        )
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CLIPOutput:
        image_features = self.encode_image(images, normalize=True) if images is not None else None
        text_features = self.encode_text(tokens, normalize=True) if tokens is not None else None
        return CLIPOutput(
            image_features=image_features,
            text_features=text_features,
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
        )

    def get_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image->text, text->image) logits, scaled (and biased) as in training."""
        out = self(images, tokens)
        logits = out.logit_scale * out.image_features @ out.text_features.T
        if out.logit_bias is not None:
            logits = logits + out.logit_bias
        return logits, logits.T

    # --- training helpers -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_groups: int = 0, freeze_layer_norm: bool = True) -> None:
        self.text.lock(unlocked_groups=unlocked_groups)

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale"} | ({"logit_bias"} if self.logit_bias is not None else set())
        names |= {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names
