"""``clipforge convert --to hf`` of a timm ``NaFlexVit`` SigLIP 2 (open_clip main's NaFlex towers).

The model under test is open_clip main's ``ViT-B-16-SigLIP2-naflex`` config (as clipforge
registers it) shrunk through timm's own ``NaFlexVit`` constructor kwargs (``timm_kwargs``): 8 px
patches, a 4x4 position table, two blocks; random weights with every bias and LayerNorm scale
moved off 0 / 1, NaFlex preprocessing with a budget of 36 patches (not the table's 16, so a writer
deriving the budget from the table fails). It is saved as a clipforge folder and converted by the
CLI. Oracles: transformers' ``Siglip2Model`` / ``Siglip2ImageProcessor`` reading the written
folder, on real photos cropped to four aspect ratios (``tests/realdata.py``) and on token batches;
transformers' ``Siglip2Model`` built on the meta device from the written config for the full-size
named models (every key and shape).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, scratch_dir

import clipforge
from clipforge.checkpoints import hf_siglip
from clipforge.errors import ConfigError

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
from test_parity_hf_siglip import _aspect_photos, _naflex_batch, _randomize_, _rgb, _tokens  # noqa: E402

TOL = 1e-5
MOST, PATCH, VOCAB, CONTEXT = 36, 8, 100, 16
#: timm NaFlexVit constructor kwargs shrinking naflexvit_base_patch16_siglip (4x4 table of 8 px patches)
SHRINK = {"embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": PATCH, "mlp_ratio": 2.0,
          "pos_embed_grid_size": (4, 4)}  # fmt: skip


def naflexvit_config(**timm_kwargs: object) -> clipforge.CLIPConfig:
    """open_clip main's ViT-B-16-SigLIP2-naflex with a tiny NaFlexVit (``SHRINK`` + ``timm_kwargs``)
    and a tiny SigLIP text tower."""
    return clipforge.get_model_config("ViT-B-16-SigLIP2-naflex").replace(
        embed_dim=32,
        vision={"timm_kwargs": {**SHRINK, **timm_kwargs}},
        text={"width": 32, "heads": 4, "layers": 2, "vocab_size": VOCAB, "context_length": CONTEXT,
              "hf_tokenizer_name": None, "tokenizer_kwargs": {}},
    )  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``(model, folder)``: the tiny NaFlexVit SigLIP 2 and what ``clipforge convert --to hf`` wrote
    for its clipforge folder."""
    import dataclasses

    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model

    model = _randomize_(create_model(naflexvit_config()), seed=9)
    assert type(model.visual.trunk).__name__ == "NaFlexVit"
    with torch.no_grad():  # timm's 0.02-std table would move features by ~1e-4 if rows and columns swapped
        model.visual.trunk.embeds.pos_embed.normal_(generator=torch.Generator().manual_seed(2))
    pre = dataclasses.replace(
        model.preprocess_cfg,
        naflex_max_patches=MOST,
        naflex_patch_size=PATCH,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    with scratch_dir(tmp_path_factory, "naflexvit-hf") as root:
        save_pretrained(model, root / "cf", preprocess_cfg=pre)
        assert run_cli(["convert", str(root / "cf"), str(root / "hf"), "--to", "hf"]) == 0
        model.preprocess_cfg = pre
        yield model, root / "hf"


def test_folder_is_a_siglip2model_with_the_models_patch_budget(converted):
    """config.json says Siglip2Model over the 4x4 table; transformers loads every weight (none
    missing, none unexpected) and its processor reads the model's patch budget and normalisation."""
    _, out = converted
    document = json.loads((out / "config.json").read_text())
    assert document["architectures"] == ["Siglip2Model"]
    assert (document["vision_config"]["num_patches"], document["vision_config"]["patch_size"]) == (16, PATCH)
    _, info = transformers.Siglip2Model.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all("position_ids" in k for k in info["missing_keys"]), info
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert type(processor).__name__.startswith("Siglip2ImageProcessor")
    assert (processor.max_num_patches, processor.patch_size) == (MOST, PATCH)
    assert tuple(processor.image_mean) == tuple(processor.image_std) == (0.5,) * 3


def _clipforge_batch(model: torch.nn.Module) -> dict:
    from clipforge.transforms import image_transform

    return _naflex_batch(image_transform(model.preprocess_cfg), _aspect_photos(), MOST)


def test_transformers_computes_the_naflexvit_features_on_photos(converted):
    """Siglip2Model.from_pretrained(folder) with its own processor on photos of four aspect ratios
    (four patch grids in one padded batch) and on token rows (full, half and mostly padding) gives
    the NaFlexVit model's image and text features."""
    model, out = converted
    hf = transformers.Siglip2Model.from_pretrained(out).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    hf_in = dict(processor(images=_rgb(_aspect_photos()), return_tensors="pt"))
    batch = _clipforge_batch(model)
    assert len({tuple(s) for s in batch["spatial_shapes"].tolist()}) == len(_aspect_photos())
    tokens = _tokens(VOCAB, CONTEXT)
    with torch.no_grad():
        ours_img, ours_txt = model.eval().encode_image(batch), model.encode_text(tokens)
        hf_img = hf.get_image_features(**hf_in).pooler_output
        hf_txt = hf.get_text_features(input_ids=tokens).pooler_output
    d_img, d_txt = (ours_img - hf_img).abs().max().item(), (ours_txt - hf_txt).abs().max().item()
    print(f"\nNaFlexVit SigLIP 2 written as Siglip2Model: image {d_img:.3g}, text {d_txt:.3g}")
    assert hf_img.abs().max().item() > 0.1 and (hf_img[0] - hf_img[1]).abs().max().item() > 1e-3
    assert d_img < TOL and d_txt < TOL


def test_clipforge_reads_the_folder_back_as_the_siglip_trunk(converted, tmp_path):
    """The folder loads as every Siglip2 folder does (timm's fixed-resolution siglip trunk at the
    table's 32 px, NaFlex preprocessing at the written budget) with the NaFlexVit model's features
    on NaFlex batches and tokens; written again it gives the same weights bit for bit."""
    from safetensors.torch import load_file

    from clipforge.factory import create_model_and_transforms

    model, out = converted
    again, _, transform = create_model_and_transforms(None, out)
    assert type(again.visual.trunk).__name__ == "VisionTransformer" and again.config.vision.image_size == 32
    assert (transform.max_num_patches, transform.patch_size) == (MOST, PATCH)
    batch, tokens = _clipforge_batch(model), _tokens(VOCAB, CONTEXT)
    with torch.no_grad():
        d_img = (again.eval().encode_image(batch) - model.encode_image(batch)).abs().max().item()
        d_txt = (again.encode_text(tokens) - model.encode_text(tokens)).abs().max().item()
    print(f"\nSiglip2 folder of a NaFlexVit read back: image {d_img:.3g}, text {d_txt:.3g}")
    assert d_img < TOL and d_txt < TOL
    rewritten = hf_siglip.save_hf_siglip(again, tmp_path / "again")
    first, second = load_file(out / "model.safetensors"), load_file(rewritten / "model.safetensors")
    assert sorted(first) == sorted(second) and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2-naflex", "ViT-SO400M-16-SigLIP2-naflex"])
def test_full_size_named_models_map_onto_siglip2_keys_and_shapes(name):
    """open_clip main's named models on the meta device: transformers' Siglip2Model built from the
    written config has exactly the mapped keys and shapes; ViT-B's vision config is transformers'
    default (google/siglip2-base-patch16-naflex's)."""
    from clipforge.model.build import build_model

    cfg = clipforge.get_model_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    document = hf_siglip.config_to_hf_siglip(cfg, model.visual.trunk, "siglip2")
    mapped = hf_siglip.clipforge_to_hf_siglip(model.state_dict(), "siglip2")
    with torch.device("meta"):
        hf = transformers.Siglip2Model(transformers.Siglip2Config.from_dict(document))
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items() if "position_ids" not in k}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    if name.startswith("ViT-B"):
        default = transformers.Siglip2VisionConfig().to_dict()
        assert {k: default[k] for k in document["vision_config"]} == document["vision_config"]


@pytest.mark.parametrize(
    ("timm_kwargs", "match"),
    [
        ({"class_token": True}, "class/register tokens or RoPE"),
        ({"reg_tokens": 2}, "class/register tokens or RoPE"),
        ({"pos_embed_grid_size": (4, 6)}, r"'learned' over a \(4, 6\) grid, not a square table"),
        ({"pos_embed": "factorized"}, "'factorized' over a"),
        ({"pos_embed_ar_preserving": True}, "not resized bilinearly"),
        ({"pos_embed_interp_mode": "bicubic"}, "not resized bilinearly"),
        ({"patchify_channels_last": False}, r"flattened as \(row, column, channel\)"),
        ({"init_values": 1e-5}, "block 0: LayerScale"),
        ({"qk_norm": True}, "block 0: LayerScale, qk"),
        ({"act_layer": "silu"}, "block 0: activation SiLU"),
        ({"norm_layer": "rmsnorm"}, r"block 0: RmsNorm / epsilon, not LayerNorm\(eps=1e-6\)"),
        ({"proj_bias": False}, "block 0: a bias-free attention or MLP Linear"),
    ],
)
def test_what_siglip2_cannot_hold_is_refused_by_name(timm_kwargs, match, tmp_path):
    """NaFlexVit features a Siglip2Model has no place for: refused with the one problem named, before
    anything is written."""
    from clipforge.factory import create_model

    model = create_model(naflexvit_config(**timm_kwargs))
    with pytest.raises(ConfigError, match=f"cannot represent this model: NaFlexVit[^;]*{match}[^;]*$"):
        hf_siglip.save_hf_siglip(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_naflexvit_is_not_written_as_a_fixed_size_siglipmodel(tmp_path):
    from clipforge.factory import create_model

    model = create_model(naflexvit_config())
    assert hf_siglip.model_kind(model) == "siglip2"
    with pytest.raises(ConfigError, match=r"written as a Siglip2Model \(kind='siglip2'\)"):
        hf_siglip.save_hf_siglip(model, tmp_path / "out", kind="siglip")


def test_open_clip_mains_clip_text_naflex_model_is_refused_naming_each_part():
    """naflex_ViT-B-16 (average-pooled NaFlexVit, linear image projection, CLIP's causal text tower,
    no logit bias): a Siglip2Model holds none of these."""
    from clipforge.model.build import build_model

    cfg = clipforge.get_model_config("naflex_ViT-B-16")
    with torch.device("meta"):
        trunk = build_model(cfg).visual.trunk
    with pytest.raises(ConfigError) as caught:
        hf_siglip.config_to_hf_siglip(cfg, trunk, "siglip2")
    message = str(caught.value)
    for part in (
        "global_pool='avg'",
        "timm_proj must be 'none'",
        "the text tower is not SigLIP's",
        "no logit bias",
    ):
        assert part in message, message


def test_a_rope_naflexvit_is_refused_naming_each_part():
    """RoPE instead of a learned table (timm's rope blocks are EvaBlocks): three problems, three names."""
    from clipforge.factory import create_model

    model = create_model(naflexvit_config(rope_type="axial", pos_embed="none"))
    with pytest.raises(ConfigError) as caught:
        hf_siglip.config_to_hf_siglip(model.config, model.visual.trunk, "siglip2")
    message = str(caught.value)
    for part in ("position embedding is 'none'", "class/register tokens or RoPE", "block 0: a timm EvaBlock"):
        assert part in message, message
