"""Shared builders for the search tests: a generated image set, a saved tiny model, an index.

Not a test module (no ``test_`` prefix); imported by tests/test_search*.py and
tests/robustness/test_search_service.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ports import free_port

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (245, 120, 180),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "bar", "cross")
BACKGROUNDS = ((250, 250, 245), (30, 30, 40), (200, 220, 255), (60, 90, 60))


def draw(
    shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int = 48, inset: int = 0
):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    a, b = size // 5 + inset, size - size // 5
    if shape == "circle":
        d.ellipse([a, a, b, b], fill=colour)
    elif shape == "square":
        d.rectangle([a, a, b, b], fill=colour)
    elif shape == "triangle":
        d.polygon([(size // 2, a), (a, b), (b, b)], fill=colour)
    elif shape == "bar":
        d.rectangle([a, size // 2 - 5, b, size // 2 + 5], fill=colour)
    else:
        d.rectangle([a, size // 2 - 4, b, size // 2 + 4], fill=colour)
        d.rectangle([size // 2 - 4, a, size // 2 + 4, b], fill=colour)
    return img


def make_images(
    root: Path, n: int = 60, *, start: int = 0, broken: bool = True, duplicates: int = 2
) -> list[Path]:
    """``n`` distinct images (shape x colour x background) in nested folders, with captions.

    Adds ``duplicates`` byte-identical copies of the first image (for dedup) and one file that is
    not an image (for the skipped list). Returns the distinct images' paths.
    """
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    for j in range(start, start + n):
        shape, colour = SHAPES[j % len(SHAPES)], names[(j // len(SHAPES)) % len(names)]
        # the most contrasting of two rotating backgrounds: a random-weight model barely tells
        # white-on-white shapes apart, and the tests need every image distinct
        pair = (BACKGROUNDS[j % 4], BACKGROUNDS[(j + 1) % 4])
        bg = max(pair, key=lambda b: sum(abs(x - y) for x, y in zip(b, COLOURS[colour])))
        sub = root / ("a" if j % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{j:03d}.{'png' if j % 3 else 'jpg'}"
        # past 60 the (shape, colour) pairs repeat: shift those shapes so every image stays unique
        draw(shape, COLOURS[colour], bg, inset=6 * (j // 60)).save(path, quality=95)
        path.with_suffix(".txt").write_text(f"a {colour} {shape}")
        paths.append(path)
    if duplicates:
        dup = root / "dup"
        dup.mkdir(exist_ok=True)
        for i in range(duplicates):
            shutil.copy(paths[0], dup / f"copy{i}{paths[0].suffix}")
    if broken:
        (root / "broken.jpg").write_bytes(b"<html>this is not a jpeg</html>")
    return paths


def save_tiny_model(directory: Path) -> Path:
    """A random-weight tiny-vit (seeded) saved in clipforge format, so a manifest can name it."""
    import torch

    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny-vit")
    save_pretrained(model, directory)
    return directory


def load_model(model_dir: Path):
    from clipforge.factory import create_model_and_transforms, get_tokenizer

    model, _, preprocess = create_model_and_transforms("tiny-vit", pretrained=str(model_dir))
    model.eval()
    return model, preprocess, get_tokenizer(model)


@dataclass
class SearchSetup:
    root: Path
    images: list[Path]
    model_dir: Path
    emb_dir: Path
    index_dir: Path


def build_setup(root: Path, *, n: int = 60, num_workers: int = 1) -> SearchSetup:
    from clipforge.search.embed import embed_images
    from clipforge.search.index import build_index

    images = make_images(root / "images", n)
    model_dir = save_tiny_model(root / "model")
    model, preprocess, tokenizer = load_model(model_dir)
    emb = root / "emb"
    # float32 storage: the random tiny model puts some distinct images within 2e-3 cosine of each
    # other, closer than float16 rounding; the float16 default is tested separately
    embed_images(
        model,
        preprocess,
        root / "images",
        emb,
        batch_size=8,
        num_workers=num_workers,
        shard_size=25,
        dtype="float32",
        tokenizer=tokenizer,
        model_name="tiny-vit",
        pretrained=str(model_dir),
        progress=False,
    )
    build_index(emb, root / "index", progress=False)
    return SearchSetup(root, images, model_dir, emb, root / "index")


class UvicornThread:
    """A real uvicorn server on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="off",
                timeout_keep_alive=5,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
