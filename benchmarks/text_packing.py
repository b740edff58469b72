"""Packed text encoding vs open_clip on real short captions, and zero-shot classifier building.

    python benchmarks/text_packing.py                      # ViT-B-32, 2 threads, 3 rounds
    python benchmarks/text_packing.py --classes 1000       # the full 1,000 x 80 classifier (slow on a CPU)
    python benchmarks/text_packing.py --classes 1000 --baseline-classes 100 --rounds 1 --skip-encode

Captions are real text: half the one-line descriptions of the Debian packages installed on
this machine (``/var/lib/dpkg/status``: "add and remove users and groups", "default icon theme
of GNOME"), half Adwaita icon names ("accessories calculator"); median 7 tokens, plus one long
caption (the first 30 words of a package's long description, ~40 tokens) in every 64, as a
user's batch often has.

Both libraries get the same random weights (``clipforge.bench.open_clip_twin``), 2 threads,
float32, and are timed interleaved round by round (best round reported, median in brackets).
clipforge's model is ``optimize_for_inference``'s (prepacked CPU linears, as ``clipforge embed``
and the search server use; ``zero_shot_classifier`` prepacks for its own call anyway):

- batch 64 and batch 1, 2, 4, 8 (the same 64 captions, chunked): ``open_clip.encode_text``,
  clipforge's ``encode_text`` with packing (the default) and without (``text.pack = False``,
  trimming only, as before);
- a zero-shot classifier, ``--classes`` ImageNet class names x 80 templates:
  ``open_clip.zero_shot.build_zero_shot_classifier`` vs ``clipforge.zero_shot_classifier``
  (tokenizing included on both sides). ``--baseline-classes N`` times open_clip on the first N
  classes only and scales its time by ``classes / N``: its cost is exactly linear in the classes
  (every prompt padded to 77 tokens, 10 classes per batch), while clipforge's (packing, dedup)
  is not, so clipforge always builds the whole classifier.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable

import torch

from clipforge.bench import compare_variants, open_clip_twin
from clipforge.factory import get_tokenizer
from clipforge.inference import optimize_for_inference
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config


def package_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` real captions: half package synopses, half icon names, one long description every
    64 (position 5)."""
    import glob
    from pathlib import Path

    text = open("/var/lib/dpkg/status", encoding="utf-8", errors="replace").read()
    short = sorted({m.strip() for m in re.findall(r"^Description: (.+)$", text, re.M)})
    icons = sorted({Path(p).stem.replace("-symbolic", "").replace("-", " ")
                    for p in glob.glob("/usr/share/icons/Adwaita/48x48/legacy/*.png")})  # fmt: skip
    long = [" ".join(b.split()[:30]) for b in re.findall(r"^Description: .+\n((?: .+\n){3,})", text, re.M)]
    rng = random.Random(seed)
    out = rng.sample(short, n // 2) + rng.sample(icons, n - n // 2)
    rng.shuffle(out)
    for i in range(5, n, 64):
        out[i] = rng.choice([b for b in long if len(b.split()) >= 30])
    return out


def _rows(title: str, rows: list) -> None:
    print(f"\n{title}")
    for r in rows:
        print(f"  {r.variant:22s} {r.items_per_s:9.1f}/s  {r.ratio:6.2f}x vs open_clip ({r.median_ratio:.2f}x median)  "
              f"max|diff| {r.max_abs_diff:.1e}")  # fmt: skip


def encode_cases(model: CLIP, twin, tokens: torch.Tensor, rounds: int, batches: list[int]) -> None:
    lengths = (model.text.eot_indices(tokens) + 1).tolist()
    print(f"captions: {len(lengths)}, tokens median {statistics.median(lengths):.0f}, longest {max(lengths)}")
    for batch in batches:
        chunks = [tokens[i : i + batch] for i in range(0, len(tokens), batch)]
        fns: dict[str, Callable[[], torch.Tensor]] = {
            "open_clip": lambda c=chunks: torch.cat([twin.encode_text(x) for x in c]),
            "clipforge (packed)": lambda c=chunks: torch.cat([model.encode_text(x) for x in c]),
            "clipforge (trim only)": lambda c=chunks: _unpacked(model, c),
        }
        _rows(f"batch {batch}", compare_variants(fns, len(tokens), rounds=rounds, warmup=0))


def _unpacked(model: CLIP, chunks: list[torch.Tensor]) -> torch.Tensor:
    model.text.pack = False
    try:
        return torch.cat([model.encode_text(x) for x in chunks])
    finally:
        model.text.pack = True


def zero_shot_case(model: CLIP, twin, classes: int, rounds: int, baseline_classes: int | None = None) -> None:
    """Time both classifier builders interleaved; open_clip on ``baseline_classes`` (scaled)."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    from clipforge.eval.zero_shot import zero_shot_classifier

    names = list(IMAGENET_CLASSNAMES[:classes])
    base = min(baseline_classes or len(names), len(names))
    oc_tok, cf_tok = open_clip.get_tokenizer("ViT-B-32"), get_tokenizer(model)
    fns = {
        "open_clip": lambda: build_zero_shot_classifier(
            twin,
            oc_tok,
            names[:base],
            OPENAI_IMAGENET_TEMPLATES,
            num_classes_per_batch=10,
            device="cpu",
            use_tqdm=False,
        ),
        "clipforge": lambda: zero_shot_classifier(model, cf_tok, names, "imagenet"),
    }
    scale = {"open_clip": len(names) / base, "clipforge": 1.0}
    times: dict[str, list[float]] = {k: [] for k in fns}
    out = {}
    with torch.inference_mode():
        for r in range(rounds):
            for key in list(fns)[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                out[key] = fns[key]()
                times[key].append((time.perf_counter() - t0) * scale[key])
    diff = (out["open_clip"].float() - out["clipforge"][:, :base].float()).abs().max().item()
    best = {k: min(v) for k, v in times.items()}
    print(f"\nzero-shot classifier, {len(names)} classes x {len(OPENAI_IMAGENET_TEMPLATES)} templates "
          f"({len(names) * len(OPENAI_IMAGENET_TEMPLATES)} prompts), {rounds} round(s)")  # fmt: skip
    if base < len(names):
        print(
            f"  open_clip timed on the first {base} classes, x {len(names) / base:g} (its cost is linear in classes)"
        )
    for k in fns:
        print(f"  {k:10s} {best[k]:7.2f} s (median {statistics.median(times[k]):.2f} s)")
    ratios = [a / b for a, b in zip(times["open_clip"], times["clipforge"])]
    print(f"  ratio {best['open_clip'] / best['clipforge']:.2f}x (median per round {statistics.median(ratios):.2f}x, "
          f"target >= 3x), max|diff| {diff:.1e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=20, help="ImageNet classes for the zero-shot case")
    ap.add_argument("--baseline-classes", type=int, help="time open_clip on this many classes and scale")
    ap.add_argument("--skip-zero-shot", action="store_true")
    ap.add_argument("--skip-encode", action="store_true", help="only the zero-shot classifier")
    ap.add_argument("--batches", default="64,8,4,2,1", help="comma-separated batch sizes to time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = optimize_for_inference(CLIP(get_model_config(args.model)), inplace=True)
    twin = open_clip_twin(model)
    tokens = get_tokenizer(model)(package_captions(64))
    if not args.skip_encode:
        encode_cases(model, twin, tokens, args.rounds, [int(b) for b in args.batches.split(",")])
    if not args.skip_zero_shot:
        zero_shot_case(model, twin, args.classes, args.rounds, args.baseline_classes)


if __name__ == "__main__":
    main()
