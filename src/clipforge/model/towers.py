"""Optional towers from other libraries behind clipforge's tower contract.

``TimmImageTower`` wraps any timm backbone (Hugging Face text towers: :mod:`clipforge.model.hf_text`).
Module names (``trunk``/``head.proj``) follow open_clip's adapter so its checkpoints for such
models keep their keys. timm is imported only here, and only when such a tower is built.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import VisionConfig
from clipforge.model.layers import set_requires_grad

logger = logging.getLogger(__name__)


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"this model needs {module!r}: pip install 'clipforge[{extra}]'") from None


class TimmImageTower(nn.Module):
    """timm backbone (classifier removed, ``timm_pool`` pooling) + a linear projection head."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        timm = _require("timm", "timm")
        kwargs = {"pretrained": cfg.timm_pretrained, "num_classes": 0, "global_pool": cfg.timm_pool}
        try:  # ViT-like trunks take the input size; convolutional ones do not accept the argument.
            self.trunk = timm.create_model(cfg.timm_model_name, img_size=cfg.image_size, **kwargs)
        except TypeError:
            self.trunk = timm.create_model(cfg.timm_model_name, **kwargs)
        features = self.trunk.num_features
        if cfg.timm_proj == "linear":
            self.head = nn.Sequential(OrderedDict(proj=nn.Linear(features, embed_dim, bias=False)))
        elif cfg.timm_proj in ("none", ""):
            if features != embed_dim:
                raise ConfigError(
                    f"timm_proj='none' needs trunk features ({features}) == embed_dim ({embed_dim})"
                )
            self.head = nn.Identity()
        else:
            raise ConfigError(f"vision.timm_proj must be 'linear' or 'none', got {cfg.timm_proj!r}")
        self.image_size = cfg.image_size
        self.output_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.trunk.set_grad_checkpointing(enable)
        except (AttributeError, NotImplementedError, AssertionError):
            logger.warning("timm model %s does not support grad checkpointing", type(self.trunk).__name__)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk (the projection head stays trainable, as in LiT)."""
        if unlocked_groups:
            raise ConfigError("partial locking of timm towers is not supported; use unlocked_groups=0")
        set_requires_grad(self.trunk, False)
        if freeze_bn_stats:
            from timm.layers import freeze_batch_norm_2d

            self.trunk = freeze_batch_norm_2d(self.trunk)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{n}" for n in names}
