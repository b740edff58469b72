"""clipforge vs open_clip inference throughput, side by side, same weights, inputs and threads.

    python benchmarks/inference.py                  # --quick (default): ViT-B-32 + RN50, batch 1 and 32
    python benchmarks/inference.py --full           # + ViT-B-16, batch 256, more captions and rounds
    python benchmarks/inference.py --threads 2 --models ViT-B-32 --batches 32 --no-memory
    python benchmarks/inference.py --zoo --no-onnx  # + ViT-B-16-SigLIP and convnext_base_w (timm towers)

Every figure is a ratio against open_clip measured in the same process: the variants are timed
round-robin (``clipforge.bench.compare_variants``) so machine load hits all of them alike.
items/s and the ratio come from each variant's fastest round (load only adds time); the ratio
of the median rounds is printed beside it. Weights are random (seeded); open_clip gets the very same
tensors through ``clipforge_to_open_clip``, so outputs are compared too (max |diff| of the
normalised features, min cosine similarity).

Texts: realistic captions of 5-30 words. open_clip encodes them in plain batches (77 tokens
each); ``clipforge`` uses ``encode_texts`` (length buckets + trimming to each batch's longest
caption); ``clipforge-nobucket`` trims but keeps the input order; ``onnx`` trims only.
Images: ``clipforge`` is the model as built; ``clipforge-opt`` adds ``optimize_for_inference``
(BatchNorm folding + channels-last for ResNets, float32, identical outputs); ``int8`` is dynamic
int8 quantisation of linear layers; ``onnx`` is ONNX Runtime (float32) with the same threads,
``onnx-int8`` the same graph with onnxruntime's dynamic int8 quantisation.
Peak memory: extra resident memory (VmHWM after minus VmRSS before, Linux) of one forward pass,
each library (open_clip, clipforge with ``optimize_for_inference``, ONNX Runtime) in its own
subprocess, weights already loaded.

Model-zoo families (issue 11): ``--zoo`` adds ViT-B-16-SigLIP (timm MAP-pooled ViT, bidirectional
text tower) and convnext_base_w (timm ConvNeXt) at real size. Their open_clip twin is
``open_clip.create_model(name)`` given clipforge's weights (open_clip's own layout for the
config). SigLIP's T5 tokenizer lives on the hub, so its captions are token rows of the same
lengths as the CLIP-tokenized captions: random ids, EOS and padding as its tokenizer writes them.

Targets (issue 6, CPU, 2 threads, float32): texts >= 3x open_clip; images >= 1x in float32 and
>= 1.5x with a fast path at cosine >= 0.99.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import warnings
from dataclasses import asdict

import torch

from clipforge.bench import compare_variants, open_clip_twin, realistic_captions
from clipforge.inference import encode_texts, optimize_for_inference
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config
from clipforge.tokenizer import Tokenizer

warnings.filterwarnings("ignore")


ZOO = ("ViT-B-16-SigLIP", "convnext_base_w")


def model_config(name: str):
    """The registered architecture, else open_clip's config of that name (open_clip is installed
    for the comparison anyway), so zoo names work with a registry that lacks them."""
    from clipforge.errors import ConfigError

    try:
        return get_model_config(name)
    except ConfigError:
        import open_clip

        from clipforge.checkpoints.open_clip_config import config_from_open_clip

        return config_from_open_clip(open_clip.get_model_config(name), source=name)


def build(name: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(model_config(name)).eval()


def is_zoo(model: CLIP) -> bool:
    """Built by open_clip as something else than its plain CLIP class (timm or HF towers, text under ``text.``)."""
    cfg = model.config
    return bool(cfg.vision.timm_model_name or cfg.custom_text or cfg.text.hf_model_name)


def twin_for(model: CLIP, name: str):
    """open_clip's model of ``name`` holding ``model``'s weights (its plain CLIP for the classic layout)."""
    if not is_zoo(model):
        return open_clip_twin(model)
    import open_clip

    from clipforge.checkpoints.open_clip import clipforge_to_open_clip, open_clip_layout_is_custom_text

    twin = open_clip.create_model(name)
    layout = open_clip_layout_is_custom_text(model.config)
    twin.load_state_dict(clipforge_to_open_clip(model.state_dict(), custom_text=layout), strict=True)
    return twin.eval()


def caption_tokens(model: CLIP, n: int, seed: int) -> torch.Tensor:
    """CLIP-tokenized realistic captions; for a Hugging Face tokenizer (SigLIP's T5, offline here)
    rows of the same lengths: random ids, then EOS (1), padded with 1 to the context, as T5 writes them."""
    captions = realistic_captions(n, seed=seed)
    text = model.config.text
    if not text.hf_tokenizer_name:
        return Tokenizer(context_length=text.context_length)(captions)
    lengths = (Tokenizer()(captions) != 0).sum(dim=1) - 1  # without SOT: words + EOS
    g = torch.Generator().manual_seed(seed)
    tokens = torch.ones(n, text.context_length, dtype=torch.long)
    for row, length in enumerate(lengths.clamp(max=text.context_length).tolist()):
        tokens[row, : length - 1] = torch.randint(2, text.vocab_size, (length - 1,), generator=g)
    return tokens


def _chunks(tokens: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return [tokens[i : i + batch] for i in range(0, len(tokens), batch)]


def image_variants(model: CLIP, twin, batch: int, want_onnx: bool, threads: int, bf16: bool = False) -> dict:
    size = model.config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    opt, int8 = optimize_for_inference(model), optimize_for_inference(model, quantize=True)
    fns = {
        "open_clip": lambda: twin.encode_image(images),
        "clipforge": lambda: model.encode_image(images),
        "clipforge-opt": lambda: opt.encode_image(images),
        "int8": lambda: int8.encode_image(images),
    }
    if bf16:  # measure, don't assume: CPUs without native bf16 units are slower with it
        half = optimize_for_inference(model).to(torch.bfloat16)
        fns["bf16"] = lambda: half.encode_image(images.to(torch.bfloat16))
    if want_onnx:
        from clipforge.bench import OnnxTower

        tower = OnnxTower(model, "image", threads)
        fns["onnx"] = lambda: tower(images)
        tower8 = OnnxTower(model, "image", threads, int8=True)
        fns["onnx-int8"] = lambda: tower8(images)
    return fns


def text_variants(model: CLIP, twin, tokens: torch.Tensor, batch: int, want_onnx: bool, threads: int) -> dict:
    chunks = _chunks(tokens, batch)
    int8 = optimize_for_inference(model, quantize=True)
    fns = {
        "open_clip": lambda: torch.cat([twin.encode_text(c) for c in chunks]),
        "clipforge": lambda: encode_texts(model, tokens, batch_size=batch, normalize=False),
        "clipforge-nobucket": lambda: encode_texts(
            model, tokens, batch_size=batch, normalize=False, bucket=False
        ),
        "int8": lambda: encode_texts(int8, tokens, batch_size=batch, normalize=False),
    }
    if want_onnx and not model.config.text.no_causal_mask:  # OnnxTower trims at the EOT: causal towers only
        from clipforge.bench import OnnxTower

        tower = OnnxTower(model, "text", threads)
        fns["onnx"] = lambda: torch.cat([tower(c) for c in chunks])
        tower8 = OnnxTower(model, "text", threads, int8=True)
        fns["onnx-int8"] = lambda: torch.cat([tower8(c) for c in chunks])
    return fns


def compare(fns: dict, items: int, rounds: int) -> list[dict]:
    """Rows against open_clip (the first variant); its output call doubles as the warm-up."""
    return [asdict(c) for c in compare_variants(fns, items, rounds=rounds, warmup=0)]


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(
        f"  {'variant':20s} {'items/s':>10s} {'vs open_clip':>13s} {'(median)':>9s} {'max|diff|':>10s} {'min cos':>9s}"
    )
    for r in rows:
        print(
            f"  {r['variant']:20s} {r['items_per_s']:10.2f} {r['ratio']:12.2f}x {r['median_ratio']:8.2f}x "
            f"{r['max_abs_diff']:10.2e} {r['min_cos']:9.5f}"
        )


# --- peak memory (child processes) -----------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child_memory(library: str, name: str, kind: str, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model = build(name)
    if library == "open_clip":
        model = twin_for(model, name)
    elif library == "clipforge":
        model = optimize_for_inference(model, inplace=True)
    elif library == "onnx":
        from clipforge.bench import OnnxTower

        tower = OnnxTower(model, kind, threads)
        del model
    size = model_config(name).vision.image_size
    if kind == "image":
        inputs = torch.randn(batch, 3, size, size)
    else:
        inputs = caption_tokens(build(name), batch, seed=3)
    gc.collect()
    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM (the peak) to the current RSS
            fh.write("5")
    except OSError:
        pass
    with torch.inference_mode():
        if library == "onnx":
            tower(inputs)
        elif kind == "image":
            model.encode_image(inputs)
        elif library == "open_clip":
            model.encode_text(inputs)
        else:
            encode_texts(model, inputs, batch_size=batch)
    print(json.dumps({"peak_extra_mib": (_status("VmHWM") - before) / 2**20}))


def peak_memory(library: str, name: str, kind: str, batch: int, threads: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--child-memory",
        library,
        name,
        kind,
        str(batch),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    if out.returncode:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="more models/batches/rounds (default is --quick)")
    p.add_argument("--quick", action="store_true", help="the default: ViT-B-32, RN50; batch 1, 32")
    p.add_argument("--models", default=None, help="comma-separated architectures")
    p.add_argument("--zoo", action="store_true", help=f"also {', '.join(ZOO)} (timm towers; in --full too)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--texts", type=int, default=None, help="captions per text measurement")
    p.add_argument("--kinds", default="image,text")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--bf16", action="store_true", help="also time a bfloat16 image tower")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="skip the throughput tables")
    p.add_argument("--json", default=None, help="also write all rows to this JSON file")
    p.add_argument(
        "--child-memory", nargs=4, metavar=("LIB", "MODEL", "KIND", "BATCH"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.child_memory:
        lib, name, kind, batch = args.child_memory
        child_memory(lib, name, kind, int(batch), args.threads)
        return

    torch.set_num_threads(args.threads)
    models = (args.models or ("ViT-B-32,ViT-B-16,RN50" if args.full else "ViT-B-32,RN50")).split(",")
    models += [m for m in ZOO if (args.zoo or args.full and not args.models) and m not in models]
    batches = [int(b) for b in (args.batches or ("1,32,256" if args.full else "1,32")).split(",")]
    rounds = args.rounds or (7 if args.full else 3)
    kinds = args.kinds.split(",")
    want_onnx = not args.no_onnx
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, {rounds} interleaved rounds, float32 CPU; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    results = []
    for name in [] if args.memory_only else models:
        model = build(name)
        twin = twin_for(model, name)
        for batch in batches:
            if "image" in kinds:
                rows = compare(
                    image_variants(model, twin, batch, want_onnx, args.threads, args.bf16), batch, rounds
                )
                print_rows(f"{name} encode_image, batch {batch}", rows)
                results.append({"model": name, "kind": "image", "batch": batch, "rows": rows})
            if "text" in kinds:
                n = args.texts or max(batch * (8 if args.full else 4), 32)
                tokens = caption_tokens(model, n, seed=batch)
                rows = compare(text_variants(model, twin, tokens, batch, want_onnx, args.threads), n, rounds)
                print_rows(f"{name} encode_text, {n} captions of 5-30 words, batch {batch}", rows)
                results.append({"model": name, "kind": "text", "batch": batch, "rows": rows})
        del model, twin
        gc.collect()
    if not args.no_memory:
        print("\npeak extra memory of one forward pass (MiB, own subprocess each)")
        for name in models:
            for kind in kinds:
                batch = max(batches)
                libs = ("open_clip", "clipforge") + (("onnx",) if want_onnx else ())
                mem = {lib: peak_memory(lib, name, kind, batch, args.threads) for lib in libs}
                print(f"  {name:10s} {kind:5s} batch {batch:4d}: "
                      + "  ".join(f"{lib} {mib:8.1f}" for lib, mib in mem.items()))  # fmt: skip
                results.append({"model": name, "kind": kind, "batch": batch, "peak_extra_mib": mem})
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
