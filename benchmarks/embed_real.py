"""``embed_pipeline.py --against clip-retrieval``: ``clipforge embed`` vs ``clip-retrieval inference``.

    python benchmarks/embed_pipeline.py --against clip-retrieval --batch-size 32 --workers 1

Both are whole command-line runs on the same folders, same model (``ViT-B-32``), batch size,
torch threads and decoding worker processes, alternating round by round:

- clip-retrieval 2.45 lives in its own virtual environment (``--venv``, default
  ``~/.cache/clipforge-bench/clip-retrieval-venv``), created by this script when missing: it pins
  numpy < 2, pyarrow < 16 and older packages that the project's environment cannot hold.
  torch and torchvision are the versions of the environment running this script.
- The weights: there is no network at run time, so the script writes one set of random weights
  (seed 0) as ``open_clip_model.safetensors`` into a private Hugging Face hub cache, under the
  repository the tag ``laion2b_s34b_b79k`` names; both programs resolve the tag offline
  (``HF_HUB_OFFLINE=1``) to that file, so they compute with identical weights.
- Folders: a real photo collection (Debian's ``ukui-wallpapers``/``gnome-backgrounds``: 2-6k pixel
  JPEG, PNG and WebP; listed ``--photo-repeat`` times through symlinks so there are enough) and
  Adwaita's PNG icons (``--icons`` of them).

images/s = images / wall time of the process; "net" is the marginal rate between a folder of
every other file (same mix of sizes and formats) and the whole folder: (n - n/2) images over the
difference of the two wall times (best round each). Start-up, model load, clip-retrieval's
warm-up and anything else paid once cancel out, so the rate is that of the pipeline itself (the
steady state); a one-image run does not measure start-up well (clip-retrieval's varies by
seconds with what its first batch triggers). Every file is read once before the first round
(warm file cache for both). "net cpu" is likewise the marginal CPU time of the whole process tree
(user + system, decoding workers included) per image: the work done per image, which a busy
machine does not inflate the way it inflates wall time. clipforge decodes each batch with
``--cf-decode-threads`` threads per worker (default: its own default, the cores divided by the
workers); ``--cr-workers`` gives clip-retrieval a different worker count (default: the same). clip-retrieval's own loop timer (its
``stats/*.json``) is printed as a cross-check. The ratio is clipforge / clip-retrieval for both. Embeddings are compared too
(max |cos - 1| between the two programs' vectors of the same image file). Each ``--cf-variant
OPTIONS`` adds ``clipforge embed OPTIONS`` to every round with its own ratio and agreement, e.g.
``--fast-decode`` (images decoded reduced to twice the model's input side) or ``--precision bf16``.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
TAG = "laion2b_s34b_b79k"
PHOTO_GLOBS = (
    "/usr/share/backgrounds/*.jpg",
    "/usr/share/backgrounds/*.png",
    "/usr/share/backgrounds/gnome/*.webp",
)


def ensure_venv(venv: Path) -> Path:
    """The clip-retrieval environment (created once): returns its ``clip-retrieval`` script."""
    exe = venv / "bin" / "clip-retrieval"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    import torch
    import torchvision

    # The torch and torchvision of this environment (a matching pair, usually in pip's cache);
    # clip-anytorch imports pkg_resources, which setuptools 81 removed.
    same = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    pins = [*same, "clip-retrieval==2.45.0", "setuptools<81"]
    print(f"creating {venv}: pip install {' '.join(pins)} (a few minutes)", flush=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *pins], check=True)
    return exe


def build_hub(root: Path) -> Path:
    """A hub cache holding random ViT-B-32 weights under the repository of the tag."""
    import torch

    from clipforge.checkpoints.convert import save_open_clip
    from clipforge.model.clip import CLIP
    from clipforge.model.registry import get_model_config

    torch.manual_seed(0)
    model = CLIP(get_model_config("ViT-B-32"))
    commit = "0" * 40
    repo = root / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_open_clip(model, snap / "open_clip_model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def folders(root: Path, photo_repeat: int, n_icons: int) -> dict[str, Path]:
    """{name: folder} of symlinks (unique names), and "{name}-half" of every other file."""
    photos = sorted(p for g in PHOTO_GLOBS for p in glob.glob(g) if os.path.getsize(p) > 1024)
    icons = sorted(glob.glob("/usr/share/icons/Adwaita/96x96/**/*.png", recursive=True))[:n_icons]
    icons += sorted(glob.glob("/usr/share/icons/Adwaita/512x512/**/*.png", recursive=True))
    if not photos or not icons:
        raise SystemExit("apt-get install gnome-backgrounds ukui-wallpapers adwaita-icon-theme")
    sets = {"photos": [p for _ in range(photo_repeat) for p in photos], "icons": icons}
    out = {}
    for name, files in sets.items():
        for variant, chosen in ((name, files), (f"{name}-half", files[::2])):
            d = root / variant
            d.mkdir()
            for i, p in enumerate(chosen):
                (d / f"{i:05d}{Path(p).suffix.lower()}").symlink_to(p)
            out[variant] = d
    return out


def env(args, hub: Path) -> dict[str, str]:
    threads = str(args.threads)
    return {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def run_clipforge(
    args, folder: Path, out: Path, hub: Path, extra: tuple[str, ...] = ()
) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "clipforge", "embed", "--model", "ViT-B-32", "--pretrained", TAG,
           "--images", str(folder), "--out", str(out), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--dtype", "float32", *extra]  # fmt: skip
    if args.cf_decode_threads is not None:
        cmd += ["--decode-threads", str(args.cf_decode_threads)]
    return _timed(cmd, env(args, hub))


def _cr_workers(args) -> int:
    return args.workers if args.cr_workers is None else args.cr_workers


def run_clip_retrieval(args, exe: Path, folder: Path, out: Path, hub: Path) -> tuple[float, float]:
    cmd = [str(exe), "inference", "--input_dataset", str(folder), "--output_folder", str(out),
           "--clip_model", f"open_clip:ViT-B-32/{TAG}", "--batch_size", str(args.batch_size),
           "--num_prepro_workers", str(_cr_workers(args)), "--enable_text", "False", "--enable_wandb", "False",
           "--clip_cache_path", str(hub)]  # fmt: skip
    # clip-retrieval's threads: torch reads OMP_NUM_THREADS at start-up like clipforge's does.
    return _timed(cmd, env(args, hub))


def _timed(cmd: list[str], environ: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and every child it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=environ, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def agreement(cf_out: Path, cr_out: Path) -> float:
    """max |cos - 1| between the two programs' embeddings of the same file."""
    import pyarrow.parquet as pq

    cf = np.concatenate([np.load(p) for p in sorted(cf_out.glob("img_emb_*.npy"))]).astype(np.float64)
    cf_names = _clipforge_names(cf_out)
    cr = np.concatenate([np.load(p) for p in sorted((cr_out / "img_emb").glob("*.npy"))]).astype(np.float64)
    table = pq.read_table(sorted((cr_out / "metadata").glob("*.parquet"))[0])
    cr_names = [str(Path(x).resolve()) for x in table["image_path"].to_pylist()]  # clipforge resolves links
    index = {n: i for i, n in enumerate(cr_names)}
    rows = [(i, index[n]) for i, n in enumerate(cf_names) if n in index]
    a = cf[[r[0] for r in rows]]
    b = cr[[r[1] for r in rows]]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.abs((a * b).sum(1) - 1).max())


def _clipforge_names(out: Path) -> list[str]:
    from clipforge.search.tables import find_table, read_table

    return [str(Path(p).resolve()) for p in read_table(find_table(out, "metadata"))["path"]]


def compare(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="clipforge-embed-vs-cr-"))
    exe = ensure_venv(Path(args.venv).expanduser())
    hub = build_hub(root / "hub")
    sets = folders(root, args.photo_repeat, args.icons)
    names = args.sets.split(",")
    if not names or set(names) - {"photos", "icons"}:
        raise SystemExit(f"--sets: photos and/or icons, got {args.sets!r}")
    for name in names:  # warm file cache: neither program pays the first read
        for f in sets[name].iterdir():
            f.read_bytes()
    threads = "default" if args.cf_decode_threads is None else args.cf_decode_threads
    print(f"clipforge embed vs clip-retrieval inference: ViT-B-32 (same random weights), batch {args.batch_size}, "
          f"{args.threads} torch threads, clipforge {args.workers} decoding worker(s) x {threads} decode thread(s), "
          f"clip-retrieval {_cr_workers(args)} worker(s), {args.rounds} alternating round(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    keys = ["clipforge", "clip-retrieval"] + [f"clipforge {v}" for v in args.cf_variant]
    for name in names:
        n = len(list(sets[name].iterdir()))
        half = len(list(sets[f"{name}-half"].iterdir()))
        walls: dict[str, list[float]] = {k: [] for k in keys}
        cpus: dict[str, list[float]] = {k: [] for k in keys}
        half_walls: dict[str, list[float]] = {k: [] for k in keys}
        half_cpus: dict[str, list[float]] = {k: [] for k in keys}
        for r in range(args.rounds):
            for key in keys if r % 2 == 0 else keys[::-1]:
                fn = _runner(key, args, exe, hub)
                slug = _slug(key)
                wall, cpu = fn(sets[f"{name}-half"], root / f"{slug}-{name}-half-{r}")
                half_walls[key].append(wall)
                half_cpus[key].append(cpu)
                wall, cpu = fn(sets[name], root / f"{slug}-{name}-{r}")
                walls[key].append(wall)
                cpus[key].append(cpu)
        halves = {k: min(v) for k, v in half_walls.items()}
        agree = {
            k: agreement(root / f"{_slug(k)}-{name}-0", root / f"clip-retrieval-{name}-0")
            for k in keys
            if k != "clip-retrieval"
        }
        net_cpu = {k: (min(v) - min(half_cpus[k])) / (n - half) for k, v in cpus.items()}
        _print_set(name, (n, half), walls, halves, agree, net_cpu)
        print(f"  clip-retrieval's own loop timer (read + inference + write, no start-up): "
              f"{_own_rate(root, name, args.rounds):.2f} images/s (best round)")  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


def _own_rate(root: Path, name: str, rounds: int) -> float:
    """images/s by clip-retrieval's stats files (its sampling loop only)."""
    best = 0.0
    for r in range(rounds):
        stats = [
            json.loads(p.read_text()) for p in (root / f"clip-retrieval-{name}-{r}" / "stats").glob("*.json")
        ]
        best = max(
            best, sum(s["sample_count"] for s in stats) / max(1e-9, sum(s["total_duration"] for s in stats))
        )
    return best


def _slug(key: str) -> str:
    """An output folder name for a program ("clipforge --precision bf16" -> "clipforge-precision-bf16")."""
    return "-".join(part.lstrip("-") for part in key.split())


def _runner(key: str, args, exe: Path, hub: Path):
    if key.startswith("clipforge"):
        extra = tuple(key.split()[1:])  # "clipforge --fast-decode": the variant's own options
        return lambda folder, out: run_clipforge(args, folder, out, hub, extra)
    return lambda folder, out: run_clip_retrieval(args, exe, folder, out, hub)


def _print_set(
    name: str, counts: tuple[int, int], walls: dict, halves: dict, max_cos_diff: dict, cpu: dict
) -> None:
    (n, half), best = counts, {k: min(v) for k, v in walls.items()}
    rate = {k: n / best[k] for k in best}
    net = {k: (n - half) / max(1e-9, best[k] - halves[k]) for k in best}
    print(f"\n{name}: {n} images, half folder {half} (load average now {os.getloadavg()[0]:.1f})")
    for k in best:
        print(f"  {k:<15} wall {best[k]:6.1f} s (median {statistics.median(walls[k]):.1f})  {rate[k]:6.2f} images/s  "
              f"half {halves[k]:5.1f} s  net {net[k]:6.2f} images/s  net cpu {cpu[k]:.3f} s/image")  # fmt: skip
    for k, diff in max_cos_diff.items():
        print(f"  ratio {k} / clip-retrieval: {rate[k] / rate['clip-retrieval']:.2f}x images/s, "
              f"{net[k] / net['clip-retrieval']:.2f}x net (target >= 1.5x); "
              f"embeddings agree: max |cos - 1| = {diff:.1e}")  # fmt: skip
        print(f"    net cpu ratio clip-retrieval / {k}: {cpu['clip-retrieval'] / cpu[k]:.2f}x "
              "(work per image; > 1: clipforge does less)")  # fmt: skip
