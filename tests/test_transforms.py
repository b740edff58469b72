"""Preprocessing parity with open_clip's transforms (test-only oracle) and mode conversion."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from clipforge.errors import ConfigError
from clipforge.transforms import (
    OPENAI_MEAN,
    OPENAI_STD,
    PreprocessConfig,
    image_transform,
    to_rgb,
)

open_clip = pytest.importorskip("open_clip")

# (w, h): tiny, tall, wide, odd, just above 224, large; aspect ratios up to 15:1 (see extreme test)
SIZES = [(1, 1), (32, 480), (480, 32), (31, 17), (225, 223), (257, 640)]
MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(3, 1, 1)


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def smooth_rgb(w: int, h: int, seed: int) -> np.ndarray:
    """Random noise plus gradients: realistic enough for JPEG, hard enough for resampling."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def save_and_reload(img: Image.Image, path: Path) -> Image.Image:
    img.save(path)
    reloaded = Image.open(path)
    reloaded.load()
    return reloaded


@pytest.fixture(scope="module")
def ours():
    return image_transform(PreprocessConfig(224), is_train=False)


@pytest.fixture(scope="module")
def ref():
    return open_clip.image_transform(224, is_train=False)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("w,h", SIZES)
@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_eval_identical_to_open_clip(tmp_path: Path, ours, ref, w: int, h: int, fmt: str, mode: str) -> None:
    img = Image.fromarray(smooth_rgb(w, h, seed=w * 1000 + h)).convert(mode)
    img = save_and_reload(img, tmp_path / f"img.{fmt}")
    assert img.mode == mode
    out = ours(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert max_diff(out, ref(img)) < 1e-5


@pytest.mark.parametrize("mode", ["P", "1", "CMYK", "RGBA-opaque", "LA-opaque"])
@pytest.mark.parametrize("w,h", [(1, 1), (97, 300), (640, 480)])
def test_eval_matches_open_clip_after_same_rgb_conversion(
    tmp_path: Path, ours, ref, mode: str, w: int, h: int
) -> None:
    """Modes open_clip converts after resizing (P/1 then resample with nearest neighbour, CMYK
    resamples in CMYK): given the same RGB image, the pipelines are identical."""
    rgb = Image.fromarray(smooth_rgb(w, h, seed=7))
    if mode == "P":
        img, fmt = rgb.quantize(colors=64), "png"
    elif mode == "1":
        img, fmt = rgb.convert("1"), "png"
    elif mode == "CMYK":
        img, fmt = rgb.convert("CMYK"), "jpg"
    elif mode == "RGBA-opaque":
        img, fmt = rgb.convert("RGBA"), "png"
    else:
        img, fmt = rgb.convert("LA"), "png"
    img = save_and_reload(img, tmp_path / f"img.{fmt}")
    assert img.mode == mode.split("-")[0]
    converted = to_rgb(img)
    assert converted.mode == "RGB" and converted.size == (w, h)
    assert np.array_equal(np.asarray(converted), np.asarray(img.convert("RGB")))
    assert max_diff(ours(img), ref(converted)) < 1e-5
    if mode.endswith("opaque"):  # no transparency: identical to open_clip on the raw image too
        assert max_diff(ours(img), ref(img)) < 1e-5


def test_extreme_aspect_ratio_is_bounded(ours, ref) -> None:
    """A 2x6000 banner would be resized to 224x672000 (450 MB) first; we fuse resize and crop.
    On a smooth image the result stays within a few grey levels of open_clip's."""
    wide = Image.fromarray(smooth_rgb(6000, 20, seed=1)).filter(ImageFilter.GaussianBlur(3))
    for img in (wide, wide.transpose(Image.Transpose.ROTATE_90), Image.new("RGB", (1, 20000), (0, 128, 255))):
        out = ours(img)
        assert out.shape == (3, 224, 224) and torch.isfinite(out).all()
    diff = (unnormalize(ours(wide)) - unnormalize(ref(wide))).abs()
    assert float(diff.mean()) < 2 / 255 and float(diff.max()) < 16 / 255
    solid = unnormalize(ours(Image.new("RGB", (1, 20000), (0, 128, 255))))
    assert torch.allclose(
        solid, torch.tensor([0, 128 / 255, 1.0]).view(3, 1, 1).expand(3, 224, 224), atol=1e-5
    )


def _half_transparent(mode: str) -> Image.Image:
    """64x64: left half fully transparent with *black* hidden colour, right half opaque red."""
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[:, 32:] = (255, 0, 0, 255)
    img = Image.fromarray(arr, "RGBA")
    if mode == "LA":
        return img.convert("LA")
    if mode == "P":
        pal = img.convert("RGB").quantize(colors=4)
        transparent_index = pal.getpixel((0, 0))
        pal.info["transparency"] = transparent_index
        return pal
    return img


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_white(tmp_path: Path, ours, ref, mode: str) -> None:
    img = save_and_reload(_half_transparent(mode), tmp_path / "t.png")
    assert img.mode == mode and (mode != "P" or "transparency" in img.info)
    pixels = unnormalize(ours(img))
    left, right = pixels[:, 20:200, 5:90], pixels[:, 20:200, 130:220]
    assert torch.allclose(left, torch.ones_like(left), atol=1e-5)
    expected_right = torch.tensor([1.0, 0.0, 0.0] if mode != "LA" else [76 / 255] * 3).view(3, 1, 1)
    assert torch.allclose(right, expected_right.expand_as(right), atol=1e-5)
    # open_clip shows the hidden colour (black) instead: the documented difference
    assert float(unnormalize(ref(img))[:, 20:200, 5:90].max()) < 0.01


def test_semi_transparent_blends_with_background() -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert to_rgb(img).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(img, background=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 127)
    cfg = PreprocessConfig(16, background=(0, 0, 0))
    assert torch.allclose(
        unnormalize(image_transform(cfg)(Image.new("LA", (4, 4), (200, 0)))),
        torch.zeros(3, 16, 16),
        atol=1e-5,
    )


def test_sixteen_bit_uses_full_range(tmp_path: Path, ours, ref) -> None:
    ramp = np.linspace(0, 65535, 300 * 200).reshape(200, 300).round().astype(np.uint16)
    ramp[0, 0], ramp[-1, -1] = 0, 65535
    img = save_and_reload(Image.fromarray(ramp), tmp_path / "deep.png")
    assert img.mode == "I;16"
    rgb = to_rgb(img)
    assert rgb.getextrema() == ((0, 255), (0, 255), (0, 255))
    values = np.asarray(rgb)[..., 0].astype(np.int64)
    assert np.abs(values - ramp.astype(np.float64) / 257.0).max() <= 0.5  # correctly rounded scaling
    assert 0.40 < values.mean() / 255 < 0.60  # not clipped to white (PIL's convert would be ~1.0)
    out = unnormalize(ours(img))
    assert float(out.min()) < 0.02 and float(out.max()) > 0.98
    assert max_diff(ours(img), ref(rgb)) < 1e-5
    big_endian = Image.frombytes("I;16B", (300, 200), ramp.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian)), np.asarray(rgb))


def test_int32_and_float_modes() -> None:
    as_i = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert as_i.mode == "I" and np.asarray(to_rgb(as_i))[0, :, 0].tolist() == [0, 128, 255]
    as_f = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert as_f.mode == "F" and np.asarray(to_rgb(as_f))[0, :, 0].tolist() == [0, 128, 255, 0]
    eight_bit_f = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32))
    assert np.asarray(to_rgb(eight_bit_f))[0, :, 0].tolist() == [0, 100, 255]


def test_other_modes_and_rgb_passthrough() -> None:
    rgb = Image.new("RGB", (5, 5), (10, 20, 30))
    assert to_rgb(rgb) is rgb
    for mode in ["YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La", "PA", "I;16L", "I;16B"]:
        img = Image.new(mode, (3, 2))
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (3, 2), mode
    broken_profile = Image.new("CMYK", (4, 4), (0, 0, 0, 128))
    broken_profile.info["icc_profile"] = b"not a profile"
    assert to_rgb(broken_profile).getpixel((0, 0)) == Image.new("CMYK", (1, 1), (0, 0, 0, 128)).convert(
        "RGB"
    ).getpixel((0, 0))


@pytest.mark.parametrize(
    "cfg,kwargs",
    [
        (PreprocessConfig((224, 160)), {"image_size": (224, 160)}),
        (
            PreprocessConfig(224, resize_mode="longest", fill_color=0),
            {"image_size": 224, "resize_mode": "longest"},
        ),
        (
            PreprocessConfig((200, 240), resize_mode="longest"),
            {"image_size": (200, 240), "resize_mode": "longest"},
        ),
        (
            PreprocessConfig(96, resize_mode="squash", interpolation="bilinear"),
            {"image_size": 96, "resize_mode": "squash", "interpolation": "bilinear"},
        ),
        (
            PreprocessConfig(64, mean=(0.5,) * 3, std=(0.5,) * 3),
            {"image_size": 64, "mean": (0.5,) * 3, "std": (0.5,) * 3},
        ),
    ],
)
def test_other_resize_modes_match_open_clip(cfg: PreprocessConfig, kwargs: dict) -> None:
    ref = open_clip.image_transform(is_train=False, **kwargs)
    ours = image_transform(cfg, is_train=False)
    for w, h in [(333, 517), (517, 333), (20, 20)]:
        img = Image.fromarray(smooth_rgb(w, h, seed=w))
        out = ours(img)
        assert out.shape == (3, *cfg.size)
        assert max_diff(out, ref(img)) < 1e-5


def test_train_transform_shape_seeded_and_matches_open_clip() -> None:
    img = Image.fromarray(smooth_rgb(300, 300, seed=3))  # square: random crops are feasible
    ours = image_transform(PreprocessConfig(64), is_train=True)
    ref = open_clip.image_transform(64, is_train=True)
    torch.manual_seed(0)
    a = ours(img)
    torch.manual_seed(0)
    b = ours(img)
    torch.manual_seed(0)
    c = ref(img)
    torch.manual_seed(1)
    d = ours(img)
    assert a.shape == (3, 64, 64)
    assert torch.equal(a, b) and max_diff(a, c) < 1e-5  # same RNG draws as open_clip's default
    assert not torch.equal(a, d)
    tiny = image_transform(
        PreprocessConfig((32, 48)),
        is_train=True,
        scale=(0.5, 1.0),
        hflip=0.5,
        color_jitter=0.4,
        gray_scale_prob=0.2,
    )
    for mode in ["RGBA", "P", "I;16", "1"]:
        assert tiny(Image.new(mode, (7, 90))).shape == (3, 32, 48)


def test_train_options_validated() -> None:
    with pytest.raises(ConfigError, match="use_timm"):
        image_transform(PreprocessConfig(32), is_train=True, use_timm=True)
    with pytest.raises(ConfigError, match="scale"):
        image_transform(PreprocessConfig(32), is_train=True, scale=(0.0, 1.0))


def test_preprocess_config_round_trip_and_validation() -> None:
    cfg = PreprocessConfig(
        (256, 192),
        mean=(0.5, 0.5, 0.5),
        std=[0.25] * 3,
        interpolation="bilinear",
        resize_mode="squash",
        fill_color=3,
    )
    again = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.size == (256, 192)
    assert PreprocessConfig.from_dict({"size": 336, "mode": "RGB"}).size == (336, 336)  # open_clip keys
    assert PreprocessConfig(mean=0.5).mean == (0.5, 0.5, 0.5)
    for bad in [
        {"resize_mode": "crop"},
        {"interpolation": "lanczos2"},
        {"std": (0, 1, 1)},
        {"image_size": 0},
    ]:
        with pytest.raises(ConfigError):
            PreprocessConfig(**bad)
    with pytest.raises(ConfigError, match="unknown preprocess config"):
        PreprocessConfig.from_dict({"image_size": 224, "crop_pct": 0.9})
    assert image_transform(336)(Image.new("RGB", (500, 400))).shape == (3, 336, 336)


def test_transforms_pickle_for_dataloader_workers() -> None:
    for train in (False, True):
        t = pickle.loads(pickle.dumps(image_transform(PreprocessConfig(32), is_train=train, hflip=0.5)))
        assert t(Image.new("RGBA", (40, 50))).shape == (3, 32, 32)
