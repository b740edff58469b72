"""Every open_clip architecture registered, its weights loading with or without a name, and back.

Oracle: open_clip_torch (test-only). (a) registered configs equal open_clip's JSON configs mapped
by ``config_from_open_clip`` and survive ``config_to_open_clip``; (b) full-size models built on
the meta device in both libraries have the same parameter counts and state-dict keys and shapes,
and ``infer_config`` names the architecture from the shapes alone; (c) random open_clip weights
saved to a file load through ``create_model(name|None, pretrained=file)`` and encode real photos
and token ids as open_clip does; (d) ``save_open_clip`` writes back the same tensors, which
open_clip loads strictly.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.checkpoints.convert import save_open_clip
from clipforge.checkpoints.io import load_safetensors, save_safetensors
from clipforge.checkpoints.open_clip import infer_config, open_clip_to_clipforge
from clipforge.checkpoints.open_clip_config import config_from_open_clip, config_to_open_clip
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError
from clipforge.factory import create_model
from clipforge.model.build import build_model
from clipforge.model.registry import get_model_config, list_models
from tests.realdata import photos

open_clip = pytest.importorskip("open_clip")
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "initialized randomly" notes

#: open_clip configs clipforge cannot express (CoCa decoders narrower than ... wider than embed_dim).
UNSUPPORTED = {"coca_base", "coca_roberta-ViT-B-32"}
OPEN_CLIP_NAMES = [n for n in open_clip.list_models() if n not in UNSUPPORTED]


def _open_clip_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return open_clip.create_model(name, device="meta")


# --- (a) the table ------------------------------------------------------------------------------
def test_every_open_clip_architecture_is_registered() -> None:
    registered = set(list_models())
    missing = [
        n for n in OPEN_CLIP_NAMES if n not in registered and n.removesuffix("-quickgelu") not in registered
    ]
    assert missing == []
    assert {"tiny-vit", "tiny-rn", "tiny-vit-siglip", "tiny-coca"} <= registered


@pytest.mark.parametrize("name", OPEN_CLIP_NAMES)
def test_registered_config_equals_open_clip_config(name: str) -> None:
    expected = config_from_open_clip(open_clip.get_model_config(name), name)
    assert get_model_config(name).to_dict() == expected.to_dict()


def test_config_to_open_clip_round_trips_every_architecture() -> None:
    bad = []
    for name in list_models():
        cfg = get_model_config(name)
        if cfg.vision.timm_kwargs:  # clipforge-only small timm instances: open_clip has no field for them
            with pytest.raises(ConfigError, match="timm_kwargs"):
                config_to_open_clip(cfg)
            continue
        if config_from_open_clip(config_to_open_clip(cfg), name).to_dict() != cfg.to_dict():
            bad.append(name)
    assert bad == []
    siglip = config_to_open_clip(get_model_config("ViT-B-16-SigLIP2"))
    assert siglip["vision_cfg"]["timm_proj"] == "none" and siglip["custom_text"] is True
    assert siglip["text_cfg"]["act_kwargs"] == {"approximate": "tanh"}
    assert siglip["text_cfg"]["norm_kwargs"] == {"eps": 1e-6} and siglip["text_cfg"]["no_causal_mask"] is True
    eva = config_to_open_clip(get_model_config("EVA02-B-16"))["vision_cfg"]
    assert "timm_proj" in eva and eva["timm_proj"] is None  # timm's own head projects
    hf = config_to_open_clip(get_model_config("xlm-roberta-base-ViT-B-32"))["text_cfg"]
    assert (hf["hf_model_name"], hf["hf_proj_type"], hf["hf_pooler_type"]) == (
        "xlm-roberta-base",
        "mlp",
        "mean_pooler",
    )


def test_quickgelu_names_and_unknown_names() -> None:
    assert get_model_config("ViT-B-32-quickgelu").quick_gelu is True
    assert get_model_config("ViT-B-32").quick_gelu is False
    with pytest.raises(ClipforgeError, match="ViT-B-33"):
        get_model_config("ViT-B-33")


def test_hf_text_tower_offline_names_the_hub_id(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ClipforgeError, match="xlm-roberta-base"):
        create_model("xlm-roberta-base-ViT-B-32")


# --- (b) full-size structure on the meta device -------------------------------------------------
META_NAMES = [
    "ViT-SO400M-14-SigLIP", "ViT-gopt-16-SigLIP2-256", "convnext_xxlarge", "EVA02-E-14",  # the big ones
    "RN50", "ViT-B-16", "coca_ViT-B-32", "ViT-B-16-SigLIP2", "MobileCLIP2-S0", "PE-Core-B-16",
    "ViTamin-S", "swin_base_patch4_window7_224", "ViT-H-14-CLIPA", "convnext_base_w",
]  # fmt: skip


@pytest.mark.parametrize("name", META_NAMES)
def test_meta_models_have_open_clip_keys_shapes_and_counts(name: str) -> None:
    ref = _open_clip_meta(name)
    with torch.device("meta"):
        ours = build_model(get_model_config(name))
    mapped = {k: tuple(v.shape) for k, v in open_clip_to_clipforge(ref.state_dict()).items()}
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(mapped) ^ set(own)) == []
    assert [k for k in own if own[k] != mapped[k]] == []
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    inferred = infer_config(ref.state_dict())
    assert inferred.to_dict() == get_model_config(name).to_dict()


def test_identical_signatures_with_different_computations_raise() -> None:
    # ViTamin-XL-256 and -384 name different timm variants at the same size: shapes cannot tell.
    with pytest.raises(
        CheckpointError, match="ViTamin-XL-256.*ViTamin-XL-384|ViTamin-XL-384.*ViTamin-XL-256"
    ):
        infer_config(_open_clip_meta("ViTamin-XL-256").state_dict())


# --- (c) + (d) real files, real photos ----------------------------------------------------------
LOAD_NAMES = [
    "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "convnext_base_w", "EVA02-B-16", "MobileCLIP2-S0",
    "PE-Core-B-16", "ViT-B-16-plus-240", "ViT-B-32-quickgelu",
]  # fmt: skip


def _images(size: int) -> torch.Tensor:
    out = []
    for path in photos()[:2]:
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0)
    return (torch.stack(out) - 0.45) / 0.27


def _tokens(cfg) -> torch.Tensor:
    t = cfg.text
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(t.vocab_size, 49405), (2, t.context_length), generator=g)
    ids[0, 9:] = t.pad_id  # a short text and a full one
    if t.pool_type == "argmax":
        ids[0, 8], ids[1, -1] = 49407, 49407
    return ids


@pytest.mark.parametrize("name", LOAD_NAMES)
def test_open_clip_file_loads_with_and_without_name(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    sd = ref.state_dict()
    path = tmp_path / ("w.safetensors" if name != "MobileCLIP2-S0" else "w.bin")
    if path.suffix == ".safetensors":
        save_safetensors(sd, path)
    else:
        torch.save(sd, path)
    cfg = get_model_config(name)
    images, tokens = _images(cfg.vision.image_size), _tokens(cfg)
    with torch.no_grad():
        want = (ref.encode_image(images), ref.encode_text(tokens))
    for spec in (name, None):
        model = create_model(spec, pretrained=str(path), quick_gelu=cfg.quick_gelu).eval()
        assert model.config.to_dict() == cfg.to_dict()
        with torch.no_grad():
            got = (model.encode_image(images), model.encode_text(tokens))
        diffs = [float((a - b).abs().max()) for a, b in zip(got, want)]
        assert max(diffs) < 1e-5, f"{name} (name={spec}): image/text max abs diff {diffs}"
    # (d) back to open_clip: the same tensors, bit for bit, and open_clip loads them strictly.
    path.unlink()  # full-size weights: one file on disk at a time (CI's /tmp is small)
    out = save_open_clip(model, tmp_path / "back.safetensors")
    back = {k: v.clone() for k, v in load_safetensors(out)[0].items()}
    out.unlink()
    assert sorted(back) == sorted(sd)
    assert [k for k in sd if not torch.equal(back[k], sd[k])] == []
    twin = open_clip.create_model(name)
    twin.load_state_dict(back, strict=True)
