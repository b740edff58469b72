"""Numerical parity with open_clip_torch (test-only oracle) on random weights.

Every parameter, LayerNorm/bias/BatchNorm statistics included, is randomised so that zero-bias or
unit-scale initialisations cannot hide a wrong mapping. The open_clip state dict is converted
with ``open_clip_to_clipforge``, the architecture is inferred from shapes with ``infer_config``,
and features are compared on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.checkpoints.open_clip import clipforge_to_open_clip, infer_config, open_clip_to_clipforge
from clipforge.model.build import build_model
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig
from clipforge.model.registry import get_model_config, has_builtin_towers, list_models

open_clip = pytest.importorskip("open_clip")

TOL = 1e-5


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("logit_scale", "logit_bias")):
                continue
            if p.ndim <= 1:  # LayerNorm/BatchNorm scales and every bias: away from 1 / 0
                base = 1.0 if name.endswith("weight") or name.endswith("gamma") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            # Matrices keep open_clip's own (seeded) random init, already non-trivial.
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def open_clip_kwargs(cfg: CLIPConfig) -> dict:
    """open_clip.model.CLIP arguments for the same architecture."""
    v, t = cfg.vision, cfg.text
    vision = {"image_size": v.image_size, "width": v.width, "layers": v.layers, "head_width": v.head_width,
              "mlp_ratio": v.mlp_ratio, "ls_init_value": v.ls_init_value, "pool_type": v.pool_type,
              "final_ln_after_pool": v.final_ln_after_pool, "no_ln_pre": v.no_ln_pre}  # fmt: skip
    if v.patch_size is not None:
        vision["patch_size"] = v.patch_size
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio, "ls_init_value": t.ls_init_value,
            "proj_bias": t.proj_bias, "pool_type": t.pool_type}  # fmt: skip
    return {"embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text, "quick_gelu": cfg.quick_gelu,
            "init_logit_bias": cfg.init_logit_bias}  # fmt: skip


def tokens(batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = [6, 77, 19, 30][:batch]
    out = torch.zeros(batch, 77, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, n - 1] = 49406, 49407
        out[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
    return out


def load_into_clipforge(sd: dict, quick_gelu: bool | None = None) -> CLIP:
    cfg = infer_config(sd, quick_gelu=quick_gelu)
    with torch.device("meta"):  # skip random init: every weight comes from the state dict
        model = CLIP(cfg)
    model.load_state_dict(open_clip_to_clipforge(sd), strict=True, assign=True)
    return model.eval()


def assert_parity(oc_model: torch.nn.Module, cf_model: CLIP, image_size: int, batch: int = 2) -> None:
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    text = tokens(batch)
    with torch.no_grad():
        pairs = [
            (cf_model.encode_image(images), oc_model.encode_image(images)),
            (cf_model.encode_text(text), oc_model.encode_text(text)),
        ]
    for ours, ref in pairs:
        assert torch.isfinite(ref).all() and ours.shape == ref.shape
        norm = ref.norm(dim=-1, keepdim=True)
        assert ((ours - ref) / norm).abs().max() < TOL  # raw features, relative to a norm of 1
        assert (F.normalize(ours, dim=-1) - F.normalize(ref, dim=-1)).abs().max() < TOL
    scale = cf_model(tokens=text[:1]).logit_scale
    assert torch.allclose(scale, oc_model.logit_scale.exp())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_full_size_parity(name: str) -> None:
    torch.manual_seed(0)
    oc_model = randomize_(open_clip.create_model(name), seed=1)
    sd = oc_model.state_dict()
    cf_model = load_into_clipforge(sd)
    assert cf_model.config.to_dict() == get_model_config(name).to_dict()
    assert_parity(oc_model, cf_model, 224)
    # Inverse mapping: clipforge -> open_clip loads strictly and gives back the same tensors.
    back = clipforge_to_open_clip(cf_model.state_dict())
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


TINY_VARIANTS = {
    "tiny-vit": ("tiny-vit", {}),
    "tiny-vit-quickgelu": ("tiny-vit", {"quick_gelu": True}),
    "tiny-vit-layerscale-avg": (
        "tiny-vit",
        {"vision": {"ls_init_value": 0.1, "pool_type": "avg"}, "text": {"ls_init_value": 0.1}},
    ),  # fmt: skip
    "tiny-vit-final-ln-after-pool": (
        "tiny-vit",
        {"vision": {"final_ln_after_pool": True, "no_ln_pre": True}},
    ),
    "tiny-vit-text-proj-bias": ("tiny-vit", {"text": {"proj_bias": True}}),
    "tiny-vit-siglip": ("tiny-vit-siglip", {}),
    "tiny-rn": ("tiny-rn", {}),
    "tiny-rn-quickgelu": ("tiny-rn", {"quick_gelu": True}),
}


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_parity(variant: str) -> None:
    base, overrides = TINY_VARIANTS[variant]
    cfg = get_model_config(base).replace(**overrides)
    torch.manual_seed(0)
    oc_model = randomize_(open_clip.model.CLIP(**open_clip_kwargs(cfg)), seed=2)
    sd = oc_model.state_dict()
    cf_model = load_into_clipforge(sd, quick_gelu=cfg.quick_gelu)
    inferred = cf_model.config
    assert (inferred.vision.width, inferred.vision.layers, inferred.vision.patch_size) == (
        cfg.vision.width, cfg.vision.layers, cfg.vision.patch_size)  # fmt: skip
    assert inferred.embed_dim == cfg.embed_dim and inferred.text.proj_bias == cfg.text.proj_bias
    # Not visible in shapes: pooling variants come from the caller's config.
    for field in ("pool_type", "final_ln_after_pool", "no_ln_pre"):
        setattr(cf_model.visual, field, getattr(cfg.vision, field))
    assert_parity(oc_model, cf_model, cfg.vision.image_size, batch=4)


@pytest.mark.parametrize(
    "name", [n for n in list_models() if not n.startswith("tiny") and has_builtin_towers(n)]
)  # timm / Hugging Face towers: tests/test_zoo_registry.py
def test_state_dict_shapes_and_inferred_config_match_open_clip(name: str) -> None:
    """Full-size open_clip models on the meta device: same tensors, same shapes, same config."""
    with torch.device("meta"):
        oc_model = open_clip.create_model(name, device="meta")
        cf_model = build_model(get_model_config(name))  # a CoCa for coca_* names
    mapped = open_clip_to_clipforge(oc_model.state_dict())
    ours = cf_model.state_dict()
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert infer_config(oc_model.state_dict()).to_dict() == get_model_config(name).to_dict()


def test_infer_config_handles_wrappers_and_openai_files() -> None:
    with torch.device("meta"):
        sd = open_clip.create_model("RN50", device="meta").state_dict()
    plain = open_clip_to_clipforge(sd)
    wrapped = {"epoch": 3, "state_dict": {f"module._orig_mod.{k}": v for k, v in sd.items()}}
    assert open_clip_to_clipforge(wrapped).keys() == plain.keys()
    assert infer_config(wrapped).to_dict() == get_model_config("RN50").to_dict()
    openai_sd = {**sd, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                 "vocab_size": torch.tensor(49408)}  # fmt: skip
    assert infer_config(openai_sd).quick_gelu is True
    assert "input_resolution" not in open_clip_to_clipforge(openai_sd)
