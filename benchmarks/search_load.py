"""Load test of ``clipforge serve`` on 127.0.0.1: a few thousand requests at concurrency 16.

    python benchmarks/search_load.py                       # builds a 500-image tiny-vit index
    python benchmarks/search_load.py --index INDEX --requests 5000

The server runs as a separate process (``python -m clipforge serve``) so its memory is measured
alone and the client does not share its GIL. The request mix is 70% text queries, 15% queries by
indexed image id, 10% image uploads (base64 JSON) and 5% thumbnail fetches. Two rounds are run
with the same number of requests; the server's RSS is read after a warm-up, after round 1 and
after round 2 - stable memory means round 2 adds (next to) nothing. Printed: failures (any
non-200 or transport error), p50/p99 latency per request type, throughput, mean batch size of
the server's micro-batcher, RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "star",
    "left",
    "right",
    "on a white background",
    "a photo of",
    "cross",
    "diamond",
    "yellow",
]


def build_index(work: Path, n: int) -> Path:
    """Synthetic shapes -> tiny-vit (random, seeded) -> embeddings -> index; returns the index dir."""
    import torch

    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.data.synthetic import SyntheticShapes
    from clipforge.factory import create_model, create_model_and_transforms, get_tokenizer
    from clipforge.search.embed import embed_images
    from clipforge.search.index import build_index as build

    images = work / "images"
    images.mkdir(parents=True)
    ds = SyntheticShapes(n, split="val", seed=3)
    for i in range(n):
        ds.get_image(i).save(images / f"{i:05d}.png")
        (images / f"{i:05d}.txt").write_text(ds.caption_for(i))
    torch.manual_seed(0)
    save_pretrained(create_model("tiny-vit"), work / "model")
    model, _, preprocess = create_model_and_transforms("tiny-vit", pretrained=str(work / "model"))
    embed_images(
        model,
        preprocess,
        images,
        work / "emb",
        num_workers=0,
        tokenizer=get_tokenizer(model),
        model_name="tiny-vit",
        pretrained=str(work / "model"),
        progress=False,
    )
    build(work / "emb", work / "index", progress=False)
    return work / "index"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_request(rng: random.Random, count: int, uploads: list[str]) -> tuple[str, str, dict]:
    r = rng.random()
    if r < 0.70:
        text = " ".join(rng.sample(WORDS, rng.randint(1, 4)))
        return "text", "POST", {"json": {"text": text, "k": rng.choice([5, 10, 20])}}
    if r < 0.85:
        return (
            "image_id",
            "POST",
            {"json": {"image_id": rng.randrange(count), "k": 10, "dedup": rng.random() < 0.5}},
        )
    if r < 0.95:
        return "upload", "POST", {"json": {"image_base64": rng.choice(uploads), "k": 10}}
    return "thumbnail", "GET", {"url": f"/image/{rng.randrange(count)}"}


async def run_round(url: str, n: int, concurrency: int, seed: int, count: int, uploads: list[str]):
    import httpx

    rng = random.Random(seed)
    reqs = [make_request(rng, count, uploads) for _ in range(n)]
    lat: dict[str, list[float]] = {}
    failures: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                kind, method, kw = queue.get_nowait()
                t0 = time.perf_counter()
                try:
                    if method == "GET":
                        resp = await client.get(kw["url"])
                    else:
                        resp = await client.post("/search", **kw)
                    ok = resp.status_code == 200
                    if not ok:
                        failures.append(f"{kind}: HTTP {resp.status_code} {resp.text[:120]}")
                except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                    failures.append(f"{kind}: {type(e).__name__}: {e}")
                lat.setdefault(kind, []).append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    return lat, failures, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=None, help="existing index folder (default: build a tiny one)")
    ap.add_argument("--images", type=int, default=500, help="images in the generated index")
    ap.add_argument("--requests", type=int, default=3000, help="requests per round (two rounds)")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    import httpx
    import psutil
    from PIL import Image

    work = Path(tempfile.mkdtemp(prefix="clipforge-load-"))
    server = None
    try:
        t0 = time.perf_counter()
        index = Path(args.index) if args.index else build_index(work, args.images)
        print(f"index {index} ready in {time.perf_counter() - t0:.1f}s")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "clipforge", "serve", str(index), "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        "server did not start: " + server.stderr.read().decode()[-2000:]
                    ) from None
                time.sleep(0.2)
        count = health["count"]
        proc = psutil.Process(server.pid)
        uploads = []
        for seed in range(8):
            buf = io.BytesIO()
            Image.effect_noise((96, 96), 40 + seed * 10).convert("RGB").save(buf, format="JPEG")
            uploads.append(base64.b64encode(buf.getvalue()).decode())

        asyncio.run(run_round(url, 200, args.concurrency, 99, count, uploads))  # warm-up
        rss = [proc.memory_info().rss]
        rounds, cpu = [], []
        for r in range(2):
            c0 = sum(proc.cpu_times()[:2])
            rounds.append(asyncio.run(run_round(url, args.requests, args.concurrency, r, count, uploads)))
            cpu.append(sum(proc.cpu_times()[:2]) - c0)
            rss.append(proc.memory_info().rss)
        health = httpx.get(url + "/health").json()

        print(
            f"\nserver: {count} images, {health['kind']} index, model {health['model']}; "
            f"{args.requests} requests x 2 rounds at concurrency {args.concurrency}"
        )
        print(f"machine load average (1/5/15 min) at the end: {os.getloadavg()}, {os.cpu_count()} CPUs")
        for r, (lat, failures, wall) in enumerate(rounds, 1):
            allv = np.concatenate([np.array(v) for v in lat.values()])
            print(
                f"\nround {r}: {len(allv)} requests in {wall:.1f}s ({len(allv) / wall:.0f} req/s), "
                f"failures: {len(failures)}; server CPU {cpu[r - 1] / len(allv) * 1000:.1f} ms/request"
            )
            for f in failures[:10]:
                print("   ", f)
            print(f"  {'type':<10}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}")
            for kind, v in sorted(lat.items()) + [("all", list(allv))]:
                print(f"  {kind:<10}{len(v):>6}{np.percentile(v, 50):>9.1f}{np.percentile(v, 99):>9.1f}")
        mean_batch = health["batched_queries"] / max(1, health["batches"])
        print(
            f"\nmicro-batcher: {health['batched_queries']} queries in {health['batches']} batches "
            f"(mean batch {mean_batch:.2f})"
        )
        mb = [x / 2**20 for x in rss]
        print(
            f"server RSS: after warm-up {mb[0]:.1f} MiB, after round 1 {mb[1]:.1f} MiB, after round 2 "
            f"{mb[2]:.1f} MiB (round 2 growth {mb[2] - mb[1]:+.1f} MiB)"
        )
        total_fail = sum(len(f) for _, f, _ in rounds)
        print(f"\n{'PASS' if total_fail == 0 else 'FAIL'}: {total_fail} failed requests")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
