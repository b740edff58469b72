"""Optional towers from other libraries behind clipforge's tower contract.

``TimmImageTower`` wraps any timm backbone; ``HFTextTower`` any Hugging Face encoder. Module
names (``trunk``/``head.proj`` and ``transformer``/``proj``) follow open_clip's adapters so its
checkpoints for such models keep their keys. timm and transformers are imported only here, and
only when such a tower is built.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import TextConfig, VisionConfig
from clipforge.model.layers import set_requires_grad
from clipforge.model.text import TextOutput

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


class HFTextTower(nn.Module):
    """Hugging Face encoder (architecture from ``hf_model_name``, weights from the CLIP checkpoint)."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        transformers = _require("transformers", "hf")
        config = transformers.AutoConfig.from_pretrained(cfg.hf_model_name)
        self.transformer = transformers.AutoModel.from_config(config)
        self.pooler_type = cfg.hf_pooler_type
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = cfg.pad_id if pad is None else pad
        width = config.hidden_size
        if cfg.hf_proj_type == "linear":
            self.proj: nn.Module = nn.Linear(width, embed_dim, bias=False)
        elif cfg.hf_proj_type == "mlp":
            hidden = (width + embed_dim) // 2
            self.proj = nn.Sequential(
                nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
            )
        else:
            raise ConfigError(f"text.hf_proj_type must be 'linear' or 'mlp', got {cfg.hf_proj_type!r}")
        if self.pooler_type not in ("mean", "cls", "max"):
            raise ConfigError(f"text.hf_pooler_type must be 'mean', 'cls' or 'max', got {self.pooler_type!r}")
        self.context_length = cfg.context_length
        self.output_dim = embed_dim

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooler_type == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooler_type == "max":
            return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    def forward_hidden(self, tokens: torch.Tensor, pad_to_context: bool = False) -> TextOutput:
        mask = (tokens != self.pad_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        hidden = list(out.hidden_states)
        pooled = self.proj(self._pool(out.last_hidden_state, mask))
        return TextOutput(
            pooled=pooled, last_hidden=out.last_hidden_state, hidden_states=hidden, penultimate=hidden[-2]
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != self.pad_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask)
        return self.proj(self._pool(out.last_hidden_state, mask))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the encoder except its last ``unlocked_groups`` layers; the projection stays trainable."""
        set_requires_grad(self.transformer, False)
        layers = _encoder_layers(self.transformer)
        if unlocked_groups and layers is not None:
            set_requires_grad(list(layers[-unlocked_groups:]), True)

    def no_weight_decay(self) -> set[str]:
        return set()


def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    for path in ("encoder.layer", "encoder.layers", "layers", "h"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    return None
