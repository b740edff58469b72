"""Issue 7: every PIL mode and shape a scraper meets comes out as a valid model input."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipforge.transforms import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, image_transform, to_rgb

MODES = [
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "LA",
    "PA",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "F",
    "I;16",
    "I;16B",
    "RGBa",
    "La",
    "RGBX",
]
EVAL = image_transform(PreprocessConfig(32), is_train=False)
TRAIN = image_transform(
    PreprocessConfig((24, 40)), is_train=True, hflip=0.5, color_jitter=0.3, gray_scale_prob=0.3
)
LOW = (0 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
HIGH = (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode in ("I", "F", "I;16", "I;16B"):
        dtype, hi = {
            "I": (np.int32, 2**31 - 1),
            "F": (np.float32, 1e6),
            "I;16": (np.uint16, 65535),
            "I;16B": (np.uint16, 65535),
        }[mode]
        arr = (rng.random((h, w)) * hi).astype(dtype)
        if mode == "F":
            arr.flat[0] = np.nan
        if mode == "I;16B":
            return Image.frombytes("I;16B", (w, h), arr.astype(">u2").tobytes())
        return Image.fromarray(arr)
    bands = len(Image.new(mode, (1, 1)).getbands())
    raw = rng.integers(0, 256, size=(h * w * bands,), dtype=np.uint8).tobytes()
    img = Image.frombytes(mode if mode != "1" else "L", (w, h), raw)
    if mode == "1":
        img = img.convert("1")
    if mode == "P":
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if seed % 2:
            img.info["transparency"] = int(rng.integers(0, 256))
    return img


def assert_valid(x: torch.Tensor, shape: tuple[int, int, int]) -> None:
    assert x.shape == shape and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert (x >= LOW.view(3, 1, 1) - 1e-4).all() and (x <= HIGH.view(3, 1, 1) + 1e-4).all()


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.sampled_from(MODES), st.integers(1, 70), st.integers(1, 70), st.integers(0, 1000))
def test_any_mode_and_size_gives_valid_tensor(mode: str, w: int, h: int, seed: int) -> None:
    img = make_image(mode, w, h, seed)
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == (w, h)
    assert_valid(EVAL(img), (3, 32, 32))
    torch.manual_seed(seed)
    assert_valid(TRAIN(img), (3, 24, 40))


def test_animated_gif_current_frame(tmp_path) -> None:
    frames = [Image.new("P", (10, 10), i) for i in (1, 2)]
    for i, f in enumerate(frames):
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        f.info["duration"] = 10 * (i + 1)
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    gif = Image.open(tmp_path / "a.gif")
    assert to_rgb(gif).getpixel((0, 0)) == (255, 0, 0)  # first frame
    assert_valid(EVAL(gif), (3, 32, 32))
