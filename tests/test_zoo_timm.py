"""open_clip's timm-built image towers (SigLIP, SigLIP 2, ConvNeXt, EVA-02, MobileCLIP 2, PE) in clipforge.

For each family open_clip (test-only oracle) builds ``create_model(name)``; its ``visual`` state
dict loads with ``strict=True`` into clipforge's ``TimmImageTower`` built from
``config_from_open_clip(get_model_config(name))``, and both encode the same real photos.

Speed: open_clip's model is built on the meta device (no random init, no text-tower cost: the
text towers of these models hold most of their parameters), its image tower is then given
memory, timm's computed (non-persistent) buffers are recomputed and every weight is filled
from a seeded generator. clipforge's tower is built for real, as users get it, so a buffer
the oracle got wrong could only make the comparison fail, never pass.
"""

from __future__ import annotations

import re

import pytest
import torch
from realdata import photos
from torch import nn

from clipforge.checkpoints.load import config_from_open_clip
from clipforge.model.clip import build_image_tower
from clipforge.model.timm_tower import TimmImageTower
from clipforge.model.vision import VisionOutput

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")

TOL = 1e-5
# name: (tokens [L, C] of forward_tokens, intermediates: count, shape of the last one without batch)
FAMILIES = {
    "ViT-B-16-SigLIP": ((196, 768), 12, (196, 768)),
    "ViT-B-16-SigLIP2": ((196, 768), 12, (196, 768)),
    "convnext_base_w": ((64, 1024), 4, (1024, 8, 8)),
    "EVA02-B-16": ((196, 768), 12, (197, 768)),
    "MobileCLIP2-S0": ((64, 1024), 4, (512, 8, 8)),
    "PE-Core-B-16": ((196, 768), 12, (197, 768)),
}
MEASURED: dict[str, dict[str, float]] = {}


def fill_(module: nn.Module, seed: int) -> None:
    """Every weight and statistic from a seeded generator, scaled so activations stay O(1).

    Vectors (norm scales, biases) sit away from 1 / 0 so that a skipped norm or bias shows;
    layer scales are small (as trained residual branches are), matrices get 1/sqrt(fan_in),
    BatchNorm variances stay positive (and are then measured, see ``calibrate_bn_``).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                t.zero_()
                continue
            r = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + 0.5 * r.abs())
            elif name.endswith(("running_mean", "bias")):
                t.copy_(0.1 * r)
            elif re.search(r"(gamma|layer_scale|\.ls\d?\.)", name):
                t.copy_(0.1 + 0.01 * r)
            elif t.ndim <= 1 or t.numel() == t.shape[0]:
                t.copy_(1.0 + 0.1 * r)
            elif t.shape[0] == 1:  # class / register tokens, position embeddings, latent queries
                t.copy_(0.02 * r)
            else:
                t.copy_(r * (t.numel() // t.shape[0]) ** -0.5)


def calibrate_bn_(module: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm statistics measured on ``x`` (else MobileOne's summed branches grow without bound)."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative: after one batch, exactly its statistics
        m.train()
    with torch.no_grad():
        module(x)
    for m in bns:
        m.eval()


def open_clip_visual(name: str, seed: int) -> nn.Module:
    """open_clip's ``create_model(name).visual``, weights filled from ``seed``, in eval mode."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    visual = model.visual.to_empty(device="cpu")
    reinit_non_persistent_buffers(visual)
    fill_(visual, seed)
    calibrate_bn_(visual.eval(), images(visual.image_size[0]))
    return visual


_IMAGES: dict[int, torch.Tensor] = {}


def images(size: int) -> torch.Tensor:
    """Two real photos (an RGB JPEG and an RGBA PNG), preprocessed to ``size``."""
    if size not in _IMAGES:
        from PIL import Image

        from clipforge.transforms import image_transform

        preprocess = image_transform(size, is_train=False)
        _IMAGES[size] = torch.stack([preprocess(Image.open(p)) for p in photos()[:2]])
    return _IMAGES[size]


_TOWERS: dict[str, TimmImageTower] = {}


def clipforge_tower(name: str) -> TimmImageTower:
    """clipforge's tower for open_clip's config of ``name``, built as users get it.

    ViT-B-16-SigLIP2's image tower config is ViT-B-16-SigLIP's (same timm model, pool and
    projection): one tower is built for both and loaded with each family's weights.
    """
    cfg = config_from_open_clip(open_clip.get_model_config(name), source=name)
    key = f"{cfg.vision}|{cfg.embed_dim}"
    if key not in _TOWERS:
        _TOWERS.clear()  # keep at most one base-size tower alive
        torch.manual_seed(0)
        _TOWERS[key] = build_image_tower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
    tower = _TOWERS[key]
    assert isinstance(tower, TimmImageTower)
    tower.requires_grad_(True)
    return tower


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    """(name, open_clip's visual, clipforge's tower with open_clip's weights), built once per name."""
    name = request.param
    oc = open_clip_visual(name, seed=list(FAMILIES).index(name))
    cf = clipforge_tower(name)
    cf.load_state_dict(oc.state_dict(), strict=True)
    yield name, oc, cf.eval()
    print(f"\n{name}: max abs diffs {MEASURED.get(name)}")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_encode_image_parity(pair) -> None:
    name, oc, cf = pair
    x = images(cf.image_size)
    with torch.no_grad():
        want, got = oc(x), cf(x)
    diff = max_diff(want, got)
    MEASURED.setdefault(name, {}).update(encode_image=diff, feature_max=want.abs().max().item())
    assert got.shape == (2, cf.output_dim) and torch.isfinite(got).all()
    assert (got[0] - got[1]).abs().max() > 1e-3, "two different photos gave the same features"
    assert diff < TOL


def test_tokens_and_intermediates(pair) -> None:
    """Shapes as clipforge's towers give them, values as open_clip's forward_intermediates (one photo)."""
    name, oc, cf = pair
    tokens_shape, n_blocks, last_shape = FAMILIES[name]
    x = images(cf.image_size)[:1]
    token_trunk = hasattr(cf.trunk, "num_prefix_tokens")
    extra = token_trunk and cf.trunk.num_prefix_tokens > 0
    with torch.no_grad():
        tok = cf.forward_tokens(x)
        inter = cf.forward_intermediates(x)
        fmt = "NLC" if token_trunk else "NCHW"
        ref = oc.forward_intermediates(x, output_fmt=fmt, output_extra_tokens=extra)
    assert isinstance(tok, VisionOutput) and isinstance(inter, VisionOutput)
    assert tuple(tok.tokens.shape) == (1, *tokens_shape) and max_diff(tok.tokens, inter.tokens) == 0
    assert len(inter.intermediates) == n_blocks and tuple(inter.intermediates[-1].shape) == (1, *last_shape)
    want = ref["image_intermediates"]
    if "image_intermediates_prefix" in ref:
        want = [torch.cat([p, s], dim=1) for s, p in zip(want, ref["image_intermediates_prefix"])]
    assert len(want) == n_blocks
    diffs = [max_diff(w, g) for w, g in zip(want, inter.intermediates)]
    pooled = max(max_diff(ref["image_features"], inter.pooled), max_diff(ref["image_features"], tok.pooled))
    MEASURED.setdefault(name, {}).update(intermediates=max(diffs), pooled=pooled)
    assert max(diffs) < TOL and pooled < TOL


def _trainable(module: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in module.named_parameters()}


def _frozen_bn(module: nn.Module) -> set[str]:
    """Frozen BatchNorm layers: open_clip makes FrozenBatchNorm2d of every kind, clipforge keeps
    timm's BatchNormAct2d as FrozenBatchNormAct2d (its activation kept); the layers must match."""
    return {n for n, m in module.named_modules() if type(m).__name__.startswith("FrozenBatchNorm")}


def test_lock_matches_open_clip(pair) -> None:
    """requires_grad per parameter after lock() equals open_clip's, whole and partial, BN frozen alike."""
    name, oc, cf = pair
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in cf.modules())
    for groups in (0, 1, 3):
        oc.requires_grad_(True), cf.requires_grad_(True)
        oc.lock(unlocked_groups=groups)
        cf.lock(unlocked_groups=groups)
        want, got = _trainable(oc), _trainable(cf)
        wrong = sorted(k for k in want if want[k] != got.get(k))
        assert got == want, f"unlocked_groups={groups}: {wrong[:8]}"
        trunk = [v for k, v in got.items() if k.startswith("trunk.")]
        assert all(v for k, v in got.items() if k.startswith("head."))
        assert not any(trunk) if groups == 0 else 0 < sum(trunk) < len(trunk)
    oc.requires_grad_(True), cf.requires_grad_(True)
    oc.lock(unlocked_groups=1, freeze_bn_stats=True)
    cf.lock(unlocked_groups=1, freeze_bn_stats=True)
    assert _trainable(cf) == _trainable(oc)
    assert _frozen_bn(cf) == _frozen_bn(oc) and bool(_frozen_bn(cf)) == has_bn
    if has_bn:  # frozen statistics compute what BatchNorm computed in eval mode
        x = images(cf.image_size)
        with torch.no_grad():
            assert max_diff(oc(x), cf(x)) < TOL
        _TOWERS.clear()  # its BatchNorm layers are frozen now: never reuse it
