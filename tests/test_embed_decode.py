"""`clipforge embed`'s decoding: threads per decoding process, the cheaper exact decode path, and
the opt-in reduced decode (``--fast-decode``).

Decoding a batch with several threads must change nothing but the speed (same tensors, same
order, same skip reasons); the faster RGBA and EXIF paths must give the pixels they gave before;
a reduced decode must stay close to the full one and record the file's own size.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.images import load_image
from clipforge.data.items import list_items
from clipforge.errors import DataError
from clipforge.search.embed import _ImageDataset, auto_decode_threads, embed_images
from clipforge.transforms import PreprocessConfig, image_transform, to_rgb


def _photo(rng: np.random.Generator, w: int, h: int, mode: str) -> Image.Image:
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Mixed formats, sizes and modes (RGB, opaque and translucent RGBA, grey) plus a broken file."""
    root = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    for i in range(14):
        w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        mode = ("RGB", "RGBA", "L")[i % 3]
        img = _photo(rng, w, h, mode)
        if mode == "RGBA" and i % 2:
            img.putalpha(255)  # opaque RGBA: the skip-the-blend path
        fmt = "png" if mode != "RGB" else ("jpg", "webp")[i % 2]
        img.save(root / f"{i:02d}.{fmt}")
    (root / "07b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def test_threaded_batch_equals_one_at_a_time(folder):
    items = list_items(folder)
    pre = image_transform(PreprocessConfig(image_size=32), is_train=False)
    one = _ImageDataset(items, pre, None, threads=1)
    many = _ImageDataset(items, pre, None, threads=3)
    order = list(range(len(items)))[::-1]  # any order asked for comes back in that order
    a, b = one.__getitems__(order), many.__getitems__(order)
    assert [s["i"] for s in b] == order and many._pool is not None
    for x, y in zip(a, b, strict=True):
        assert (x["i"], x["size"], x["reason"]) == (y["i"], y["size"], y["reason"])
        if x["image"] is None:
            assert y["image"] is None
        else:
            assert torch.equal(x["image"], y["image"])
    reasons = [s["reason"] for s in b if s["reason"]]
    assert len(reasons) == 1 and "truncated" in reasons[0]


def test_dataset_pickles_without_its_pool(folder):
    import pickle

    pre = image_transform(PreprocessConfig(image_size=32), is_train=False)
    ds = _ImageDataset(list_items(folder), pre, None, threads=2)
    ds.__getitems__([0, 1, 2])
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert copy._pool is None and copy.threads == 2
    assert torch.equal(copy[0]["image"], ds[0]["image"])


def test_auto_decode_threads_shares_the_cores():
    assert auto_decode_threads(1, cores=2) == 2  # one worker on two cores: both decode
    assert auto_decode_threads(2, cores=2) == 1
    assert auto_decode_threads(0, cores=4) == 4  # the main process decodes
    assert auto_decode_threads(3, cores=16) == 5
    assert auto_decode_threads(1, cores=64) == 8  # capped
    assert auto_decode_threads(4, cores=2) == 1  # never below one


@pytest.mark.parametrize("workers", [0, 1])
def test_embed_with_threads_equals_without(folder, tmp_path, workers):
    from clipforge.factory import create_model_and_transforms

    torch.manual_seed(0)
    model, _, pre = create_model_and_transforms("tiny-vit")
    outs = []
    for threads in (1, 3):
        out = tmp_path / f"w{workers}-t{threads}"
        m = embed_images(model, pre, folder, out, batch_size=5, num_workers=workers, dtype=np.float32,
                         progress=False, decode_threads=threads)  # fmt: skip
        assert m["count"] == 14 and m["skipped"] == 1
        outs.append(np.load(out / "img_emb_00000.npy"))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_decode_threads_below_one_is_refused(folder, tmp_path):
    with pytest.raises(DataError, match="decode_threads"):
        embed_images(None, None, folder, tmp_path / "x", decode_threads=0, progress=False)


def test_rgba_fast_path_keeps_the_pixels():
    rng = np.random.default_rng(1)
    img = _photo(rng, 37, 23, "RGBA")
    img.putalpha(255)
    before = img.tobytes()
    out = to_rgb(img)
    assert out.mode == "RGB" and out.tobytes() == img.convert("RGB").tobytes()
    assert img.tobytes() == before and img.mode == "RGBA"  # the input is not touched
    img.putpixel((5, 7), (10, 200, 30, 0))  # one transparent pixel: it is composited on white
    out = np.asarray(to_rgb(img))
    assert tuple(out[7, 5]) == (255, 255, 255)
    rgb = np.asarray(img.convert("RGB"))
    mask = np.ones(rgb.shape[:2], bool)
    mask[7, 5] = False
    assert np.array_equal(out[mask], rgb[mask])


def test_exif_rotation_still_applied_in_place():
    img = Image.new("RGB", (30, 10), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert load_image(buf.getvalue()).size == (10, 30)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    assert load_image(buf.getvalue()).size == (30, 10)


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory):
    """Real wallpapers (2-6k px JPEG, PNG, WebP), one saved with an EXIF rotation."""
    from realdata import photos

    root = tmp_path_factory.mktemp("large")
    picked = {p.suffix: p for p in photos()}  # one of each format
    for p in picked.values():
        (root / p.name).write_bytes(p.read_bytes())
    with Image.open(next(iter(picked.values()))) as im:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees on display: width and height swap
        im.convert("RGB").save(root / "rotated.jpg", exif=exif, quality=90)
    return root


def _file_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file's header, EXIF orientation applied (the oracle)."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def test_fast_decode_reduces_records_and_stays_close(large_photos, tmp_path):
    """--fast-decode: every large photo decoded reduced (JPEG draft, reduce for PNG/WebP), the
    metadata still gives the file's own (oriented) size, the embeddings stay close to a full
    decode's, and a folder is not resumed in the other mode."""
    from clipforge.data.column_tables import read_table
    from clipforge.factory import create_model_and_transforms
    from clipforge.search.embed import reduced_decode_side

    torch.manual_seed(0)
    model, _, pre = create_model_and_transforms("tiny-vit")
    side = reduced_decode_side(model)
    assert side == 2 * model.preprocess_cfg.image_size
    items = list_items(large_photos)
    ds = _ImageDataset(items, pre, None, min_side=side)
    for i, item in enumerate(items):
        data = item.read_bytes()
        full = load_image(data, keep_mode=True)
        reduced = load_image(data, keep_mode=True, min_side=side, exact_pixels=None)
        assert side <= min(reduced.size) < min(full.size) // 2, (item.path, reduced.size, full.size)
        assert ds[i]["size"] == full.size == _file_size(data)
    outs = {}
    for fast in (False, True):
        out = tmp_path / f"fast{fast}"
        m = embed_images(model, pre, large_photos, out, batch_size=3, num_workers=0, dtype=np.float32,
                         progress=False, fast_decode=fast)  # fmt: skip
        assert m["decode"] == ("reduced" if fast else "full") and m["count"] == len(items)
        meta = read_table(out / m["metadata"])
        sizes = [_file_size(it.read_bytes()) for it in items]
        assert list(zip(meta["width"], meta["height"])) == sizes
        outs[fast] = np.load(out / "img_emb_00000.npy")
    cos = (outs[False] * outs[True]).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(outs[False], outs[True]), cos
    with pytest.raises(DataError, match="decode"):
        embed_images(model, pre, large_photos, tmp_path / "fastTrue", num_workers=0, progress=False)


def test_fast_decode_refuses_naflex():
    from clipforge.errors import ConfigError
    from clipforge.search.embed import reduced_decode_side

    class Model:
        preprocess_cfg = PreprocessConfig(image_size=224, naflex_max_patches=256)

    with pytest.raises(ConfigError, match="NaFlex"):
        reduced_decode_side(Model())


def test_bf16_embeddings_are_recorded_close_and_not_mixed(folder, tmp_path):
    """--precision bf16: the manifest says so, the vectors stay close to fp32's, and a folder
    embedded at one precision is not resumed at the other."""
    from clipforge.factory import create_model_and_transforms
    from clipforge.inference import optimize_for_inference

    torch.manual_seed(0)
    model, _, pre = create_model_and_transforms("tiny-vit")
    outs = {}
    for dtype in (None, torch.bfloat16):
        m = embed_images(optimize_for_inference(model, dtype=dtype), pre, folder, tmp_path / str(dtype),
                         num_workers=0, dtype=np.float32, progress=False)  # fmt: skip
        assert m["compute_dtype"] == ("bfloat16" if dtype else "float32")
        outs[dtype] = np.load(tmp_path / str(dtype) / "img_emb_00000.npy")
    cos = (outs[None] * outs[torch.bfloat16]).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(outs[None], outs[torch.bfloat16]), cos
    with pytest.raises(DataError, match="compute_dtype"):
        embed_images(model, pre, folder, tmp_path / str(torch.bfloat16), num_workers=0, progress=False)
