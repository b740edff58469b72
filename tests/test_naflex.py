"""NaFlex (SigLIP 2 at native aspect ratio): preprocessing and features against transformers.

transformers is the oracle: ``Siglip2ImageProcessor`` for the resize/patchify/pad rule and
``Siglip2Model.get_image_features`` (per-image resized position table, masked attention and MAP
pooling) for the features. Random small models, real photos cropped to several aspect ratios.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from helpers import scratch_dir
from PIL import Image
from realdata import icons, photos

from clipforge.checkpoints import hf_siglip
from clipforge.errors import ConfigError
from clipforge.model.naflex import naflex_features, naflex_inputs, resized_positions
from clipforge.naflex_transforms import NaFlexTransform, naflex_collate, naflex_size

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

TOL = 1e-5
PATCH = 8
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               patch_size=PATCH, num_patches=16)  # fmt: skip
_TEXT = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=100, max_position_embeddings=16, hidden_act="gelu")  # fmt: skip
#: (width, height) crops of real photos: wide, tall, square, very wide, very tall
ASPECTS = ((1.0, 0.45), (0.4, 1.0), (0.62, 0.62), (1.0, 0.2), (0.15, 0.9))


@functools.cache
def _images() -> tuple[Image.Image, ...]:
    """Real photos (shrunk 8x by PIL's box reduce) cropped to different aspect ratios, plus an icon."""
    found = sorted(photos(), key=os.path.getsize)[:3]
    out = []
    for i, (fw, fh) in enumerate(ASPECTS):
        with Image.open(found[i % len(found)]) as im:
            small = im.reduce(8)
        w, h = small.size
        out.append(small.crop((0, 0, max(1, int(w * fw)), max(1, int(h * fh)))))
    with Image.open(icons()[0]) as icon:
        out.append(icon.copy())
    return tuple(out)


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory):
    """``(HF model, clipforge model, folder)``: a random Siglip2Model saved as transformers writes it."""
    from clipforge.factory import create_model

    with scratch_dir(tmp_path_factory, "naflex-siglip2") as folder:
        torch.manual_seed(0)
        config = transformers.Siglip2Config(text_config=_TEXT, vision_config=_VISION)
        hf = transformers.Siglip2Model(config).eval()
        with torch.no_grad():  # norms and biases away from 1 / 0 so a wrong mapping shows
            for name, p in hf.named_parameters():
                if p.ndim <= 1 and not name.startswith("logit"):
                    p.add_(0.2 * torch.randn(p.shape))
        hf.save_pretrained(folder)
        yield hf, create_model(None, pretrained=folder).eval(), folder


def test_target_size_rule_equals_the_processors():
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

    for h, w in [(300, 480), (480, 300), (17, 1000), (1000, 17), (5, 5), (224, 224), (333, 517), (4096, 64)]:
        for patch, most in [(16, 256), (16, 64), (8, 16), (14, 729), (16, 1024)]:
            ours = naflex_size(h, w, patch, most)
            assert ours == get_image_size_for_max_num_patches(h, w, patch, most), (h, w, patch, most)
            assert ours[0] % patch == 0 and ours[1] % patch == 0
            assert (ours[0] // patch) * (ours[1] // patch) <= most


@pytest.mark.parametrize(("patch", "most"), [(16, 256), (16, 64), (8, 16)])
def test_preprocessing_equals_siglip2_image_processor(patch, most):
    images = [im.convert("RGB") for im in _images()]
    ref = transformers.Siglip2ImageProcessor(patch_size=patch, max_num_patches=most)(
        images=images, return_tensors="pt"
    )
    ours = NaFlexTransform(patch, most).batch(images)
    shapes = ours["spatial_shapes"]
    assert len({tuple(s) for s in shapes.tolist()}) >= 4  # really different aspect ratios
    assert torch.equal(shapes, ref["spatial_shapes"].to(shapes.dtype))
    assert torch.equal(ours["patch_mask"], ref["pixel_attention_mask"].to(ours["patch_mask"].dtype))
    diff = (ours["patches"] - ref["pixel_values"]).abs().max().item()
    print(f"NaFlex preprocessing p{patch}/{most} vs Siglip2ImageProcessor: max abs diff {diff:.3g}")
    assert diff < 1e-6


def test_collate_pads_with_a_mask_and_refuses_overflow():
    items = [{"patches": torch.ones(n, 3), "spatial_shape": torch.tensor([1, n])} for n in (2, 5)]
    batch = naflex_collate(items, 6)
    assert batch["patches"].shape == (2, 6, 3)
    assert batch["patch_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert batch["patches"][0, 2:].abs().sum().item() == 0.0
    assert naflex_collate(items)["patches"].shape == (2, 5, 3)  # default: the longest
    with pytest.raises(ConfigError, match="5 patches, more than max_num_patches=4"):
        naflex_collate(items, 4)


@pytest.mark.parametrize("most", [16, 64, 256])
def test_image_features_equal_transformers(siglip2, most):
    hf, ours, _ = siglip2
    images = [im.convert("RGB") for im in _images()]
    ref_in = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=most)(
        images=images, return_tensors="pt"
    )
    batch = NaFlexTransform(PATCH, most).batch(images)
    with torch.no_grad():
        ref = hf.get_image_features(**ref_in)
        ref = getattr(ref, "pooler_output", ref)
        mine = ours.encode_image(batch)
        from_hf_inputs = ours.encode_image(dict(ref_in))  # transformers' key names are accepted
    diff = (mine - ref).abs().max().item()
    print(f"NaFlex image features (max {most} patches) vs Siglip2Model: max abs diff {diff:.3g}")
    assert ref.abs().max().item() > 0.1 and diff < TOL
    assert (from_hf_inputs - ref).abs().max().item() < TOL
    # one image alone (no padding) gives the same row as in the padded batch
    with torch.no_grad():
        alone = ours.encode_image(NaFlexTransform(PATCH, most).batch(images[:1]))
    assert (alone[0] - mine[0]).abs().max().item() < TOL


def test_text_features_equal_transformers(siglip2):
    hf, ours, _ = siglip2
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, _TEXT["vocab_size"], (3, 16), generator=g)
    tokens[1, 8:] = 1
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=tokens)
        ref = getattr(ref, "pooler_output", ref)
        diff = (ours.encode_text(tokens) - ref).abs().max().item()
    print(f"NaFlex model text features vs Siglip2Model: max abs diff {diff:.3g}")
    assert diff < TOL


def test_weights_round_trip_bit_exact(siglip2):
    hf, ours, folder = siglip2
    theirs = hf.state_dict()
    back = hf_siglip.clipforge_to_hf_siglip(ours.state_dict(), "siglip2")
    common = set(back) & set(theirs)
    assert len(common) >= len(theirs) - 2  # HF may keep non-persistent buffers (position ids)
    for key in common:
        assert torch.equal(back[key], theirs[key]), key


def test_position_table_resize_is_identity_at_its_own_grid():
    table = torch.randn(1, 16, 8)
    out = resized_positions(table, torch.tensor([[4, 4], [2, 3]]), 16)
    assert torch.allclose(out[0], table[0], atol=1e-6)
    assert out[1, 6:].abs().sum().item() == 0.0  # padding rows carry no position
    with pytest.raises(ConfigError, match="more patches than the 4 given"):
        resized_positions(table, torch.tensor([[3, 3]]), 4)


def test_naflex_refuses_a_tower_without_a_map_head():
    from torch import nn

    with pytest.raises(ConfigError, match="timm SigLIP trunk with a MAP head"):
        naflex_features(nn.Linear(2, 2), {"patches": torch.zeros(1, 1, 2), "patch_mask": torch.ones(1, 1),
                                          "spatial_shapes": torch.tensor([[1, 1]])})  # fmt: skip
    with pytest.raises(ConfigError, match=r"lacks \['patch_mask', 'spatial_shapes'\]"):
        naflex_inputs({"patches": torch.zeros(1, 1, 2)})


def test_preprocess_config_field_selects_naflex():
    from clipforge.transforms import PreprocessConfig, image_transform

    cfg = PreprocessConfig.from_dict(
        {"naflex_max_patches": 64, "naflex_patch_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    )
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert "naflex_max_patches" not in PreprocessConfig().to_dict()  # fixed-size dicts unchanged
    transform = image_transform(cfg)
    images = [im.convert("RGB") for im in _images()]
    ours = naflex_collate([transform(im) for im in images], 64)
    ref = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=64)(
        images=images, return_tensors="pt"
    )
    assert (ours["patches"] - ref["pixel_values"]).abs().max().item() < 1e-6
    # training crops at random first (tests/test_naflex_train.py); the whole image is the eval patches
    whole = image_transform(cfg, is_train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert torch.equal(whole(images[0])["patches"], transform(images[0])["patches"])
    with pytest.raises(ConfigError, match=r"NaFlex train transform: scale"):
        image_transform(cfg, is_train=True, scale=(0.0, 1.0))


def _timm_naflex(ours: torch.nn.Module) -> torch.nn.Module:
    """timm's NaFlexVit with the same hyper-parameters, loaded with clipforge's trunk weights."""
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    side = int(_VISION["num_patches"] ** 0.5)
    cfg = NaFlexVitCfg(patch_size=PATCH, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, class_token=False,
                       global_pool="map", pos_embed_grid_size=(side, side), pos_embed_interp_mode="bilinear",
                       act_layer="gelu_tanh")  # fmt: skip
    sd = {
        k.removeprefix("visual.trunk."): v
        for k, v in ours.state_dict().items()
        if k.startswith("visual.trunk.")
    }
    conv = sd.pop("patch_embed.proj.weight")
    sd["embeds.proj.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    sd["embeds.proj.bias"] = sd.pop("patch_embed.proj.bias")
    sd["embeds.pos_embed"] = sd.pop("pos_embed").reshape(1, side, side, -1)
    model = NaFlexVit(cfg, num_classes=0).eval()
    model.load_state_dict(sd)  # strict: every key accounted for
    return model


def test_image_features_equal_timm_naflexvit(siglip2):
    _, ours, _ = siglip2
    batch = NaFlexTransform(PATCH, 64).batch([im.convert("RGB") for im in _images()])
    rows, cols = batch["spatial_shapes"][:, :1], batch["spatial_shapes"][:, 1:]
    index = torch.arange(batch["patches"].shape[1])[None]
    valid = batch["patch_mask"].bool()
    coord = torch.stack([(index // cols) * valid, (index % cols) * valid], dim=-1)
    assert bool((index < rows * cols).eq(valid).all())
    with torch.no_grad():
        ref = _timm_naflex(ours)({"patches": batch["patches"], "patch_coord": coord, "patch_valid": valid})
        diff = (ours.encode_image(batch) - ref).abs().max().item()
    print(f"NaFlex image features vs timm NaFlexVit (same weights): max abs diff {diff:.3g}")
    assert ref.abs().max().item() > 0.1 and diff < TOL


def test_embed_images_takes_a_naflex_model(siglip2, tmp_path):
    """The library's embed path pads NaFlex dicts per batch; rows equal encode_image on each image."""
    import numpy as np

    from clipforge.search.embed import embed_images

    _, ours, _ = siglip2
    folder = tmp_path / "images"
    folder.mkdir()
    images = [im.convert("RGB") for im in _images()[:4]]
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    transform = NaFlexTransform(PATCH, 64)
    embed_images(ours, transform, str(folder), tmp_path / "out", batch_size=3, num_workers=0,
                 dtype=np.float32, progress=False)  # fmt: skip
    feats = np.concatenate([np.load(p) for p in sorted((tmp_path / "out").rglob("*.npy"))])
    with torch.no_grad():
        want = torch.cat([ours.encode_image(transform.batch([im]), normalize=True) for im in images])
    assert feats.shape == tuple(want.shape)
    assert np.abs(feats - want.numpy()).max() < TOL


def test_tiny_siglip2_zero_shot_at_native_aspect():
    """The zoo's tiny SigLIP 2 takes NaFlex batches: features per aspect ratio, usable logits."""
    from clipforge.factory import create_model

    model = create_model("tiny-siglip2").eval()
    images = [im.convert("RGB") for im in _images()]
    batch = NaFlexTransform(8, 16).batch(images)
    tokens = torch.randint(3, model.config.text.vocab_size, (2, model.config.text.context_length))
    with torch.no_grad():
        feats = model.encode_image(batch, normalize=True)
        logits = model.logit_scale.exp() * feats @ model.encode_text(tokens, normalize=True).T
    assert feats.shape == (len(images), model.config.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(len(images)), atol=1e-5)
    assert logits.shape == (len(images), 2) and bool(torch.isfinite(logits).all())
    assert len({tuple(s) for s in batch["spatial_shapes"].tolist()}) >= 4


def test_folder_processor_gives_naflex_preprocessing(siglip2):
    """A Siglip2 folder loads with its Siglip2ImageProcessor's NaFlex settings by default (as
    transformers preprocesses it); ``naflex_preprocess`` reads the same fields."""
    from clipforge.factory import create_model_and_transforms
    from clipforge.transforms import PreprocessConfig

    hf, ours, folder = siglip2
    assert ours.preprocess_cfg.naflex_max_patches == 256  # no processor file: the processor's default
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=64).save_pretrained(folder)
    pre = hf_siglip.naflex_preprocess(folder)
    assert (pre["naflex_max_patches"], pre["naflex_patch_size"]) == (64, PATCH)
    model, _, transform = create_model_and_transforms(None, folder)
    assert model.preprocess_cfg == PreprocessConfig.from_dict(pre)
    assert model.preprocess_cfg.naflex_resize == "siglip2"  # transformers' rule for its folders
    images = [im.convert("RGB") for im in _images()]
    ref = transformers.Siglip2ImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")
    ours_in = naflex_collate([transform(im) for im in images], 64)
    assert (ours_in["patches"] - ref["pixel_values"]).abs().max().item() < 1e-6
    with torch.no_grad():
        got = getattr(hf.get_image_features(**ref), "pooler_output", None)
        got = hf.get_image_features(**ref) if got is None else got
        assert (ours.encode_image(ours_in) - got).abs().max().item() < TOL


def _timm_patches(images, most: int) -> list[torch.Tensor]:
    """timm's NaFlex eval transform (what open_clip main runs for its NaFlex weights), bicubic."""
    from timm.data import create_transform

    transform = create_transform(is_training=False, naflex=True, patchify=True, max_seq_len=most,
                                 patch_size=PATCH, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")  # fmt: skip
    return [transform(im)["patches"] for im in images]


def test_checkpoint_stores_the_timm_rule_and_old_ones_keep_siglip2s(siglip2, tmp_path):
    """A clipforge checkpoint saved with ``naflex_resize="timm"`` reloads with it (timm's patches);
    one saved before the field existed (no key)
    loads with the Siglip2 rule it was made with; ``image_naflex_resize`` overrides either."""
    import dataclasses
    import json

    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model, create_model_and_transforms

    _, ours, _ = siglip2
    pre = dataclasses.replace(
        ours.preprocess_cfg, naflex_max_patches=64, naflex_resize="timm", interpolation="bicubic"
    )
    save_pretrained(ours, tmp_path / "cf", preprocess_cfg=pre)
    images = [im.convert("RGB") for im in _images()]
    timm_ref = _timm_patches(images, 64)
    model, _, val = create_model_and_transforms(None, tmp_path / "cf")
    assert model.preprocess_cfg == pre
    got = [val(im)["patches"] for im in images]
    assert all(a.shape == b.shape and (a - b).abs().max().item() < 1e-6 for a, b in zip(got, timm_ref))
    siglip2_rule = [NaFlexTransform(PATCH, 64)(im)["patches"] for im in images]  # the same grids
    assert max((a - b).abs().max().item() for a, b in zip(got, siglip2_rule)) > 0.05
    document = json.loads((tmp_path / "cf" / "config.json").read_text())
    assert document["preprocess_cfg"].pop("naflex_resize") == "timm"
    (tmp_path / "cf" / "config.json").write_text(json.dumps(document))  # as clipforge wrote it before
    old = create_model(None, tmp_path / "cf")
    assert (old.preprocess_cfg.naflex_resize, old.preprocess_cfg.naflex_max_patches) == ("siglip2", 64)
    told = create_model(None, tmp_path / "cf", image_naflex_resize="timm")
    assert told.preprocess_cfg == pre
    with pytest.raises(ConfigError, match="naflex_resize 'pil' is not one of"):
        create_model(None, tmp_path / "cf", image_naflex_resize="pil")


def test_writing_a_timm_rule_model_as_siglip2_says_the_folder_resizes_bilinearly(caplog):
    """A Siglip2ImageProcessor has one resize (bilinear): writing a timm-rule NaFlex model's
    processor warns that the folder reads back with that rule; a siglip2-rule one is silent."""
    import logging

    from clipforge.transforms import PreprocessConfig

    base = {"naflex_max_patches": 64, "naflex_patch_size": PATCH, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    for rule, warned in (("siglip2", False), ("timm", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipforge"):
            doc = hf_siglip.processor_document(
                PreprocessConfig.from_dict({**base, "naflex_resize": rule}), "siglip2", PATCH
            )
        assert (doc["max_num_patches"], doc["resample"]) == (64, 2)
        assert ("not timm's (bicubic resize)" in caplog.text) == warned, caplog.text
