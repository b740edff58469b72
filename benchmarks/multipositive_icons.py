"""Multi-positive InfoNCE vs plain InfoNCE on a real captioned set with several captions per image.

    nice -n 10 python benchmarks/multipositive_icons.py                 # 48x48 icons, 4 captions each
    python benchmarks/multipositive_icons.py --steps 60 --variants name,multipos   # a quick look

Data: Debian's Adwaita PNG icons of one size (``tests/realdata.py``; ``apt-get install
adwaita-icon-theme breeze-icon-theme``). Each icon gets ``k`` = 4 distinct captions:

1. its file name (``folder-pictures.png`` -> ``folder pictures``; ``symbolic`` dropped);
2. the words reordered (``pictures folder``);
3. its category: the Adwaita folder (``actions``, ``places``, ``status`` ...; ``index.theme``
   gives each folder the same name as its ``Context``), or for Adwaita's ``legacy`` folder
   (``Context=Legacy``) the folder Breeze files the same name under (``places: folder pictures``);
4. a synonym from Breeze: Breeze ships the same freedesktop names as SVG (not decodable without
   cairosvg, so only its names are used) and links alias names to one drawing
   (``folder-image.svg -> folder-pictures.svg``); an alias that shares a word with the name and is
   not the same concept is a synonym caption (``folder image``). Icons without one get the
   reordered words with the category.

Split: by concept (the icon name without ``symbolic``: the symbolic and colour icon are one
concept), a seeded 20% of concepts held out (``--split-seed``); held-out concepts are never seen in training. The held-out set
keeps one image per concept (the colour one) so a text query has exactly one right image.

Variants, all with the same recipe (model, batch size, optimiser steps, lr, schedule, seed;
CPU): the same number of optimiser steps of the same batch size, so the same compute (a batch of
B with k captions per image holds B/k distinct images):

- ``name``: plain InfoNCE (``--loss clip``), one caption per image: the file name, always;
- ``random``: plain InfoNCE, one caption per image: a seeded random one of the k per image per
  epoch (what ``PairsDataset`` does for a multi-caption row, open_clip's choice);
- ``clip-k``: plain InfoNCE with ``--captions-per-image k``: the k captions of an image in one
  batch count as negatives of each other (the failure mode of issue 16);
- ``multipos``: ``--loss multipos --captions-per-image k``: the k captions of an image are its
  positives (mean over positives);
- ``multipos-wide``: the same with a k times larger batch, so each step holds as many distinct
  images as the one-caption variants' (k times their compute; not in the default run).

Evaluation (``clipforge.eval``, CLIP_benchmark's recall names): held-out text->image and
image->text R@1/5/10, once with the file-name caption as the one query per image, once with all k
captions (image->text is a hit when any of its captions is retrieved).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BREEZE_ROOT = "/usr/share/icons/breeze"
VARIANTS = ("name", "multipos", "random", "clip-k", "multipos-wide")


# --------------------------------------------------------------------------------------------- #
# captions
# --------------------------------------------------------------------------------------------- #
def icon_name(path: Path) -> str:
    """The freedesktop icon name: ``folder-pictures-symbolic.symbolic.png`` -> ``folder-pictures-symbolic``."""
    return path.name.split(".")[0]


def breeze_index(root: str = BREEZE_ROOT) -> tuple[dict[str, str], dict[str, set[str]]]:
    """Breeze's category per icon name and its alias names (names linked to one drawing).

    Only file names and links are read: Breeze ships SVG only and decoding SVG would need cairosvg.
    """
    category: dict[str, str] = {}
    drawings: dict[str, set[str]] = defaultdict(set)
    for context in sorted(Path(root).glob("*")):
        for svg in sorted(context.glob("*/*.svg")):
            name = svg.name[: -len(".svg")]
            category.setdefault(name, context.name)
            drawings[Path(os.path.realpath(svg)).stem].add(name)
    aliases: dict[str, set[str]] = defaultdict(set)
    for names in drawings.values():
        for name in names:
            aliases[name] |= names - {name}
    return category, aliases


def concept(path: Path) -> str:
    """The icon's concept: its name's words without ``symbolic`` (``folder pictures``).

    Not ``realdata.concept``: that keeps ``.symbolic`` of Adwaita's double suffix
    (``x-symbolic.symbolic.png`` -> ``x.symbolic``), which would put an icon's symbolic and colour
    drawings in different concepts and so leak held-out concepts into training.
    """
    return " ".join(_words(icon_name(path)))


def _words(name: str) -> list[str]:
    return [w for w in name.replace("_", "-").split("-") if w and w != "symbolic"]


def captions_for(path: Path, category: dict[str, str], aliases: dict[str, set[str]], k: int = 4) -> list[str]:
    """``k`` distinct captions of one icon: file name, reordered words, category, synonym (see module)."""
    name, words = icon_name(path), concept(path).split()
    folder = path.parent.name
    base = name.replace("-symbolic", "")  # Breeze's name of the colour drawing
    cat = category.get(name, category.get(base, folder)) if folder == "legacy" else folder
    text = " ".join(words)
    reordered = " ".join(reversed(words)) if len(words) > 1 else f"{text} icon"
    synonyms = sorted(
        " ".join(_words(a))
        for a in aliases.get(name, set()) | aliases.get(base, set())
        if set(_words(a)) & set(words) and _words(a) != words
    )
    fourth = synonyms[0] if synonyms else f"{cat}: {reordered}"
    out = list(dict.fromkeys([text, reordered, f"{cat}: {text}", fourth]))
    fillers = iter([f"{text} ({cat})", f"{cat} {reordered}", f"{text} {cat} icon"])
    while len(out) < k:
        out = list(dict.fromkeys([*out, next(fillers)]))
    return out[:k]


# --------------------------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------------------------- #
def split_by_concept(paths: list[Path], held_out: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Train images and held-out images (one per held-out concept, the colour one if there is one)."""
    by_concept: dict[str, list[Path]] = defaultdict(list)
    for p in paths:
        by_concept[concept(p)].append(p)
    names = sorted(by_concept)
    random.Random(seed).shuffle(names)
    cut = int(round(len(names) * held_out))
    test_names, train_names = sorted(names[:cut]), names[cut:]
    train = sorted(p for n in train_names for p in by_concept[n])
    test = [min(by_concept[n], key=lambda p: ("symbolic" in p.name, str(p))) for n in test_names]
    return train, test


def write_table(path: Path, rows: list[tuple[Path, list[str]]]) -> Path:
    """A JSONL table: one row per image, ``caption`` a list (several captions of one image)."""
    with path.open("w") as fh:
        for image, captions in rows:
            fh.write(json.dumps({"image": str(image), "caption": captions}) + "\n")
    return path


def build_tables(out: Path, size: str, k: int, seed: int) -> dict[str, Any]:
    """The four tables (train: all captions / file name only; held-out: all / file name)."""
    from realdata import icons

    category, aliases = breeze_index()
    train, test = split_by_concept(icons(size), 0.2, seed)
    caps = {p: captions_for(p, category, aliases, k) for p in train + test}
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "train_all": write_table(out / "train_all.jsonl", [(p, caps[p]) for p in train]),
        "train_name": write_table(out / "train_name.jsonl", [(p, caps[p][:1]) for p in train]),
        "test_all": write_table(out / "test_all.jsonl", [(p, caps[p]) for p in test]),
        "test_name": write_table(out / "test_name.jsonl", [(p, caps[p][:1]) for p in test]),
    }
    examples = {icon_name(p): caps[p] for p in (train[:3] + test[:3])}
    return {"tables": tables, "train": len(train), "test": len(test), "examples": examples}


# --------------------------------------------------------------------------------------------- #
# train and evaluate
# --------------------------------------------------------------------------------------------- #
def variant_config(variant: str, tables: dict[str, Path], args: argparse.Namespace, out: Path) -> Any:
    """The shared recipe plus what differs per variant (data table, loss, captions per image)."""
    from clipforge.train.config import TrainConfig

    differs = {
        "name": {"data": tables["train_name"]},
        "random": {"data": tables["train_all"]},
        "clip-k": {"data": tables["train_all"], "captions_per_image": args.k},
        "multipos": {"data": tables["train_all"], "captions_per_image": args.k, "loss": "multipos"},
        "multipos-wide": {
            "data": tables["train_all"],
            "captions_per_image": args.k,
            "loss": "multipos",
            "batch_size": args.batch_size * args.k,
        },
    }[variant]
    differs = {"batch_size": args.batch_size, **differs}
    return TrainConfig(
        model=args.model,
        output_dir=str(out / variant),
        max_steps=args.steps,
        epochs=10_000,  # max_steps decides
        lr=args.lr,
        warmup_steps=args.steps // 10,
        seed=args.seed,
        threads=args.threads,
        workers=0,  # the same decoding path for every variant, in this process
        device="cpu",
        progress=False,
        save_every_epochs=0,
        log_every=50,
        **{k: str(v) if isinstance(v, Path) else v for k, v in differs.items()},
    ).validate()


def evaluate_run(final_dir: str, tables: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Held-out R@1/5/10 both ways, with the file-name queries and with all k captions."""
    import clipforge
    from clipforge.eval.runner import evaluate

    model, _, preprocess = clipforge.create_model_and_transforms(pretrained=final_dir)
    model.eval()
    tokenizer = clipforge.get_tokenizer(model)
    results = {}
    for queries in ("name", "all"):
        result = evaluate(
            model, tokenizer, preprocess, str(tables[f"test_{queries}"]), task="retrieval", device="cpu"
        )
        m = result["metrics"]
        results[queries] = {
            f"{d}@{k}": 100.0 * m[f"{key}_recall@{k}"]
            for d, key in (("t2i", "image_retrieval"), ("i2t", "text_retrieval"))
            for k in (1, 5, 10)
        }
    return results


def run_variant(variant: str, tables: dict[str, Path], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from clipforge.train.trainer import train

    cfg = variant_config(variant, tables, args, out)
    t0 = time.perf_counter()
    result = train(cfg)
    row = {
        "variant": variant,
        "seed": args.seed,
        "steps": result.steps,
        "epochs": result.epochs,
        "final_loss": result.final_loss,
        "train_s": time.perf_counter() - t0,
        "eval": evaluate_run(result.final_model_dir, tables),
    }
    print(json.dumps(row), flush=True)
    return row


def format_table(rows: list[dict[str, Any]], queries: str) -> str:
    """One line per variant: mean ± standard deviation over the seeds it ran with."""
    keys = [f"{d}@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)]
    names = {"t2i": "text→image R", "i2t": "image→text R"}
    columns = [
        "variant",
        "seeds",
        "steps",
        "image epochs",
        "final loss",
        *(names[k[:3]] + k[3:] for k in keys),
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    for variant, runs in by_variant.items():
        seeds = ",".join(str(r.get("seed", "?")) for r in runs)
        cells = [variant, seeds, str(runs[0]["steps"]), str(runs[0]["epochs"])]
        cells.append(_mean_sd([r["final_loss"] for r in runs], ".2f"))
        cells += [_mean_sd([r["eval"][queries][k] for r in runs], ".1f") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float], fmt: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, fmt)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{format(mean, fmt)} ± {format(sd, fmt)}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="48x48", help="Adwaita icon size folder")
    p.add_argument(
        "--k", type=int, default=4, choices=(2, 3, 4), help="captions per image (the first k above)"
    )
    p.add_argument("--model", default="tiny-vit")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="training seed (weights, data order, augmentation)")
    p.add_argument("--split-seed", type=int, default=0, help="which concepts are held out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS[:4]), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--out", default="./runs/multipositive_icons")
    p.add_argument(
        "--report", nargs="+", metavar="RESULTS_JSON", help="only print the tables of earlier runs"
    )
    args = p.parse_args(argv)
    if args.report:  # variants run as separate processes (e.g. in parallel), one table
        runs = [json.loads(Path(f).read_text()) for f in args.report]
        rows = [{"seed": run["args"]["seed"], **r} for run in runs for r in run["rows"]]
        return print_tables(rows, runs[0]["args"]["k"])
    out = Path(args.out)
    data = build_tables(out / "data", args.size, args.k, args.split_seed)
    print(f"{args.size}: {data['train']} train images, {data['test']} held-out (concepts never seen)")
    for name, caps in data["examples"].items():
        print(f"  {name}: {caps}")
    rows = [run_variant(v, data["tables"], args, out) for v in args.variants.split(",")]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print_tables(rows, args.k)


def print_tables(rows: list[dict[str, Any]], k: int) -> None:
    for queries in ("name", "all"):
        print(
            f"\nheld-out retrieval (%), queries: {'the file-name caption' if queries == 'name' else f'all {k} captions'}"
        )
        print(format_table(rows, queries))


if __name__ == "__main__":
    main()
