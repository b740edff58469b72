"""Preprocessing conventions reproduced exactly (issue 10, points 7 and 10).

Oracles: open_clip's own eval transform and transformers' ``CLIPImageProcessor`` (torchvision
backend, transformers >= 5's default) and ``CLIPImageProcessorPil``, run on the same files:
real photos and icons from Debian packages (opened as they are, never downsized) plus generated
images for the modes those packages lack. Every comparison asserts a max abs difference of 0.
"""

from __future__ import annotations

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPImageProcessorPil

import clipforge
from clipforge.data.images import BadImageError, load_image
from clipforge.errors import ConfigError
from clipforge.transforms import PreprocessConfig, image_transform
from tests import realdata

# openai/clip-vit-base-patch32's preprocessor_config.json, and a non-default one.
STANDARD = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
WIDER = {
    "image_processor_type": "CLIPImageProcessor",
    "size": {"shortest_edge": 256},
    "crop_size": {"height": 224, "width": 224},
    "resample": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}


def _open(path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def _generated() -> dict[str, Image.Image]:
    """Modes the Debian images lack, at odd sizes where crop offsets round differently."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (501, 333, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (501, 333), dtype=np.uint8)))
    wide16 = Image.fromarray(rng.integers(0, 65536, (281, 640), dtype=np.uint16))
    return {
        "RGB-333x501": rgb,
        "RGBA-333x501": rgba,
        "PA": rgb.quantize(32).convert("PA"),
        "1": rgb.convert("1"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": wide16,
        "L-odd": rgb.convert("L").crop((0, 0, 333, 225)),
    }


def _real_images() -> dict[str, Image.Image]:
    """A few real files per mode: JPEG, WebP and RGBA-PNG photos (2-6k px), RGBA/LA/P icons."""
    photos = realdata.photos()
    picked = [p for p in photos if p.suffix == ".jpg"][:2] + [p for p in photos if p.suffix == ".webp"][:1]
    picked += [p for p in photos if p.suffix == ".png" and Image.open(p).mode == "RGBA"][:1]
    out = {p.name: _open(p) for p in picked}
    for mode, paths in sorted(realdata.icons_by_mode().items()):
        for p in paths[:2]:
            out[f"{mode}:{p.parent.parent.name}/{p.name}"] = _open(p)
    return out


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {**_real_images(), **_generated()}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_modes_covered(images):
    modes = {img.mode for img in images.values()}
    assert {"RGB", "RGBA", "LA", "P", "PA", "1", "CMYK", "I;16", "L"} <= modes


def test_open_clip_convention_is_open_clip_bit_for_bit(images):
    oc = open_clip.image_transform(224, is_train=False)
    ours = image_transform(PreprocessConfig.from_dict(PreprocessConfig.defaults_for("open_clip", 224)))
    diffs = {name: _max_diff(oc(img), ours(img)) for name, img in images.items()}
    assert max(diffs.values()) == 0.0, diffs


def test_open_clip_convention_other_sizes_and_filters(images):
    for size, interp in ((256, "bilinear"), (336, "bicubic")):
        oc = open_clip.image_transform(size, is_train=False, interpolation=interp)
        ours = image_transform(
            PreprocessConfig(image_size=size, interpolation=interp, convention="open_clip", alpha="drop")
        )
        for name, img in list(images.items())[-7:]:
            assert _max_diff(oc(img), ours(img)) == 0.0, (size, interp, name)


@pytest.mark.parametrize("processor_cfg", [STANDARD, WIDER], ids=["standard", "shortest256-crop224"])
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_hf_convention_is_clip_image_processor_bit_for_bit(images, processor_cfg, backend):
    oracle_cls = CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil
    oracle = oracle_cls(**processor_cfg)
    fields = PreprocessConfig.from_hf_processor(processor_cfg, 224).to_dict()
    ours = image_transform({**fields, "backend": backend})
    diffs = {
        name: _max_diff(oracle(images=img, return_tensors="pt")["pixel_values"][0], ours(img))
        for name, img in images.items()
    }
    assert max(diffs.values()) == 0.0, diffs


def test_hf_drop_reproduces_convert_rgb_first(images):
    """alpha=drop with the PIL backend = transformers 4.x's CLIPImageProcessor (convert("RGB") first)."""
    oracle = CLIPImageProcessorPil(**STANDARD)
    ours = image_transform({**PreprocessConfig.from_hf_processor(STANDARD, 224).to_dict(), "backend": "pil"})
    drop = image_transform(
        {**PreprocessConfig.from_hf_processor(STANDARD, 224).to_dict(), "backend": "pil", "alpha": "drop"}
    )
    for name, img in images.items():
        if img.mode not in ("RGBA", "LA", "PA"):
            continue
        expected = oracle(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        assert _max_diff(expected, drop(img)) == 0.0, name
    rgba = images["RGBA-333x501"]
    assert _max_diff(ours(rgba), drop(rgba)) > 0.1  # composite and drop really differ


def test_old_default_differed_from_hf(images):
    """The bug this fixes: open_clip-style cropping of HF weights' inputs, up to ~3 units off."""
    oracle = CLIPImageProcessor(**STANDARD)
    old = image_transform(PreprocessConfig(image_size=224))
    rgb = [img for name, img in images.items() if img.mode == "RGB" and "." in name]
    assert max(_max_diff(oracle(images=i, return_tensors="pt")["pixel_values"][0], old(i)) for i in rgb) > 0.0


# -- weights carry their convention ---------------------------------------------------------------
def _tiny_hf_folder(tmp_path, processor_cfg):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    folder = tmp_path / "hf"
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(**processor_cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("processor_cfg", [STANDARD, WIDER], ids=["standard", "shortest256-crop224"])
def test_hf_folder_gets_its_processor(tmp_path, images, processor_cfg):
    folder = _tiny_hf_folder(tmp_path, processor_cfg)
    oracle = CLIPImageProcessor.from_pretrained(folder)
    model, _, preprocess = clipforge.create_model_and_transforms(pretrained=str(folder))
    assert model.preprocess_cfg.convention == "hf"
    for name, img in images.items():
        assert (
            _max_diff(oracle(images=img, return_tensors="pt")["pixel_values"][0], preprocess(img)) == 0.0
        ), name


def test_hf_round_trip_writes_preprocessor_config(tmp_path, images):
    from clipforge.checkpoints.convert import save_as

    folder = _tiny_hf_folder(tmp_path, WIDER)
    model = clipforge.create_model(pretrained=str(folder))
    out = save_as(model, tmp_path / "again", "hf")
    oracle = CLIPImageProcessor.from_pretrained(out)
    _, _, preprocess = clipforge.create_model_and_transforms(pretrained=str(out))
    img = images["RGBA-333x501"]
    assert _max_diff(oracle(images=img, return_tensors="pt")["pixel_values"][0], preprocess(img)) == 0.0


@pytest.fixture(scope="module")
def open_clip_files(tmp_path_factory):
    """An open_clip-named state dict file and an OpenAI-style one (tiny random weights)."""
    from clipforge.checkpoints.convert import save_as

    root = tmp_path_factory.mktemp("oc")
    ours = clipforge.create_model("tiny-vit")
    return save_as(ours, root / "open_clip.pt", "open_clip"), save_as(ours, root / "openai.pt", "openai")


def test_open_clip_and_openai_files_default_to_drop(open_clip_files, images):
    for path in open_clip_files:
        model, _, preprocess = clipforge.create_model_and_transforms(pretrained=str(path))
        assert (model.preprocess_cfg.convention, model.preprocess_cfg.alpha) == ("open_clip", "drop"), path
        oc = open_clip.image_transform(model.preprocess_cfg.size[0], is_train=False)
        for name in ("RGBA-333x501", "PA"):
            assert _max_diff(oc(images[name]), preprocess(images[name])) == 0.0, (path, name)


def test_tags_default_to_open_clip_convention():
    from clipforge.checkpoints.pretrained import resolve_pretrained

    entry = resolve_pretrained("ViT-B-32", "openai")
    pre = {**PreprocessConfig.defaults_for("open_clip", 224), **entry.preprocess_dict(224)}
    cfg = PreprocessConfig.from_dict(pre)
    assert (cfg.convention, cfg.alpha) == ("open_clip", "drop")


def test_image_alpha_overrides_and_clipforge_folders_round_trip(open_clip_files, tmp_path, images):
    path = open_clip_files[0]
    model = clipforge.create_model(pretrained=str(path), image_alpha="composite:#102030")
    assert (model.preprocess_cfg.alpha, model.preprocess_cfg.background) == ("composite", (16, 32, 48))
    folder = (
        clipforge.save_pretrained(model, tmp_path / "cf") if hasattr(clipforge, "save_pretrained") else None
    )
    if folder is None:
        from clipforge.checkpoints.clipforge_format import save_pretrained

        folder = save_pretrained(model, tmp_path / "cf")
    stored = json.loads((folder / "config.json").read_text())["preprocess_cfg"]
    assert stored["alpha"] == "composite" and stored["convention"] == "open_clip"
    back, _, preprocess = clipforge.create_model_and_transforms(pretrained=str(folder))
    assert back.preprocess_cfg == model.preprocess_cfg
    img = images["RGBA-333x501"]
    assert _max_diff(preprocess(img), image_transform(model.preprocess_cfg)(img)) == 0.0
    dropped = clipforge.create_model(pretrained=str(folder), image_alpha="drop")
    assert dropped.preprocess_cfg.alpha == "drop"


def test_new_models_composite_on_white():
    model = clipforge.create_model("ViT-B-32")
    assert (model.preprocess_cfg.convention, model.preprocess_cfg.alpha) == ("clipforge", "composite")
    assert model.preprocess_cfg.background == (255, 255, 255)


def test_image_alpha_flag_parses_and_rejects():
    from clipforge.conventions import parse_alpha

    assert parse_alpha("drop") == {"alpha": "drop"}
    assert parse_alpha("composite") == {"alpha": "composite"}
    assert parse_alpha("composite:#ff8000") == {"alpha": "composite", "background": (255, 128, 0)}
    assert parse_alpha("composite:0, 10,255") == {"alpha": "composite", "background": (0, 10, 255)}
    for bad in ("transparent", "composite:#12345", "composite:1,2", "drop:#ffffff", "composite:300,0,0"):
        with pytest.raises(ConfigError):
            parse_alpha(bad)


def test_image_alpha_on_every_image_command():
    from clipforge.cli import build_parser

    parser = build_parser()
    for command in (
        ["eval"],
        ["embed", "--images", "x", "--out", "y"],
        ["search", "idx"],
        ["serve", "idx"],
        ["train"],
    ):
        args = parser.parse_args([*command, "--image-alpha", "drop"])
        assert args.image_alpha == "drop", command
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--image-alpha", "sideways"])


# -- load_image + transform ------------------------------------------------------------------------
def test_load_image_then_transform_is_open_clip(images):
    """Datasets decode with keep_mode=True, so the transform sees the file's mode (alpha intact)."""
    _, _, oc = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)  # its real eval transform
    ours = image_transform(PreprocessConfig.from_dict(PreprocessConfig.defaults_for("open_clip", 224)))
    paths = [p for mode, ps in realdata.icons_by_mode().items() for p in ps[:2]] + realdata.photos()[:2]
    for p in paths:
        assert _max_diff(oc(_open(p)), ours(load_image(p, keep_mode=True))) == 0.0, p


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_large_palette_png_is_decoded():
    """The issue's file: a 5846x3720 P-mode PNG, once skipped as "image has wrong mode"."""
    w, h = 5846, 3720
    rng = np.random.default_rng(1)
    small = Image.fromarray(rng.integers(0, 256, (h // 256, w // 256, 3), dtype=np.uint8))
    data = _png(small.resize((w, h), Image.Resampling.NEAREST).quantize(16))
    out = load_image(data, min_side=1024, exact_pixels=0)
    assert out.mode == "RGB" and out.size == (-(-w // 3), -(-h // 3))  # reduce(3), rounded up
    assert load_image(data, keep_mode=True).size == (w, h)  # 21.7 M pixels: exact by default


def test_large_images_of_every_mode_reduce_while_decoding():
    w, h = 2600, 2100
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (h // 64, w // 64, 3), dtype=np.uint8)).resize((w, h))
    palette = base.quantize(16)
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    cases = {
        "P": (palette, "PNG"),
        "P-transparency": (transparent, "PNG"),
        "PA": (palette.convert("PA"), "TIFF"),
        "LA": (base.convert("LA"), "PNG"),
        "RGBA": (base.convert("RGBA"), "PNG"),
        "I;16": (Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), "PNG"),
        "1": (base.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1"), "PNG"),
        "CMYK": (base.convert("CMYK"), "JPEG"),
    }
    for name, (img, fmt) in cases.items():
        data = _png(img, fmt)
        assert Image.open(io.BytesIO(data)).mode == img.mode, name
        out = load_image(data, exact_pixels=0)  # reduce at any size (the default: above 50 M pixels)
        assert out.mode == "RGB" and out.width < w and min(out.size) >= 1024, (name, out.size)
        full = np.asarray(load_image(data, min_side=None).resize(out.size, Image.Resampling.BOX), float)
        err = np.abs(np.asarray(out, float) - full).mean()
        assert err < 16, (name, err)  # the same picture, not noise or black
        kept = load_image(data, exact_pixels=0, keep_mode=True)
        assert kept.size == out.size and kept.mode != "P", name
        assert load_image(data, keep_mode=True).size == (w, h), name  # below 50 M pixels: exact


def test_bad_images_keep_their_reason():
    for data, reason in (
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "truncated"),
        (b"hello", "not_an_image"),
    ):
        with pytest.raises(BadImageError) as e:
            load_image(data, keep_mode=True)
        assert e.value.reason == reason
