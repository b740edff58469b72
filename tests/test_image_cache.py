"""The decoded-image cache (clipforge.data.cache): cached items equal what its module doc says,
the uncached path is unchanged, bad images, staleness, atomic writes, loader resume, the CLI."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from realdata import concept, icons

from clipforge.data.cache import ImageCache, attach_cache, build_cache, default_side, spec_for_transform
from clipforge.data.images import load_image
from clipforge.data.loader import ResumableLoader
from clipforge.data.pairs import PairsDataset
from clipforge.data.rng import seed_all
from clipforge.data.workers import auto_workers
from clipforge.transforms import PreprocessConfig, image_transform

SIZE = 48


def _files(tmp_path: Path) -> list[Path]:
    """Real icons (RGBA, 96 px and 512 px) plus a large EXIF-rotated JPEG, a palette PNG with
    transparency, a 16-bit grey PNG and one corrupt file: every branch of the cache."""
    files = icons()[:4] + icons("512x512")[:4]
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 255, (15, 26, 3), dtype=np.uint8))
    big = smooth.resize((1040, 600), Image.BICUBIC)  # photo-like: smooth at the pixel scale
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(tmp_path / "big.jpg", quality=90, exif=exif)
    stripes = (np.arange(90)[None, :] // 12 + np.arange(70)[:, None] // 18) % 4  # clip-art: flat regions
    pal = Image.fromarray(stripes.astype(np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    pal.save(tmp_path / "pal.png", transparency=3)
    ramp = np.linspace(0, 65535, 80)[None, :] * np.linspace(0.2, 1.0, 60)[:, None]
    Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "deep.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return files + [tmp_path / n for n in ("big.jpg", "pal.png", "deep.png", "bad.png")]


def _table(tmp_path: Path, files: list[Path]) -> Path:
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([str(p), concept(p)] for p in files)
    return table


def _pair(tmp_path: Path, convention: str, alpha: str) -> tuple[PairsDataset, PairsDataset]:
    table = _table(tmp_path, _files(tmp_path))
    cfg = PreprocessConfig(image_size=SIZE, convention=convention, alpha=alpha)
    tf = image_transform(cfg, is_train=True, hflip=0.5)
    return PairsDataset(table, transform=tf), PairsDataset(table, transform=tf)


def _expected(path: Path, side: int, convention: str, alpha: str, seed: int) -> torch.Tensor:
    """The module doc's recipe, written out with PIL: reduced decode, conversion, short side
    ``side``, crop window drawn against the original size, one box resize, the rest as is."""
    raw = path.read_bytes()
    img = load_image(raw, min_side=2 * side, exact_pixels=None, keep_mode=True)
    ow, oh = load_image(raw, keep_mode=True).size  # what the uncached path decodes
    has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
    if convention == "open_clip" and has_alpha:
        img = img.convert("RGBA")
    else:
        from clipforge.transforms import to_rgb

        img = img.convert("RGB") if convention == "open_clip" else to_rgb(img, alpha=alpha)
    w, h = img.size
    if min(w, h) > side:
        img = img.resize(
            (side, round(h * side / w)) if w <= h else (round(w * side / h), side), Image.BICUBIC
        )
    img = img.convert("RGBA" if img.mode == "RGBA" else "RGB")
    seed_all(seed)
    top, left, ch, cw = T.RandomResizedCrop.get_params(torch.zeros(3, oh, ow), (0.9, 1.0), (3 / 4, 4 / 3))
    if img.size == (ow, oh):  # stored unreduced: torchvision's crop, then resize
        img = img.crop((left, top, left + cw, top + ch)).resize((SIZE, SIZE), Image.BICUBIC)
    else:
        sx, sy = img.size[0] / ow, img.size[1] / oh
        img = img.resize(
            (SIZE, SIZE), Image.BICUBIC, box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)
        )
    if torch.rand(1) < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.convert("RGB")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    return T.Normalize(PreprocessConfig().mean, PreprocessConfig().std)(x)


@pytest.mark.parametrize("convention,alpha", [("clipforge", "composite"), ("open_clip", "drop")])
def test_cached_items_follow_the_documented_recipe(tmp_path, convention, alpha):
    plain, cached = _pair(tmp_path, convention, alpha)
    attach_cache(cached, tmp_path / "cache")
    side = default_side(SIZE, (0.9, 1.0), (3 / 4, 4 / 3))
    assert side == math.ceil(SIZE / math.sqrt(0.9 * 0.75))
    diffs = []
    for i in range(len(plain) - 1):  # the last file is the corrupt one
        seed_all(100 + i)
        image, tokens = cached[i]
        want = _expected(Path(cached.image_paths[i]), side, convention, alpha, 100 + i)
        assert torch.allclose(image, want, atol=1e-6), (i, (image - want).abs().max())
        seed_all(100 + i)
        if not (convention == "open_clip" and cached.image_paths[i].endswith("pal.png")):
            diffs.append(round((plain[i][0] - image).abs().mean().item(), 4))
    # Close to decoding each time (normalised units; the colour range is ~7 wide). Not for a
    # palette image under open_clip, which PIL resizes nearest-neighbour uncached (doc, point 3).
    assert max(diffs) < 0.08 and float(np.mean(diffs)) < 0.04


@pytest.mark.parametrize("convention,alpha", [("clipforge", "composite"), ("open_clip", "drop")])
def test_images_no_larger_than_the_cache_give_bit_identical_items(tmp_path, convention, alpha):
    """Icons smaller than the cached side (RGBA and LA, 24 and 32 px) are stored as they are;
    their cached items must equal the uncached ones exactly, every draw of crop and flip."""
    by_mode: dict[str, list[Path]] = {}
    for path in icons("24x24") + icons("32x32"):
        with Image.open(path) as im:
            by_mode.setdefault(im.mode, []).append(path)
    files = by_mode["RGBA"][:6] + by_mode.get("LA", [])[:2]
    assert len(files) > 6, sorted(by_mode)  # Adwaita's legacy sizes have LA icons too
    table = _table(tmp_path, files)
    cfg = PreprocessConfig(image_size=SIZE, convention=convention, alpha=alpha)
    plain = PairsDataset(table, transform=image_transform(cfg, is_train=True, hflip=0.5))
    cached = PairsDataset(table, transform=image_transform(cfg, is_train=True, hflip=0.5))
    attach_cache(cached, tmp_path / "cache")
    index = cached.image_cache.index
    assert (index[:, 1:3] == index[:, 4:6]).all()  # stored unreduced
    for i in range(len(files)):
        for draw in range(3):
            seed_all(1000 * draw + i)
            want = plain[i][0]
            seed_all(1000 * draw + i)
            got = cached[i][0]
            assert torch.equal(got, want), (files[i].name, draw, (got - want).abs().max().item())


def test_uncached_path_is_unchanged(tmp_path):
    plain, _ = _pair(tmp_path, "clipforge", "composite")
    for i in range(len(plain) - 1):
        seed_all(7 + i)
        got = plain[i][0]
        seed_all(7 + i)
        want = plain.transform(load_image(plain.image_paths[i], keep_mode=True))
        assert torch.equal(got, want)


def test_bad_images_are_replaced_as_without_the_cache(tmp_path):
    plain, cached = _pair(tmp_path, "clipforge", "composite")
    attach_cache(cached, tmp_path / "cache")
    bad = len(plain) - 1
    assert "bad.png" in cached.image_cache.manifest["bad"][str(bad)]
    assert plain.fetch(bad)[0] == cached.fetch(bad)[0] != bad  # the same seeded substitute row
    assert cached.skipped["truncated"] == 1


def test_cache_is_rebuilt_when_the_files_change_and_written_atomically(tmp_path, monkeypatch):
    _, cached = _pair(tmp_path, "clipforge", "composite")
    spec, _ = spec_for_transform(cached.transform)
    folder = build_cache(cached, tmp_path / "cache", spec)
    first = ImageCache(folder).manifest["fingerprint"]
    assert build_cache(cached, folder, spec) == folder  # unchanged data: kept as it is
    os.utime(cached.image_paths[-3], ns=(1, 1))
    monkeypatch.setattr(
        type(spec), "to_pixels", lambda self, img: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError):
        build_cache(cached, folder, spec)
    assert ImageCache(folder).manifest["fingerprint"] == first  # the old cache is intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cache")) == []
    monkeypatch.undo()
    assert ImageCache(build_cache(cached, folder, spec)).manifest["fingerprint"] != first


def test_loader_over_the_cache_is_worker_independent_and_resumes_exactly(tmp_path):
    _, cached = _pair(tmp_path, "clipforge", "composite")
    attach_cache(cached, tmp_path / "cache")
    tokens = lambda text: torch.tensor([len(text)])  # noqa: E731 - tiny stand-in tokenizer
    cached.tokenizer = tokens

    def batches(workers, state=None, n=None):
        loader = ResumableLoader(cached, batch_size=3, num_workers=workers, seed=5)
        if state is not None:
            loader.load_state_dict(state)
        out, it = [], iter(loader)
        for _ in range(n or len(loader)):
            out.append(next(it))
        return out, loader.state_dict()

    full, _ = batches(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, batches(2)[0]))
    _, state = batches(0, n=1)
    rest, _ = batches(0, state, n=len(full) - 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[1:], rest))


def test_auto_workers():
    class Cached:
        image_cache = object()

    assert auto_workers(object(), "cpu", cores=2) == 0
    assert auto_workers(object(), "cpu", cores=16) == 4
    assert auto_workers(Cached(), "cpu", cores=16) == 0
    assert auto_workers(object(), "cuda", cores=16) == 8
    assert auto_workers(object(), "cuda", world_size=4, cores=16) == 3
    assert auto_workers(Cached(), "cuda", cores=16) == 2


def test_cache_command_then_train_reads_it(tmp_path, capsys):
    from clipforge.cli import main

    table = _table(tmp_path, icons()[:8])
    assert (
        main(["cache", str(table), "--out", str(tmp_path / "c"), "--model", "tiny-vit", "--workers", "0"])
        == 0
    )
    assert "8 images cached" in capsys.readouterr().out
    built = (tmp_path / "c" / "pixels.u8").stat().st_mtime_ns
    args = ["train", "--data", str(table), "--model", "tiny-vit", "--cache-images", "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "4", "--max-steps", "2", "--output-dir", str(tmp_path / "run"),
            "--no-progress", "--save-every-epochs", "0"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "c" / "pixels.u8").stat().st_mtime_ns == built  # used, not rebuilt


def test_cache_refuses_a_transform_it_cannot_follow(tmp_path):
    from clipforge.data.cache import ImageCacheError

    plain, _ = _pair(tmp_path, "clipforge", "composite")
    plain.transform = image_transform(PreprocessConfig(image_size=SIZE), is_train=False)
    with pytest.raises(ImageCacheError, match="RandomResizedCrop"):
        attach_cache(plain, tmp_path / "cache")
