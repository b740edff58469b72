"""An image tower made of any timm backbone, computing what open_clip's ``TimmModel`` computes.

open_clip builds SigLIP/SigLIP 2, ConvNeXt, EVA-02, MobileCLIP (FastViT), PE and ViTamin image
towers through timm. To load its ``visual.*`` weights unchanged and give the same features, the
tower is assembled as open_clip does: a timm ``trunk`` (timm's own pooling and, for
``timm_proj='head'``, its own classifier head as the projection) followed by a ``head``
``nn.Sequential`` holding an optional attention pool (``pool``), dropout (``drop``) and a linear
(``proj``) or MLP (``mlp``) projection. timm is imported only when such a tower is built.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import VisionConfig
from clipforge.model.layers import set_requires_grad
from clipforge.model.vision import VisionOutput

logger = logging.getLogger(__name__)

PROJECTIONS = ("linear", "mlp", "none", "head")
CUSTOM_POOLS = ("abs_attn", "rot_attn")
# timm.create_model arguments the tower sets itself, and the config field that sets each.
_OWN_KWARGS = {
    "pretrained": "vision.timm_pretrained",
    "num_classes": "vision.timm_proj",
    "global_pool": "vision.timm_pool",
    "drop_path_rate": "vision.timm_drop_path",
    "patch_drop_rate": "vision.patch_dropout",
    "drop_rate": "vision.timm_drop",
}


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("this model needs 'timm': pip install 'clipforge[timm]'") from None
    return timm


def _validate(cfg: VisionConfig) -> None:
    """Refuse what open_clip's adapter cannot build, naming the field, before timm sees it."""
    if cfg.timm_proj not in PROJECTIONS:
        raise ConfigError(f"vision.timm_proj must be one of {PROJECTIONS}, got {cfg.timm_proj!r}")
    if not 0.0 <= cfg.patch_dropout < 1.0:
        raise ConfigError(f"vision.patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
    clash = sorted(set(cfg.timm_kwargs) & set(_OWN_KWARGS))
    if clash:
        fields = ", ".join(f"{k} (set by {_OWN_KWARGS[k]})" for k in clash)
        raise ConfigError(f"vision.timm_kwargs must not set {fields}; use those fields instead")
    if cfg.timm_drop and cfg.timm_pool in CUSTOM_POOLS and cfg.timm_proj in ("none", "head"):
        raise ConfigError(
            f"vision.timm_drop={cfg.timm_drop} has no layer to act on: timm_pool={cfg.timm_pool!r} "
            f"with timm_proj={cfg.timm_proj!r} has no dropout (use timm_proj 'linear' or 'mlp')"
        )


def _trunk_kwargs(cfg: VisionConfig) -> dict[str, Any]:
    """``timm.create_model`` arguments shared by both of open_clip's construction paths.

    ``timm_drop`` is the dropout before the projection: open_clip's own head has it for
    'linear'/'mlp'; with timm's head ('head'/'none') it becomes timm's ``drop_rate`` (the same
    place in timm's models; open_clip ignores it there, and its configs all have 0).
    """
    kwargs = dict(cfg.timm_kwargs)
    if cfg.timm_drop_path is not None:
        kwargs["drop_path_rate"] = cfg.timm_drop_path
    if cfg.patch_dropout > 0:
        kwargs["patch_drop_rate"] = cfg.patch_dropout
    if cfg.timm_drop > 0 and cfg.timm_proj in ("none", "head"):
        kwargs["drop_rate"] = cfg.timm_drop
    return kwargs


def _create(cfg: VisionConfig, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with timm's refusals turned into ConfigErrors naming the field."""
    timm = _timm()
    name = cfg.timm_model_name
    try:
        return timm.create_model(name, pretrained=cfg.timm_pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(
                f"vision.timm_model_name {name!r} is not a model of timm {timm.__version__}"
            ) from None
        raise
    except TypeError as e:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not bad:
            raise
        where = _OWN_KWARGS.get(bad.group(1), "vision.timm_kwargs")
        raise ConfigError(
            f"timm model {name!r} does not take {bad.group(1)!r} (from {where}); "
            "leave that field at its default for this model"
        ) from None
    except AssertionError as e:
        raise ConfigError(f"timm refused to build {name!r} with {sorted(kwargs)}: {e}") from None


def build_trunk(cfg: VisionConfig, embed_dim: int) -> tuple[nn.Module, int, Any]:
    """The timm trunk, the width it hands to the head, and its feature-map size (custom pools).

    As open_clip: without an extra projection or custom pool, timm's classifier head is the
    projection (``num_classes=embed_dim``) or is removed (``'none'``) and ``timm_pool`` is its
    ``global_pool``; otherwise the classifier is reset to 0 classes and ``timm_pool`` replaces
    the default pooling only when set ('' keeps the network's own pool), or pooling is removed
    for an attention pool.
    """
    kwargs = _trunk_kwargs(cfg)
    custom_pool = cfg.timm_pool in CUSTOM_POOLS
    if cfg.timm_proj in ("none", "head") and not custom_pool:
        num_classes = embed_dim if cfg.timm_proj == "head" else 0
        trunk = _create(cfg, num_classes=num_classes, global_pool=cfg.timm_pool, **kwargs)
        return trunk, embed_dim, None
    trunk = _create(cfg, **kwargs)
    feat_size = trunk.default_cfg.get("pool_size", None)
    try:
        if custom_pool:
            if not feat_size:
                raise ConfigError(
                    f"vision.timm_pool={cfg.timm_pool!r} needs a trunk with a 2-D feature map; "
                    f"{cfg.timm_model_name!r} has no pool_size in its timm config"
                )
            trunk.reset_classifier(0, global_pool="")
        else:
            trunk.reset_classifier(0, **({"global_pool": cfg.timm_pool} if cfg.timm_pool else {}))
    except AssertionError as e:
        raise ConfigError(f"vision.timm_pool={cfg.timm_pool!r} for {cfg.timm_model_name!r}: {e}") from None
    return trunk, trunk.num_features, feat_size


def build_head(cfg: VisionConfig, width: int, embed_dim: int, feat_size: Any) -> nn.Sequential:
    """open_clip's adapter head: optional attention pool, then dropout + linear or an MLP."""
    from timm.layers import AttentionPool2d, Mlp, RotAttentionPool2d

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if cfg.timm_pool in CUSTOM_POOLS:
        try:
            if cfg.timm_pool == "abs_attn":
                layers["pool"] = AttentionPool2d(width, feat_size=feat_size, out_features=embed_dim)
            else:
                layers["pool"] = RotAttentionPool2d(width, out_features=embed_dim)
        except AssertionError:  # timm's attention pools use 64-wide heads
            raise ConfigError(
                f"vision.timm_pool={cfg.timm_pool!r}: {cfg.timm_model_name!r} puts out {width} channels, "
                "not a multiple of the attention pool's 64-wide heads"
            ) from None
        width = embed_dim
    if cfg.timm_proj == "linear":
        layers["drop"] = nn.Dropout(cfg.timm_drop)
        layers["proj"] = nn.Linear(width, embed_dim, bias=cfg.timm_proj_bias)
    elif cfg.timm_proj == "mlp":
        bias = (True, cfg.timm_proj_bias)
        layers["mlp"] = Mlp(width, 2 * embed_dim, embed_dim, drop=(cfg.timm_drop, 0), bias=bias)
    return nn.Sequential(layers)


def _check_output_width(cfg: VisionConfig, trunk: nn.Module, embed_dim: int) -> None:
    """'none' passes trunk features through: they must already be ``embed_dim`` wide."""
    if cfg.timm_proj != "none" or cfg.timm_pool in CUSTOM_POOLS:
        return
    width = getattr(trunk, "head_hidden_size", None) or trunk.num_features
    if width != embed_dim:
        raise ConfigError(
            f"vision.timm_proj='none' passes {cfg.timm_model_name!r}'s {width} features through, "
            f"but embed_dim is {embed_dim}; use timm_proj 'linear' or 'head', or embed_dim={width}"
        )


def _warn_fixed_size(cfg: VisionConfig, trunk: nn.Module) -> None:
    """A strict-size trunk built for another resolution fails on ``image_size`` inputs: say so now."""
    embed = getattr(trunk, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is None or not getattr(embed, "strict_img_size", False) or "img_size" in cfg.timm_kwargs:
        return
    if tuple(size) != (cfg.image_size, cfg.image_size):
        logger.warning(
            "timm model %s takes %s inputs but vision.image_size is %d; set vision.timm_kwargs "
            "{'img_size': %d} to build it for that size",
            cfg.timm_model_name, tuple(size), cfg.image_size, cfg.image_size,
        )  # fmt: skip


def freeze_batch_norm(module: nn.Module, names: set[str] | None = None) -> None:
    """Replace BatchNorm layers (those named in ``names``, or all) by frozen ones, in place.

    timm's ``freeze_batch_norm_2d`` does each conversion (it keeps a ``BatchNormAct2d``'s
    activation, which a plain ``FrozenBatchNorm2d`` would drop).
    """
    from timm.layers import freeze_batch_norm_2d

    targets = [
        name
        for name, m in module.named_modules()
        if name and isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and (names is None or name in names)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, freeze_batch_norm_2d(getattr(parent, child)))


def _lock_groups(trunk: nn.Module, unlocked_groups: int, freeze_bn_stats: bool) -> None:
    """open_clip's partial lock: freeze timm's layer groups (``group_matcher``) but the last n."""
    from timm.models import group_modules, group_parameters

    if not hasattr(trunk, "group_matcher"):
        raise ConfigError(
            f"timm model {type(trunk).__name__} has no group_matcher: lock it whole (unlocked_groups=0)"
        )
    matcher = trunk.group_matcher()
    groups = group_parameters(trunk, matcher)
    last_locked = max(groups) - unlocked_groups
    for group_id, names in groups.items():
        if group_id <= last_locked:
            for name in names:
                trunk.get_parameter(name).requires_grad_(False)
    if freeze_bn_stats:
        modules = group_modules(trunk, matcher, reverse=True)
        freeze_batch_norm(trunk, {name for name, gid in modules.items() if gid <= last_locked})


class TimmImageTower(nn.Module):
    """A timm ``trunk`` and open_clip's adapter ``head``; ``forward`` is ``head(trunk(x))``."""

    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        _validate(cfg)
        self.trunk, width, feat_size = build_trunk(cfg, embed_dim)
        _check_output_width(cfg, self.trunk, embed_dim)
        _warn_fixed_size(cfg, self.trunk)
        self.head = build_head(cfg, width, embed_dim, feat_size)
        self.image_size = cfg.image_size
        self.output_dim = embed_dim

    # --- contract ---------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            self.trunk.set_grad_checkpointing(enable)
        except (AttributeError, NotImplementedError, AssertionError):
            logger.warning("timm model %s does not support grad checkpointing", type(self.trunk).__name__)

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the trunk as open_clip's ``TimmModel.lock`` does; ``head`` stays trainable.

        ``unlocked_groups`` leaves timm's last n layer groups trainable. With ``timm_proj='head'``
        the projection is timm's classifier, part of the trunk, so a full lock freezes it too.
        ``freeze_bn_stats`` turns the locked BatchNorm layers into frozen ones (fixed statistics).
        """
        if unlocked_groups:
            _lock_groups(self.trunk, unlocked_groups, freeze_bn_stats)
            return
        set_requires_grad(self.trunk, False)
        if freeze_bn_stats:
            freeze_batch_norm(self.trunk)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.trunk, "no_weight_decay", lambda: set())()
        return {f"trunk.{n}" for n in names}

    # --- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def _pool(self, features: torch.Tensor) -> torch.Tensor:
        """What ``forward`` makes of the trunk's final features: timm's head, then the adapter's."""
        return self.head(self.trunk.forward_head(features))

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Final features as ``[B, L, C]``: patch tokens (prefix tokens dropped) or map positions."""
        if features.ndim == 3:
            return features[:, getattr(self.trunk, "num_prefix_tokens", 0) :]
        if features.ndim == 4 and getattr(self.trunk, "output_fmt", "NCHW") == "NHWC":
            return features.flatten(1, 2)
        if features.ndim == 4:
            return features.flatten(2).transpose(1, 2)
        raise ConfigError(
            f"timm model {type(self.trunk).__name__}'s features have shape {tuple(features.shape)}; "
            "expected [B, L, C] tokens or a feature map"
        )

    def forward_tokens(self, x: torch.Tensor) -> VisionOutput:
        """Pooled features and the final tokens (timm's ``forward_features``, normalised)."""
        features = self.trunk.forward_features(x)
        return VisionOutput(pooled=self._pool(features), tokens=self._tokens(features))

    def forward_intermediates(self, x: torch.Tensor, indices: list[int] | int | None = None) -> VisionOutput:
        """Pooled features plus timm's per-block (ViT: ``[B, prefix + L, C]``) or per-stage maps.

        ``indices`` as in timm and :class:`~clipforge.model.vision.VisionTransformer`: block
        ids, the last n if an int, all if None. Token trunks return each block's whole sequence
        (prefix tokens first) like clipforge's ViT; convolutional ones their ``NCHW`` maps.
        """
        if not hasattr(self.trunk, "forward_intermediates"):
            raise ConfigError(f"timm model {type(self.trunk).__name__} has no forward_intermediates")
        prefix = getattr(self.trunk, "num_prefix_tokens", None)
        kwargs: dict[str, Any] = {}
        if prefix is not None:  # a token trunk: whole sequences, prefix tokens kept
            kwargs["output_fmt"] = "NLC"
            accepted = inspect.signature(self.trunk.forward_intermediates).parameters
            if prefix > 0 and "return_prefix_tokens" in accepted:
                kwargs["return_prefix_tokens"] = True
        features, blocks = self.trunk.forward_intermediates(x, indices=indices, **kwargs)
        blocks = [torch.cat([b[1], b[0]], dim=1) if isinstance(b, tuple) else b for b in blocks]
        return VisionOutput(pooled=self._pool(features), tokens=self._tokens(features), intermediates=blocks)
