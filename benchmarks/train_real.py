"""Real-image mode of ``train_throughput.py``: Adwaita's PNG icons, wall time and held-out recall.

    python benchmarks/train_throughput.py --real icons --image-size 64 --epochs 10 --batch-size 64

Data (Debian's ``adwaita-icon-theme``; captions are the icons' names, ``tests/realdata.concept``):

- train: every PNG of Adwaita's ``512x512`` and ``256x256`` (large RGBA clip-art) and
  ``48x48/legacy`` (colour icons), plus the PNG artwork of ``/usr/share/backgrounds`` (8 images,
  2-4k pixels a side, from ukui-wallpapers), about 420 files of which ~85 are over 500 px (the
  ``96x96`` icons are black symbolic shapes: nothing is left of them once alpha is dropped);
- held out: ``24x24/legacy``, the same concepts drawn again at another size (new images, no
  training image among them).

Same recipe for both trainers: architecture (the registry entry with ``--image-size``, given to
open_clip as a ``local-dir:`` config), the same initial weights (one random initialisation
written in open_clip's layout and passed to both as ``--pretrained``), batch size, epochs, lr,
warm-up, weight decay, AdamW betas, seed, threads, data-loader workers, and the same pixels:
weights in open_clip's layout get open_clip's preprocessing in clipforge (alpha dropped after the
crop), so the comparison is of speed, not of preprocessing (clipforge's own default composites
transparent pixels on white instead). clipforge adds ``--cache-images``: its wall time includes
building the cache.

Reported: wall time of each whole process (start-up, cache build, every epoch, checkpoint
writing), steady-state samples/s, and held-out recall of both final models computed by one piece
of code (clipforge's retrieval metrics, each model with its own preprocessing).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ICON_ROOT = Path("/usr/share/icons/Adwaita")


def _concept(path: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from realdata import concept

    return concept(path)


def icon_tables(root: Path) -> tuple[Path, Path]:
    """(train table, held-out table) with absolute paths (both trainers read them as they are)."""
    train = [
        p for d in ("512x512", "256x256", "48x48/legacy") for p in sorted((ICON_ROOT / d).rglob("*.png"))
    ]
    train += sorted(Path("/usr/share/backgrounds").glob("*.png"))  # large PNG artwork (2-4k px)
    held = sorted((ICON_ROOT / "24x24/legacy").glob("*.png"))
    if not train or not held:
        raise SystemExit("no Adwaita icons: apt-get install adwaita-icon-theme")
    out = []
    for name, files in (("train.csv", train), ("heldout.csv", held)):
        table = root / name
        with open(table, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows([str(p), _concept(p)] for p in files)
        out.append(table)
    return out[0], out[1]


def model_files(args, root: Path) -> tuple[Path, Path]:
    """The architecture as a clipforge JSON file and as an open_clip ``local-dir:`` folder."""
    from dataclasses import replace

    from clipforge.checkpoints.open_clip_config import config_to_open_clip
    from clipforge.model.registry import get_model_config

    cfg = get_model_config(args.model)
    if args.image_size:
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=args.image_size))
    _initial_weights(cfg, root / "init.safetensors")
    arch = root / "arch.json"
    arch.write_text(json.dumps(cfg.to_dict()))
    oc_dir = root / "open_clip_model"
    oc_dir.mkdir()
    oc = {"model_cfg": config_to_open_clip(cfg), "preprocess_cfg": {"size": cfg.vision.image_size}}
    (oc_dir / "open_clip_config.json").write_text(json.dumps(oc))
    return arch, oc_dir


def _initial_weights(cfg, path: Path) -> None:
    """One random initialisation (seed 0) in open_clip's layout, the starting point of both
    trainers: the libraries initialise some layers differently (open_clip leaves its ViT at
    PyTorch's defaults), which at this size changes how fast a run learns more than any data
    pipeline does."""
    import torch

    from clipforge.checkpoints.convert import save_open_clip
    from clipforge.model.clip import CLIP

    torch.manual_seed(0)
    save_open_clip(CLIP(cfg), path)


def heldout_recall(arch: Path, checkpoint: Path, table: Path, convention: str) -> dict[str, float]:
    """R@1/R@5 both ways on the held-out icons, the same code for both trainers' models."""
    import torch

    from clipforge.checkpoints.load import load_checkpoint
    from clipforge.data.pairs import PairsDataset
    from clipforge.eval.retrieval import retrieval_metrics
    from clipforge.factory import create_model, get_tokenizer
    from clipforge.transforms import PreprocessConfig, image_transform

    model = create_model(str(arch))
    load_checkpoint(model, str(checkpoint))
    model.eval()
    size = model.preprocess_cfg.size[0]
    tf = image_transform(PreprocessConfig(image_size=size, convention=convention, alpha="drop"))
    data = PairsDataset(table, transform=tf, tokenizer=get_tokenizer(model))
    images = torch.stack([data[i][0] for i in range(len(data))])
    tokens = torch.stack([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
    m = retrieval_metrics(img, txt, torch.arange(len(data)))
    return {k: float(v) for k, v in m.items() if k.endswith(("recall@1", "recall@5"))}


def real_icons_main(args) -> None:
    from train_throughput import run_clipforge, run_open_clip, steady

    root = Path(tempfile.mkdtemp(prefix="clipforge-bench-real-"))
    train, held = icon_tables(root)
    arch, oc_dir = model_files(args, root)
    init = root / "init.safetensors"
    n = sum(1 for _ in open(train)) - 1
    args.model = str(arch)
    print(
        f"real icons: {n} train PNGs, {sum(1 for _ in open(held)) - 1} held out; model {arch.name} "
        f"({args.image_size or 'registry'} px), batch {args.batch_size}, {args.epochs} epochs, "
        f"{args.threads} threads, {args.workers} worker(s); {args.rounds} alternating round(s)"
    )
    names = ["clipforge", "open_clip"] + (["clipforge-nocache"] if args.no_cache_too else [])
    walls: dict[str, list[float]] = {k: [] for k in names}
    rates: dict[str, list[float]] = {k: [] for k in names}
    recall: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        for name in names[::-1] if r % 2 else names:
            out = root / f"{name}-{r}"
            out.mkdir()
            t0 = time.perf_counter()
            if name.startswith("clipforge"):
                cache = ("--cache-images",) if name == "clipforge" else ()
                flags = (*cache, "--pretrained", str(init), "--save-every-epochs", "0")
                times, _ = run_clipforge(args, train, out, flags)
                ckpt, convention = out / "final", "open_clip"
            else:
                times, _ = run_open_clip(args, train, out, oc_dir, ("--pretrained", str(init)))
                ckpt, convention = out / "bench" / "checkpoints" / f"epoch_{args.epochs}.pt", "open_clip"
            wall = time.perf_counter() - t0
            print(f"  round {r + 1} {name:<9} wall {wall:6.1f} s", flush=True)
            walls[name].append(wall)
            rates[name].append(args.batch_size / steady(times, args.skip))
            recall[name] = heldout_recall(arch, ckpt, held, convention)
            print(
                f"  round {r + 1} {name:<9} wall {wall:6.1f} s  steady {rates[name][-1]:7.1f} samples/s  {recall[name]}"
            )
    _report(walls, rates, recall)


def _report(walls: dict, rates: dict, recall: dict) -> None:
    print()
    for name in walls:
        print(
            f"{name:<9} wall {min(walls[name]):6.1f} s (best of {len(walls[name])})  steady {max(rates[name]):7.1f} samples/s"
        )
    wall_ratio = min(walls["open_clip"]) / min(walls["clipforge"])
    rate_ratio = max(rates["clipforge"]) / max(rates["open_clip"])
    print(
        f"wall-time ratio open_clip / clipforge: {wall_ratio:.2f}x  (target >= 2x); steady samples/s ratio {rate_ratio:.2f}x"
    )
    if "clipforge-nocache" in walls:
        print(
            f"wall-time ratio clipforge without the cache / with it: {min(walls['clipforge-nocache']) / min(walls['clipforge']):.2f}x"
        )
    for key in sorted(k for k in recall["clipforge"] if "pessimistic" not in k):
        print(f"  held-out {key:<28} " + "  ".join(f"{n} {recall[n][key]:.3f}" for n in recall))
    print(
        f"  (medians of wall: clipforge {statistics.median(walls['clipforge']):.1f} s, open_clip {statistics.median(walls['open_clip']):.1f} s)"
    )
