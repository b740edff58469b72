"""Real-image mode of ``train_throughput.py``: Adwaita's PNG icons, wall time and held-out recall.

    python benchmarks/train_throughput.py --real icons --image-size 64 --epochs 10 --seeds 0 1 2 --rounds 1
    python benchmarks/train_throughput.py --real icons --image-size 64 --epochs 10 --no-cache-too

Data (Debian's ``adwaita-icon-theme``; captions are the icons' names, ``tests/realdata.concept``):

- train: every PNG of Adwaita's ``512x512`` and ``256x256`` (large RGBA clip-art) and
  ``48x48/legacy`` (colour icons), plus the PNG artwork of ``/usr/share/backgrounds`` (7-8
  images, 2-4k pixels a side, from ukui-wallpapers), about 416 files of which ~85 are over 500 px
  (the ``96x96`` icons are black symbolic shapes: nothing is left of them once alpha is dropped);
- held out: ``24x24/legacy`` (321 icons), the same concepts drawn again at another size (new
  images, no training image among them). That is every distinct concept the theme draws in
  colour at a size not trained on (16 and 32 px hold 52 of the same concepts again), so
  noise is reduced with seeds instead: ``--seeds`` trains both tools once per seed and reports
  mean ± sd over the seeds and the per-seed (paired) difference.

The recipe is the same for both trainers, checked or set item by item:

- architecture: the registry entry with ``--image-size``, given to open_clip as a ``local-dir:``
  config;
- initial weights: one random initialisation per seed in open_clip's layout, stored as
  ``open_clip_model.safetensors`` inside the ``local-dir:`` folder (open_clip ignores
  ``--pretrained`` for such models) and given to clipforge as ``--pretrained``; before training,
  both starting models' features are compared and the benchmark stops if they differ
  (:func:`check_same_start`). Until this check existed open_clip silently trained from its own
  initialisation, which learns faster at this size: that, not the data pipeline, was the
  held-out recall gap measured earlier;
- optimiser: AdamW, lr, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 with open_clip_train's
  exemptions (clipforge ``--weight-decay-groups open_clip``: embedding tables decayed, 1-D
  tensors and logit_scale not); cosine schedule with the same linear warm-up formula, stepped
  per optimiser step; fp32; no gradient clipping; logit scale clamped to ln(100) after every
  step (both); batch 64 with the last partial batch dropped (6 steps an epoch);
- pixels: RandomResizedCrop(scale 0.9-1, ratio 3/4-4/3, bicubic), then alpha dropped with PIL's
  ``convert("RGB")`` and CLIP's mean/std (weights in open_clip's layout get open_clip's
  preprocessing in clipforge; clipforge's own default composites transparent pixels on white);
- what is not the same: the data order and augmentation draws (each tool's own seeded RNG from
  the same seed; hence several seeds), fused vs foreach AdamW kernels (same arithmetic), and with
  ``--cache-images`` the resampling of images larger than the cached side (reduced once, then
  cropped; ``clipforge.data.cache``; smaller images give bit-identical items).

clipforge adds ``--cache-images``: its wall time includes building the cache.

Reported: wall time of each whole process (start-up, cache build, every epoch, checkpoint
writing), steady-state samples/s, and held-out R@1/5/10 and mean rank in both directions of
every final model, computed by one piece of code (clipforge's retrieval metrics, each model with
its own preprocessing).
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


def model_files(args, root: Path) -> tuple[Path, dict, object]:
    """The architecture as a clipforge JSON file, as open_clip's ``open_clip_config.json`` content, and its config."""
    from dataclasses import replace

    from clipforge.checkpoints.open_clip_config import config_to_open_clip
    from clipforge.model.registry import get_model_config

    cfg = get_model_config(args.model)
    if args.image_size:
        cfg = replace(cfg, vision=replace(cfg.vision, image_size=args.image_size))
    arch = root / "arch.json"
    arch.write_text(json.dumps(cfg.to_dict()))
    oc = {"model_cfg": config_to_open_clip(cfg), "preprocess_cfg": {"size": cfg.vision.image_size}}
    return arch, oc, cfg


def seed_start(cfg, oc: dict, root: Path, seed: int) -> Path:
    """A ``local-dir:`` folder for open_clip holding the config and seed ``seed``'s initial weights.

    Why the weights live in the folder: open_clip ignores ``--pretrained`` for ``local-dir:``
    models (it logs a warning and looks for ``open_clip_model.safetensors`` in the folder), so a
    ``--pretrained`` file alone leaves open_clip at its own random initialisation while clipforge
    starts from the file. clipforge gets the same file as ``--pretrained``.
    """
    folder = root / f"open_clip_model-{seed}"
    folder.mkdir(exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(oc))
    _initial_weights(cfg, folder / "open_clip_model.safetensors", seed)
    return folder


def _initial_weights(cfg, path: Path, seed: int) -> None:
    """One random initialisation (``torch.manual_seed(seed)``) in open_clip's layout, the
    starting point of both trainers for that seed: the libraries initialise some layers
    differently (open_clip leaves its ViT at PyTorch's defaults), which at this size changes how
    fast a run learns more than any data pipeline does."""
    import torch

    from clipforge.checkpoints.convert import save_open_clip
    from clipforge.model.clip import CLIP

    torch.manual_seed(seed)
    save_open_clip(CLIP(cfg), path)


def check_same_start(arch: Path, oc_dir: Path) -> float:
    """Largest feature difference between the two trainers' starting models on random inputs;
    stops the benchmark when they do not start from the same weights (the recipe would differ)."""
    import open_clip
    import torch

    from clipforge.checkpoints.load import load_checkpoint
    from clipforge.factory import create_model

    ours = create_model(str(arch))
    load_checkpoint(ours, str(oc_dir / "open_clip_model.safetensors"))
    theirs = open_clip.create_model(f"local-dir:{oc_dir}")
    size = ours.preprocess_cfg.size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *size, generator=gen)
    tokens = open_clip.get_tokenizer(f"local-dir:{oc_dir}")(["folder pictures", "user trash"])
    with torch.no_grad():
        diff = max(
            (ours.encode_image(images) - theirs.encode_image(images)).abs().max().item(),
            (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max().item(),
        )
    if diff > 1e-4:
        raise SystemExit(
            f"clipforge and open_clip do not start from the same model ({oc_dir}): features differ by {diff:.3g}"
        )
    return diff


#: Reported held-out keys: CLIP_benchmark's recall (both directions) and clipforge's mean rank,
#: which moves with every query's rank, not only with those crossing K (less noisy on 321 pairs).
METRICS = tuple(
    f"{d}_retrieval_{m}"
    for d in ("image", "text")
    for m in ("recall@1", "recall@5", "recall@10", "mean_rank")
)


def heldout_recall(arch: Path, checkpoint: Path, table: Path, convention: str) -> dict[str, float]:
    """:data:`METRICS` on the held-out icons, the same code for both trainers' models."""
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
    return {k: float(m[k]) for k in METRICS}


def _train_one(args, name: str, train: Path, out: Path, oc_dir: Path) -> tuple[list[float], Path]:
    """One training run of ``name`` (clipforge, clipforge-nocache or open_clip): step times, final checkpoint."""
    from train_throughput import run_clipforge, run_open_clip

    if name.startswith("clipforge"):
        cache = ("--cache-images",) if name == "clipforge" else ()
        init = oc_dir / "open_clip_model.safetensors"
        times, _ = run_clipforge(
            args, train, out, (*cache, "--pretrained", str(init), "--save-every-epochs", "0")
        )
        return times, out / "final"
    times, _ = run_open_clip(args, train, out, oc_dir)
    return times, out / "bench" / "checkpoints" / f"epoch_{args.epochs}.pt"


def real_icons_main(args) -> None:
    from train_throughput import steady

    root = Path(tempfile.mkdtemp(prefix="clipforge-bench-real-"))
    train, held = icon_tables(root)
    arch, oc, cfg = model_files(args, root)
    n = sum(1 for _ in open(train)) - 1
    args.model = str(arch)
    seeds = list(args.seeds)
    print(
        f"real icons: {n} train PNGs, {sum(1 for _ in open(held)) - 1} held out; model {arch.name} "
        f"({args.image_size or 'registry'} px), batch {args.batch_size}, {args.epochs} epochs, "
        f"{args.threads} threads, {args.workers} worker(s); seeds {seeds} x {args.rounds} alternating round(s)"
    )
    names = ["clipforge", "open_clip"] + (["clipforge-nocache"] if args.no_cache_too else [])
    runs: list[dict] = []
    for r, (seed, rep) in enumerate((s, k) for s in seeds for k in range(args.rounds)):
        oc_dir = root / f"open_clip_model-{seed}"
        if not oc_dir.exists():
            oc_dir = seed_start(cfg, oc, root, seed)
            print(
                f"  seed {seed}: both trainers start from {oc_dir.name} (features agree to {check_same_start(arch, oc_dir):.1e})"
            )
        args.seed = seed
        for name in names[::-1] if r % 2 else names:
            out = root / f"{name}-{seed}-{rep}"
            out.mkdir()
            t0 = time.perf_counter()
            times, ckpt = _train_one(args, name, train, out, oc_dir)
            wall = time.perf_counter() - t0
            run = {
                "name": name,
                "seed": seed,
                "round": rep,
                "wall_s": wall,
                "steady_sps": args.batch_size / steady(times, args.skip),
            }
            run["heldout"] = heldout_recall(arch, ckpt, held, "open_clip")
            runs.append(run)
            short = {k.replace("_retrieval_", " "): round(v, 3) for k, v in run["heldout"].items()}
            print(
                f"  seed {seed} round {rep + 1} {name:<17} wall {wall:6.1f} s  steady {run['steady_sps']:7.1f} samples/s  {short}",
                flush=True,
            )
    _report(runs, names)
    if args.json:
        from clipforge.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"args": vars(args), "runs": runs}, indent=1, default=str))


def _spread(values: list[float]) -> str:
    """``mean ± sample standard deviation`` (± 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _report(runs: list[dict], names: list[str]) -> None:
    """Wall time (best and median), steady rate, and every held-out metric as mean ± spread over
    the runs, plus each clipforge variant minus open_clip paired by seed and round."""
    by = {n: [r for r in runs if r["name"] == n] for n in names}
    print()
    for name, rs in by.items():
        walls = [r["wall_s"] for r in rs]
        print(
            f"{name:<17} wall {min(walls):6.1f} s best, {statistics.median(walls):6.1f} s median of {len(walls)}; "
            f"steady {max(r['steady_sps'] for r in rs):7.1f} samples/s"
        )
    best = {n: min(r["wall_s"] for r in rs) for n, rs in by.items()}
    med = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in by.items()}
    rate = {n: max(r["steady_sps"] for r in rs) for n, rs in by.items()}
    print(
        f"wall-time ratio open_clip / clipforge: {best['open_clip'] / best['clipforge']:.2f}x best, "
        f"{med['open_clip'] / med['clipforge']:.2f}x median (target >= 2x); "
        f"steady samples/s ratio {rate['clipforge'] / rate['open_clip']:.2f}x"
    )
    if "clipforge-nocache" in by:
        print(
            f"wall-time ratio clipforge without the cache / with it: {best['clipforge-nocache'] / best['clipforge']:.2f}x"
        )
    print(
        f"\nheld-out ({len(by['open_clip'])} run(s) each): mean ± sd over runs; diff = variant - open_clip, paired"
    )
    header = "".join(f"{n:>19}" for n in names) + "".join(
        f"{'diff ' + n:>26}" for n in names if n != "open_clip"
    )
    print(f"  {'metric':<28}{header}")
    for key in METRICS:
        vals = {n: [r["heldout"][key] for r in rs] for n, rs in by.items()}
        row = "".join(f"{_spread(vals[n]):>19}" for n in names)
        for n in names:
            if n != "open_clip":
                row += f"{_spread([a - b for a, b in zip(vals[n], vals['open_clip'])]):>26}"
        print(f"  {key:<28}{row}")
