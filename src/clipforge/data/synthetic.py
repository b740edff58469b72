"""``synthetic:shapes``: procedurally drawn shapes with captions, for the demo and the tests.

Every item is a pure function of (seed, split, index): nothing is stored, any worker or
resumed run redraws exactly the same pixels. A caption names five attributes - size, colour,
shape, position and background - e.g. "a small red triangle on the left on a blue background",
so a tiny CLIP has to bind attributes to objects rather than memorise images.

Splits: one (shape, colour) combination per shape is *held out* (:data:`HELDOUT_PAIRS`): every
shape and every colour is still seen in training, but never together in those combinations.
``split="train"`` and ``"val"`` draw from the other combinations (different random streams);
``"heldout"`` draws only the held-out ones, which makes a compositional zero-shot test:
classify held-out images by shape or by "colour shape" with prompts the model never saw.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.atomic import atomic_write
from clipforge.data.pairs import transform_pair
from clipforge.errors import DataError

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 185),
    "orange": (250, 140, 25),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (120, 160, 250),
    "green": (130, 210, 140),
    "yellow": (250, 240, 150),
}
SIZES = {"small": 0.16, "large": 0.28}  # radius as a fraction of the image side
POSITIONS = {
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# One colour per shape, each colour used once: shape i is never shown in colour i+1 in training.
_COLOUR_NAMES = tuple(COLOURS)
HELDOUT_PAIRS = frozenset((s, _COLOUR_NAMES[(i + 1) % len(_COLOUR_NAMES)]) for i, s in enumerate(SHAPES))
SPLITS = ("train", "val", "heldout", "all")
TASKS = ("shape", "colour", "colour_shape")
CAPTION_STYLES = ("full", "short", "varied")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def caption(self, style: str = "full", rng: random.Random | None = None) -> str:
        """``full``: all five attributes; ``short``: "a red triangle"; ``varied``: a random subset.

        ``varied`` is how people caption: size, position and background are each named half of
        the time, colour and shape 80% (at least one of them; "shape" stands in for a missing
        one). A model trained on it reads "a triangle" or "a red shape" as familiar text, so
        zero-shot prompts can name one attribute without leaving the training distribution.
        """
        if style == "short":
            return f"a {self.colour} {self.shape}"
        pos = POSITION_PHRASES[self.position]
        if style == "full":
            return f"a {self.size} {self.colour} {self.shape} {pos} on a {self.background} background"
        if style != "varied" or rng is None:
            raise DataError(
                f"caption style must be one of {CAPTION_STYLES} (varied needs an rng), got {style!r}"
            )
        size, position, background = (rng.random() < 0.5 for _ in range(3))
        colour, shape = rng.random() < 0.8, rng.random() < 0.8
        shape = shape or not colour
        words = [
            "a",
            self.size if size else "",
            self.colour if colour else "",
            self.shape if shape else "shape",
        ]
        words += [pos if position else "", f"on a {self.background} background" if background else ""]
        words = [w for w in words if w]
        if words[1][0] in "aeiou":
            words[0] = "an"
        return " ".join(words)


def _pairs_for(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise DataError(f"synthetic:shapes split must be one of {SPLITS}, got {split!r}")
    every = [(s, c) for s in SHAPES for c in COLOURS]
    if split == "heldout":
        return [p for p in every if p in HELDOUT_PAIRS]
    if split == "all":
        return every
    return [p for p in every if p not in HELDOUT_PAIRS]


def sample_spec(index: int, *, seed: int = 0, split: str = "train") -> tuple[ShapeSpec, random.Random]:
    """Attributes of item ``index`` plus the RNG (already advanced) used for its jitter."""
    rng = random.Random(f"shapes:{seed}:{split}:{index}")
    shape, colour = rng.choice(_pairs_for(split))
    backgrounds = [b for b in BACKGROUNDS if b != colour]
    spec = ShapeSpec(
        shape, colour, rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS)), rng.choice(backgrounds)
    )
    return spec, rng


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(a), cy - r * math.sin(a))
            for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.35
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    raise DataError(f"unknown shape {shape!r}; known: {SHAPES}")


def draw(spec: ShapeSpec, image_size: int = 64, rng: random.Random | None = None) -> Any:
    """Render ``spec`` (drawn at 2x and downsampled for smooth edges) with a little jitter."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random(0)
    scale = 2
    side = image_size * scale
    fx, fy = POSITIONS[spec.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * side
    cy = (fy + rng.uniform(-0.04, 0.04)) * side
    r = SIZES[spec.size] * side * rng.uniform(0.9, 1.1)
    img = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    pen = ImageDraw.Draw(img)
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon(_polygon(spec.shape, cx, cy, r), fill=fill)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def class_names(task: str = "shape") -> list[str]:
    """Zero-shot class names: shapes, colours, or "colour shape" for every combination."""
    if task == "shape":
        return list(SHAPES)
    if task == "colour":
        return list(COLOURS)
    if task == "colour_shape":
        return [f"{c} {s}" for s in SHAPES for c in COLOURS]
    raise DataError(f"unknown zero-shot task {task!r}; known: {TASKS}")


def label_of(spec: ShapeSpec, task: str = "shape") -> int:
    if task == "shape":
        return SHAPES.index(spec.shape)
    if task == "colour":
        return _COLOUR_NAMES.index(spec.colour)
    return class_names("colour_shape").index(f"{spec.colour} {spec.shape}")


class SyntheticShapes:
    """Map-style dataset of ``n`` drawn shapes: items are ``(transform(image), tokenizer(caption))``.

    With no transform the image is a 64x64 (``image_size``) RGB ``PIL.Image``; with no
    tokenizer the caption is returned as a string.
    """

    def __init__(
        self,
        n: int = 10_000,
        *,
        split: str = "train",
        seed: int = 0,
        transform: Callable | None = None,
        tokenizer: Callable | None = None,
        image_size: int = 64,
        caption_style: str = "full",
    ) -> None:
        _pairs_for(split)  # validates the split
        if caption_style not in CAPTION_STYLES:
            raise DataError(
                f"synthetic:shapes caption_style must be one of {CAPTION_STYLES}, got {caption_style!r}"
            )
        self.n, self.split, self.seed = int(n), split, int(seed)
        self.transform, self.tokenizer = transform, tokenizer
        self.image_size, self.caption_style = image_size, caption_style
        self.source = f"synthetic:shapes?split={split}&n={n}&seed={seed}"
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)  # images do not depend on it; ``varied`` captions do

    def spec(self, idx: int) -> ShapeSpec:
        return sample_spec(idx, seed=self.seed, split=self.split)[0]

    def get_image(self, idx: int) -> Any:
        spec, rng = sample_spec(idx, seed=self.seed, split=self.split)
        return draw(spec, self.image_size, rng)

    def caption_for(self, idx: int) -> str:
        return self._caption(self.spec(idx), idx)

    def _caption(self, spec: ShapeSpec, idx: int) -> str:
        # varied captions change with the epoch, deterministically, so resumed runs match
        rng = random.Random(f"caption:{self.seed}:{self.split}:{idx}:{self.epoch}")
        return spec.caption(self.caption_style, rng)

    @property
    def all_captions(self) -> list[list[str]]:
        return [[self.caption_for(i)] for i in range(self.n)]

    def labels(self, task: str = "shape") -> list[int]:
        return [label_of(self.spec(i), task) for i in range(self.n)]

    def __getitem__(self, idx: int) -> tuple[Any, Any]:
        if not -self.n <= idx < self.n:
            raise IndexError(idx)
        idx %= self.n
        spec, rng = sample_spec(idx, seed=self.seed, split=self.split)
        return transform_pair(
            draw(spec, self.image_size, rng), self._caption(spec, idx), self.transform, self.tokenizer
        )


def zero_shot_set(
    n: int = 600, *, task: str = "shape", split: str = "heldout", seed: int = 1, **kw: Any
) -> tuple[SyntheticShapes, list[int], list[str]]:
    """(dataset, labels, class names) for zero-shot classification on ``split`` images."""
    ds = SyntheticShapes(n, split=split, seed=seed, **kw)
    return ds, ds.labels(task), class_names(task)


def retrieval_set(
    n: int = 100, *, split: str = "val", seed: int = 2, image_size: int = 64, caption_style: str = "full"
) -> tuple[list[Any], list[str]]:
    """``n`` (image, caption) pairs with *distinct* captions, so Recall@1 has one right answer."""
    images, captions, seen = [], [], set()
    limit = len(_pairs_for(split)) * len(SIZES) * len(POSITIONS) * (len(BACKGROUNDS) - 1)
    if n > limit:
        raise DataError(f"retrieval_set: at most {limit} distinct captions exist in split {split!r}")
    i = 0
    while len(images) < n:
        spec, rng = sample_spec(i, seed=seed, split=split)
        i += 1
        cap = spec.caption(caption_style)
        if cap in seen:
            continue
        seen.add(cap)
        images.append(draw(spec, image_size, rng))
        captions.append(cap)
    return images, captions


def write_synthetic(
    out_dir: str | os.PathLike, n: int, *, split: str = "train", seed: int = 0, image_size: int = 64
) -> Path:
    """Write ``n`` PNGs plus ``captions.csv`` (columns image, caption) for CLI use; returns the CSV."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = SyntheticShapes(n, split=split, seed=seed, image_size=image_size)
    rows = []
    for i in range(n):
        spec, rng = sample_spec(i, seed=seed, split=split)
        rel = f"images/{i:06d}.png"
        draw(spec, image_size, rng).save(out / rel)
        rows.append((rel, spec.caption(ds.caption_style)))
    table = out / "captions.csv"
    with atomic_write(table, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return table


def parse_synthetic_spec(spec: str) -> dict[str, Any]:
    """``synthetic:shapes?n=5000&split=train&seed=1&image_size=64`` -> keyword arguments."""
    name, _, query = spec.partition("?")
    if name != "synthetic:shapes":
        raise DataError(f"unknown synthetic dataset {name!r}; available: synthetic:shapes")
    kw: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key in ("n", "seed", "image_size"):
            kw[key] = int(value)
        elif key in ("split", "caption_style"):
            kw[key] = value
        else:
            raise DataError(f"{spec}: unknown option {key!r} (n, seed, split, image_size, caption_style)")
    return kw
