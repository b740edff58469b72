"""Folder embedding end to end vs the model alone: does decoding keep the model busy?

    python benchmarks/embed_pipeline.py                          # ViT-B-32, 320 JPEGs, batch 32, 2 threads
    python benchmarks/embed_pipeline.py --models ViT-B-32,RN50 --workers 0,1,2 --images 320

Writes ``--images`` JPEGs of ``--size`` (default 500x375, quality 90: photo-like content with
smooth gradients, shapes and sensor noise, ~60-80 KB each) to a temporary folder, then times,
interleaved round by round (median reported):

- ``model-only``: ``clipforge.inference.encode_images`` on the same images, decoded and
  preprocessed beforehand (the ceiling the pipeline can reach);
- ``pipeline wN``: ``clipforge.search.embed.embed_images`` (what ``clipforge embed`` runs) on the
  folder with N decoding worker processes: listing, JPEG decode, resize/crop/normalise in the
  workers, the model in the main process, order-preserving shards and metadata written.

Same model (random weights, ``optimize_for_inference``), batch size and torch threads for both.
Also printed: decode+preprocess cost per image in one process, to explain the ratio: on a
machine with C cores, decoding takes CPU time the model would otherwise use, so the best
possible ratio is about ``model_cpu / (model_cpu + decode_cpu)`` per image.

Issue 6 target: pipeline >= 85% of model-only throughput.

    python benchmarks/embed_pipeline.py --against clip-retrieval --workers 1 --rounds 2

runs ``clipforge embed`` against ``clip-retrieval inference`` instead (real photos and icons, same
random weights through a local hub cache, clip-retrieval in its own venv): see embed_real.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from clipforge.inference import encode_images, optimize_for_inference
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config
from clipforge.search.embed import _ImageDataset, embed_images, list_items
from clipforge.transforms import image_transform


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A JPEG-compressible stand-in for a photo: gradient sky/ground, blurred shapes, sensor noise."""
    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    base = (top * (1 - t) + bottom * t) * np.ones((1, w, 1))
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 12)):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    noise = rng.normal(0.0, 10.0, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> float:
    """``n`` JPEGs in ``folder``; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        photo_like(rng, size).save(path, quality=90)
        total += path.stat().st_size
    return total / n / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="ViT-B-32")
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--size", default="500x375", help="JPEG width x height")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", default="0,1,2", help="comma-separated decoding worker counts to time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", choices=("model-only", "clip-retrieval"), default="model-only",
                   help="clip-retrieval: whole `clipforge embed` vs `clip-retrieval inference` runs on real "
                   "photos and icons (benchmarks/embed_real.py; --workers takes one number)")  # fmt: skip
    p.add_argument("--venv", default="~/.cache/clipforge-bench/clip-retrieval-venv")
    p.add_argument("--photo-repeat", type=int, default=3, help="list each photo this many times")
    p.add_argument("--icons", type=int, default=250, help="96x96 icons (plus every 512x512 one)")
    p.add_argument("--cf-decode-threads", type=int, default=None,
                   help="clipforge embed --decode-threads (default: clipforge's default)")  # fmt: skip
    p.add_argument("--cf-variant", action="append", default=[], metavar="OPTIONS",
                   help="also time `clipforge embed OPTIONS` in the same rounds, e.g. "
                   "--cf-variant=--fast-decode --cf-variant='--precision bf16' (repeatable)")  # fmt: skip
    p.add_argument("--sets", default="photos,icons", help="which collections: photos, icons or both")
    p.add_argument("--cr-workers", type=int, default=None,
                   help="clip-retrieval's --num_prepro_workers (default: --workers)")  # fmt: skip
    args = p.parse_args()
    if args.against == "clip-retrieval":
        from embed_real import compare

        args.workers = int(args.workers.split(",")[-1])
        compare(args)
        return

    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="clipforge-embed-bench-"))
    try:
        folder = tmp / "images"
        folder.mkdir()
        kb = write_jpegs(folder, args.images, size)
        print(
            f"torch {torch.__version__}, threads={torch.get_num_threads()}, cpu cores={os.cpu_count()}, "
            f"{args.images} JPEGs {size[0]}x{size[1]} (mean {kb:.0f} KB), batch {args.batch_size}, "
            f"median of {args.rounds} interleaved rounds; load average before: {os.getloadavg()[0]:.2f}"
        )
        for name in args.models.split(","):
            run_model(name, folder, tmp, args, workers)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_model(name: str, folder: Path, tmp: Path, args: argparse.Namespace, workers: list[int]) -> None:
    torch.manual_seed(0)
    model = optimize_for_inference(CLIP(get_model_config(name)))
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    items = list_items(folder)
    dataset = _ImageDataset(items, preprocess, None)

    start = time.perf_counter()
    pixels = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    decode_ms = (time.perf_counter() - start) / len(dataset) * 1e3

    runs = {"model-only": lambda: encode_images(model, pixels, batch_size=args.batch_size)}
    outputs: dict[str, np.ndarray] = {}
    for w in workers:

        def pipeline(w: int = w) -> None:
            out = tmp / f"emb-{name}-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            embed_images(model, preprocess, folder, out, batch_size=args.batch_size, num_workers=w,
                         dtype=np.float32, progress=False)  # fmt: skip
            outputs[f"w{w}"] = np.load(out / "img_emb_00000.npy")

        runs[f"pipeline w{w}"] = pipeline

    times: dict[str, list[float]] = {k: [] for k in runs}
    runs["model-only"]()  # warm-up (allocator, oneDNN primitives)
    for _ in range(args.rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)

    reference = encode_images(model, pixels, batch_size=args.batch_size).numpy()
    model_rate = args.images / statistics.median(times["model-only"])
    model_cpu_ms = 1e3 / model_rate * args.threads
    print(f"\n{name}: decode+preprocess {decode_ms:.1f} ms/image in one process; "
          f"model {model_cpu_ms:.0f} core-ms/image -> best possible pipeline ratio on "
          f"{args.threads} busy cores ~{model_cpu_ms / (model_cpu_ms + decode_ms):.0%}")  # fmt: skip
    print(f"  {'run':14s} {'images/s':>9s} {'vs model-only':>14s} {'max|diff| vs model-only':>24s}")
    for key, ts in times.items():
        rate = args.images / statistics.median(ts)
        diff = ""
        if key != "model-only":
            got = outputs[key.split()[-1]]
            same_order = got.shape == reference.shape
            diff = f"{np.abs(got - reference).max():.1e}" if same_order else "row count differs"
        print(f"  {key:14s} {rate:9.2f} {rate / model_rate:13.0%} {diff:>24s}")


if __name__ == "__main__":
    main()
