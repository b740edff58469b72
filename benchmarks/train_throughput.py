"""Training throughput: clipforge vs open_clip_train, same model, data, batch size and threads.

Both trainers run as subprocesses (``python -m clipforge train`` and
``python -m open_clip_train.main``) on one CSV of synthetic captioned images, with the same
architecture (open_clip gets it through a ``local-dir:`` config), batch size, optimiser settings,
thread count and data-loader workers. Each logs every step; the steady-state step time is the
median over the steps after the first few, so process start-up, model building and the first
(slow) iterations are not counted. Rounds alternate the two trainers so drifting machine load
hits both alike; the best round of each is reported.

    python benchmarks/train_throughput.py                   # tiny-vit, batch 64, 2 threads
    python benchmarks/train_throughput.py --model clipforge-demo --batch-size 128 --rounds 3
    python benchmarks/train_throughput.py --real icons --image-size 64 --epochs 10   # real PNGs, wall time
    python benchmarks/train_throughput.py --real icons --image-size 64 --epochs 10 --seeds 0 1 2 --rounds 1

Prints samples/s for both, the ratio, and the mean loss of the last steps of each (same steps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def open_clip_config(model: str) -> dict:
    """Our registry entry translated to open_clip's ``model_cfg`` keys (same architecture)."""
    if model == "clipforge-demo":
        from clipforge.demo import demo_model_config

        cfg = demo_model_config()
    else:
        from clipforge.model.registry import get_model_config

        cfg = get_model_config(model)
    from clipforge.checkpoints.open_clip_config import config_to_open_clip

    return {"model_cfg": config_to_open_clip(cfg), "preprocess_cfg": {"size": cfg.vision.image_size}}


def make_data(root: Path, n: int, image_size: int) -> tuple[Path, Path]:
    """One set of PNGs, two tables: paths relative to the table (clipforge) and absolute
    (open_clip_train resolves paths against its working directory)."""
    import csv

    from clipforge.data.synthetic import write_synthetic

    table = write_synthetic(root / "data", n, image_size=image_size)
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    absolute = root / "data" / "captions_abs.csv"
    with open(absolute, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[str((table.parent / r[0]).resolve()), r[1]] for r in rows[1:]])
    return table, absolute


def env(threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONUNBUFFERED": "1",
    }


def run_clipforge(
    args, table: Path, out: Path, extra: tuple[str, ...] = ()
) -> tuple[list[float], list[float]]:
    model_flag = args.model
    cmd = [
        sys.executable,
        "-c",
        "import sys, clipforge.demo as d; d._register_model(); from clipforge.cli import main; sys.exit(main())",
        "train",
        "--data",
        str(table),
        "--model",
        model_flag,
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--warmup-steps",
        str(args.warmup),
        "--weight-decay",
        "0.2",
        "--weight-decay-groups",  # open_clip_train's exemptions: it decays the embedding tables
        "open_clip",
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--seed",
        str(getattr(args, "seed", 0)),
        "--log-every",
        "1",
        "--save-every-epochs",
        "0",
        "--keep-last",
        "1",
        "--no-progress",
        "--output-dir",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env(args.threads), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"clipforge train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train" and "loss" in r]
    times = [b["time"] - a["time"] for a, b in zip(train, train[1:])]
    return times, [r["loss"] for r in train]


_LINE = re.compile(r"Batch \(t\): ([0-9.]+).*?Loss: ([0-9.]+)")


def run_open_clip(
    args, table: Path, out: Path, model_dir: Path, extra: tuple[str, ...] = ()
) -> tuple[list[float], list[float]]:
    cmd = [
        sys.executable,
        "-m",
        "open_clip_train.main",
        "--train-data",
        str(table),
        "--dataset-type",
        "csv",
        "--csv-separator",
        ",",
        "--csv-img-key",
        "image",
        "--csv-caption-key",
        "caption",
        "--model",
        f"local-dir:{model_dir}",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--wd",
        "0.2",
        "--beta1",
        "0.9",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--workers",
        str(args.workers),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--seed",
        str(getattr(args, "seed", 0)),
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--logs",
        str(out),
        "--name",
        "bench",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env(args.threads), capture_output=True, text=True, cwd=out)
    if proc.returncode:
        raise RuntimeError(f"open_clip_train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log_text = proc.stdout + proc.stderr
    log_file = out / "bench" / "out.log"
    if log_file.exists():
        log_text = log_file.read_text()
    pairs = [(float(a), float(b)) for a, b in _LINE.findall(log_text)]
    if not pairs:
        raise RuntimeError(f"no step lines in open_clip's log:\n{log_text[-2000:]}")
    return [p[0] for p in pairs[1:]], [p[1] for p in pairs]


def steady(times: list[float], skip: int) -> float:
    return statistics.median(times[skip:] if len(times) > skip + 2 else times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-vit", help="tiny-vit, tiny-rn or clipforge-demo")
    ap.add_argument("--samples", type=int, default=1920)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument(
        "--real",
        choices=("icons",),
        default=None,
        help="real images instead of synthetic ones: Adwaita's PNG icons, captioned by their names "
        "(see real_icons_main); clipforge runs with --cache-images",
    )
    ap.add_argument("--image-size", type=int, default=None, help="model image size override (e.g. 64)")
    ap.add_argument(
        "--no-cache-too", action="store_true", help="--real: also time clipforge without --cache-images"
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="--real: one run of each trainer per seed (initial weights, data order and augmentation); "
        "recall is reported as mean and spread over the runs",
    )
    ap.add_argument("--json", default=None, help="--real: also write every run's figures to this JSON file")
    args = ap.parse_args()
    if args.real:
        from train_real import real_icons_main

        real_icons_main(args)
        return

    root = Path(tempfile.mkdtemp(prefix="clipforge-bench-"))
    oc_cfg = open_clip_config(args.model)
    model_dir = root / "open_clip_model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(oc_cfg))
    table, table_abs = make_data(root, args.samples, oc_cfg["model_cfg"]["vision_cfg"]["image_size"])
    steps = args.samples // args.batch_size
    print(
        f"model {args.model}, {args.samples} samples, batch {args.batch_size} ({steps} steps), "
        f"{args.threads} threads, {args.workers} worker(s); {args.rounds} alternating rounds"
    )

    best = {"clipforge": float("inf"), "open_clip": float("inf")}
    losses: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name in ("open_clip", "clipforge") if r % 2 else ("clipforge", "open_clip"):
            out = root / f"{name}-{r}"
            out.mkdir()
            t0 = time.perf_counter()
            if name == "clipforge":
                times, loss = run_clipforge(args, table, out)
            else:
                times, loss = run_open_clip(args, table_abs, out, model_dir)
            step = steady(times, args.skip)
            best[name] = min(best[name], step)
            losses[name] = loss
            print(
                f"  round {r + 1} {name:<9} {args.batch_size / step:8.1f} samples/s "
                f"(median step {step * 1000:.0f} ms over {len(times)} steps; process {time.perf_counter() - t0:.0f}s)"
            )

    sps = {k: args.batch_size / v for k, v in best.items()}
    tail = max(1, min(5, steps // 4))
    print()
    print(
        f"clipforge  {sps['clipforge']:8.1f} samples/s   loss after {len(losses['clipforge'])} steps "
        f"{statistics.mean(losses['clipforge'][-tail:]):.4f} (mean of last {tail})"
    )
    print(
        f"open_clip  {sps['open_clip']:8.1f} samples/s   loss after {len(losses['open_clip'])} steps "
        f"{statistics.mean(losses['open_clip'][-tail:]):.4f} (mean of last {tail})"
    )
    print(f"ratio clipforge / open_clip: {sps['clipforge'] / sps['open_clip']:.2f}x  (target >= 1.3x)")


if __name__ == "__main__":
    main()
