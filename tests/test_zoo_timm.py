"""open_clip's timm-built image towers (SigLIP, SigLIP 2, ConvNeXt, EVA-02, MobileCLIP 2, PE) in clipforge.

For each family open_clip (test-only oracle) builds ``create_model(name)``; its ``visual`` state
dict loads with ``strict=True`` into clipforge's ``TimmImageTower`` built from
``config_from_open_clip(get_model_config(name))``, and both encode the same real photos.

Speed (the test must stay near a minute on two shared cores): both towers are built on the
meta device, so neither pays for timm's random init nor open_clip for its text tower (most
of these models' parameters), then given memory with every buffer set to NaN before timm
recomputes its computed (non-persistent) buffers: one that were not recomputed would turn the
features to NaN and fail the test, it cannot pass unnoticed. open_clip's weights are then
filled from a seeded pool of normals and loaded into clipforge's tower.
"""

from __future__ import annotations

import re

import pytest
import torch
from realdata import photos
from torch import nn

from clipforge.checkpoints.open_clip_config import config_from_open_clip
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


def materialize(module: nn.Module) -> nn.Module:
    """A meta-built module on the CPU: NaN everywhere, then timm's computed buffers recomputed."""
    from timm.models._manipulate import reinit_non_persistent_buffers

    module.to_empty(device="cpu")
    with torch.no_grad():
        for b in module.buffers():
            b.fill_(float("nan") if b.is_floating_point() else 0)
    reinit_non_persistent_buffers(module)
    return module


def fill_(module: nn.Module, seed: int) -> None:
    """Every weight and statistic from a seeded pool of normals, scaled so activations stay O(1).

    Vectors (norm scales, biases) sit away from 1 / 0 so that a skipped norm or bias shows;
    layer scales are small (as trained residual branches are), matrices get 1/sqrt(fan_in),
    BatchNorm variances stay positive (and are then measured, see ``calibrate_bn_``). Each
    tensor reads the pool (a prime number of values) from its own offset: no two rows of a
    matrix are equal, and it costs a copy rather than fresh draws.
    """
    pool = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    size = pool.numel()
    with torch.no_grad():
        for i, (name, t) in enumerate(module.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                t.zero_()
                continue
            start = (i * 104_729) % size
            r = pool.repeat((start + t.numel()) // size + 1)[start : start + t.numel()].view(t.shape)
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
    if not bns:
        return
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
    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    visual = materialize(model.visual)
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
    """clipforge's tower for open_clip's config of ``name`` (meta-built, see the module docstring).

    ViT-B-16-SigLIP2's image tower config is ViT-B-16-SigLIP's (same timm model, pool and
    projection): one tower is built for both and loaded with each family's weights.
    """
    cfg = config_from_open_clip(open_clip.get_model_config(name), source=name)
    key = f"{cfg.vision}|{cfg.embed_dim}"
    if key not in _TOWERS:
        _TOWERS.clear()  # keep at most one base-size tower alive
        with torch.device("meta"):
            tower = build_image_tower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        _TOWERS[key] = materialize(tower)
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
    """Shapes as clipforge's towers give them, values as open_clip's forward_intermediates (one photo).

    ``forward_tokens`` shares ``tokens`` with this path; it is run on the small models below.
    """
    name, oc, cf = pair
    tokens_shape, n_blocks, last_shape = FAMILIES[name]
    x = images(cf.image_size)[:1]
    token_trunk = hasattr(cf.trunk, "num_prefix_tokens")
    extra = token_trunk and cf.trunk.num_prefix_tokens > 0
    with torch.no_grad():
        inter = cf.forward_intermediates(x)
        fmt = "NLC" if token_trunk else "NCHW"
        ref = oc.forward_intermediates(x, output_fmt=fmt, output_extra_tokens=extra)
    assert isinstance(inter, VisionOutput) and tuple(inter.tokens.shape) == (1, *tokens_shape)
    assert len(inter.intermediates) == n_blocks and tuple(inter.intermediates[-1].shape) == (1, *last_shape)
    want = ref["image_intermediates"]
    if "image_intermediates_prefix" in ref:
        want = [torch.cat([p, s], dim=1) for s, p in zip(want, ref["image_intermediates_prefix"])]
    assert len(want) == n_blocks
    diffs = [max_diff(w, g) for w, g in zip(want, inter.intermediates)]
    pooled = max_diff(ref["image_features"], inter.pooled)
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


# --- every adapter option, on timm's tiny test models (built for real, as users get them) ---------
# (timm model, timm_pool, timm_proj, timm_proj_bias): open_clip's TimmModel takes proj=None for 'head'.
OPTIONS = [
    ("test_vit", "token", "linear", True),
    ("test_vit", "avg", "mlp", True),
    ("test_vit", "map", "head", False),
    ("test_vit", "token", "none", False),
    ("test_convnext", "", "linear", False),
    ("test_convnext", "avg", "mlp", False),
    ("test_byobnet", "abs_attn", "none", False),
    ("test_byobnet", "rot_attn", "linear", True),
    ("test_efficientnet", "avg", "head", False),
]


def small_pair(
    model: str, pool: str, proj: str, bias: bool, embed_dim: int
) -> tuple[nn.Module, TimmImageTower]:
    from open_clip.timm_model import TimmModel

    from clipforge.model.config import VisionConfig

    drop = 0.1 if proj in ("linear", "mlp") else 0.0  # open_clip's head dropout (no-op in eval)
    torch.manual_seed(0)
    oc = TimmModel(model, embed_dim, image_size=160, pool=pool, proj=None if proj == "head" else proj,
                   proj_bias=bias, drop=drop)  # fmt: skip
    fill_(oc, seed=7)
    calibrate_bn_(oc.eval(), images(160))
    cfg = VisionConfig(image_size=160, timm_model_name=model, timm_pool=pool, timm_proj=proj,
                       timm_proj_bias=bias, timm_drop=drop)  # fmt: skip
    cf = TimmImageTower(cfg, embed_dim)
    cf.load_state_dict(oc.state_dict(), strict=True)
    return oc, cf.eval()


@pytest.mark.parametrize("model,pool,proj,bias", OPTIONS)
def test_adapter_options_match_open_clip(model: str, pool: str, proj: str, bias: bool) -> None:
    """Pool / projection / bias variants: same modules (strict load), same features, same lock."""
    embed_dim = {"test_vit": 64, "test_convnext": 48}.get(model, 40) if proj != "none" else None
    if embed_dim is None:  # pass-through: the width the trunk (or the attention pool) puts out
        embed_dim = 64 if model == "test_vit" else 40
    oc, cf = small_pair(model, pool, proj, bias, embed_dim)
    x = images(160)
    with torch.no_grad():
        want, got = oc(x), cf(x)
        inter = cf.forward_intermediates(x)
        tok = cf.forward_tokens(x)
    assert got.shape == (2, embed_dim) and max_diff(want, got) < TOL
    assert max_diff(inter.pooled, got) < TOL and inter.intermediates
    assert max_diff(tok.pooled, got) < TOL and max_diff(tok.tokens, inter.tokens) < TOL
    assert tok.tokens.shape[:2] == (2, 25 if model != "test_vit" else 100)  # 160 px: 5x5 map / 10x10 patches
    assert cf.output_dim == embed_dim and cf.image_size == 160
    for groups in (0, 2):
        oc.requires_grad_(True), cf.requires_grad_(True)
        oc.lock(unlocked_groups=groups)
        cf.lock(unlocked_groups=groups)
        assert _trainable(cf) == _trainable(oc)


def test_freeze_bn_stats_keeps_features() -> None:
    """Frozen statistics give eval-mode features, the BatchNorm's activation included.

    open_clip's freeze turns timm's BatchNormAct2d (EfficientNet: BN + SiLU) into a plain
    FrozenBatchNorm2d, dropping the activation; clipforge keeps it (timm's conversion).
    """
    oc, cf = small_pair("test_efficientnet", "avg", "head", False, 40)
    x = images(160)
    with torch.no_grad():
        before = cf(x)
        cf.lock(freeze_bn_stats=True)
        after = cf(x)
    assert _frozen_bn(cf) and max_diff(before, after) < TOL
    cf.train()  # frozen layers ignore train mode: statistics stay fixed
    with torch.no_grad():
        assert max_diff(cf(x), before) < TOL


def test_timm_kwargs_patch_dropout_and_drop_path() -> None:
    """timm_kwargs build small instances of a named family; the tower's own fields reach timm."""
    from clipforge.model.config import VisionConfig

    cfg = VisionConfig(
        image_size=64, timm_model_name="vit_base_patch16_siglip_224", timm_pool="map", timm_proj="none",
        timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64},
        patch_dropout=0.25, timm_drop_path=0.1,
    )  # fmt: skip
    tower = TimmImageTower(cfg, 32).eval()
    assert tower.trunk.patch_embed.img_size == (64, 64) and len(tower.trunk.blocks) == 2
    assert tower.trunk.patch_drop.prob == 0.25
    assert tower.trunk.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    x = images(64)
    with torch.no_grad():
        out = tower.forward_intermediates(x, indices=[0, -1])
        assert max_diff(out.pooled, tower(x)) == 0
    assert tower(x).shape == (2, 32) and [tuple(t.shape) for t in out.intermediates] == [(2, 16, 32)] * 2
    assert "trunk.pos_embed" in tower.no_weight_decay()


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"timm_model_name": "no_such_net"}, "is not a model of timm"),
        ({"timm_proj": "conv"}, "vision.timm_proj must be one of"),
        ({"timm_kwargs": {"num_classes": 3}}, "num_classes (set by vision.timm_proj)"),
        ({"timm_model_name": "test_convnext", "patch_dropout": 0.5}, "does not take 'patch_drop_rate'"),
        ({"patch_dropout": 1.0}, "vision.patch_dropout must be in [0, 1)"),
        ({"timm_proj": "none", "timm_pool": "token"}, "passes 'test_vit''s 64 features through"),
        ({"timm_pool": "abs_attn"}, "needs a trunk with a 2-D feature map"),
        ({"timm_model_name": "test_resnet", "timm_pool": "abs_attn"}, "96 channels, not a multiple"),
        ({"timm_pool": "rot_attn", "timm_proj": "none", "timm_drop": 0.1}, "has no layer to act on"),
    ],
)
def test_bad_configs_are_config_errors(changes: dict, message: str) -> None:
    from clipforge.errors import ConfigError
    from clipforge.model.config import VisionConfig

    cfg = VisionConfig(**{"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "token", **changes})
    with pytest.raises(ConfigError) as err:
        TimmImageTower(cfg, 32)
    assert message in str(err.value)
