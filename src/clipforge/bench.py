"""Throughput measurement: images/s and texts/s for a model on this machine.

Numbers are only comparable inside one run, so every comparison here is *interleaved*: each
round times every variant once, in turn. Background load then slows all variants alike instead
of whichever happened to run during it. Both the fastest round (load only ever adds time, so
it is the closest to an idle machine) and the median round are reported.
"""

from __future__ import annotations

import copy
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.device import resolve_device  # (also imported from here by callers and tests)
from clipforge.errors import ConfigError

logger = logging.getLogger(__name__)

_WORDS = (
    "a an the two three small large red blue green yellow black white old young happy wooden metal "
    "dog cat man woman child bicycle car bus train boat bird horse kitchen street beach mountain "
    "table chair window door tree flower field river city park room plate pizza cake phone laptop "
    "sitting standing walking running riding holding looking eating playing parked flying next to "
    "on in under near with of at behind front top side photo picture view close-up group pair"
).split()


def realistic_captions(n: int, *, min_words: int = 5, max_words: int = 30, seed: int = 0) -> list[str]:
    """``n`` caption-like strings of uniformly random length in words (COCO/LAION-like 5-30)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


@dataclass
class Timing:
    """``items_per_s`` from the median round; ``best_items_per_s`` from the fastest one."""

    name: str
    items_per_s: float
    seconds_per_call: float
    best_items_per_s: float = 0.0


def interleaved_throughput(
    fns: dict[str, Callable[[], Any]],
    items_per_call: int,
    *,
    rounds: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Items/s of each function (median and fastest round), timed round-robin so load affects all equally.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU), so a timing
    covers the computation and not just the kernel launches.
    """
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    out = {}
    for name, times in samples.items():
        median = statistics.median(times)
        out[name] = Timing(name, items_per_call / median, median, items_per_call / min(times))
    return out


def feature_agreement(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max abs diff of L2-normalised features, min cosine similarity) between two feature sets."""
    a, b = F.normalize(ours.float(), dim=-1), F.normalize(reference.float(), dim=-1)
    return float((a - b).abs().max()), float((a * b).sum(-1).min())


@dataclass
class Comparison:
    """One variant against the first one of the same run."""

    variant: str
    items_per_s: float  # fastest round
    ratio: float  # fastest rounds
    median_items_per_s: float
    median_ratio: float
    max_abs_diff: float  # of the L2-normalised features
    min_cos: float


def compare_variants(
    fns: dict[str, Callable[[], torch.Tensor]],
    items_per_call: int,
    *,
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> list[Comparison]:
    """Run every variant once for its output, time them interleaved, and compare each with the
    first (the baseline): throughput ratios and feature agreement."""
    with torch.inference_mode():
        outputs = {name: fn().float().cpu() for name, fn in fns.items()}
        timings = interleaved_throughput(fns, items_per_call, rounds=rounds, warmup=warmup, sync=sync)
    base_name = next(iter(fns))
    base = timings[base_name]
    rows = []
    for name, t in timings.items():
        diff, cos = feature_agreement(outputs[name], outputs[base_name])
        rows.append(
            Comparison(
                name,
                t.best_items_per_s,
                t.best_items_per_s / base.best_items_per_s,
                t.items_per_s,
                t.items_per_s / base.items_per_s,
                diff,
                cos,
            )  # fmt: skip
        )
    return rows


@dataclass
class BenchRow(Comparison):
    kind: str  # "image" | "text"
    batch_size: int


def open_clip_kwargs(cfg: Any) -> dict[str, Any]:
    """``open_clip.model.CLIP`` keyword arguments describing the same architecture as ``cfg``."""
    v, t = cfg.vision, cfg.text
    vision = {
        "image_size": v.image_size, "width": v.width, "layers": v.layers, "head_width": v.head_width,
        "mlp_ratio": v.mlp_ratio, "ls_init_value": v.ls_init_value, "pool_type": v.pool_type,
        "final_ln_after_pool": v.final_ln_after_pool, "no_ln_pre": v.no_ln_pre,
    }  # fmt: skip
    if v.patch_size is not None:
        vision["patch_size"] = v.patch_size
    text = {
        "context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
        "layers": t.layers, "mlp_ratio": t.mlp_ratio, "ls_init_value": t.ls_init_value,
        "proj_bias": t.proj_bias, "pool_type": t.pool_type,
    }  # fmt: skip
    return {
        "embed_dim": cfg.embed_dim, "vision_cfg": vision, "text_cfg": text,
        "quick_gelu": cfg.quick_gelu, "init_logit_bias": cfg.init_logit_bias,
    }  # fmt: skip


def open_clip_twin(model: nn.Module) -> nn.Module | None:
    """The same architecture and weights in open_clip (when installed), for side-by-side numbers.

    open_clip is an optional, user-installed comparison point: it is imported only here.
    """
    try:
        import open_clip
    except ImportError:
        logger.warning("open_clip is not installed; skipping the side-by-side comparison")
        return None
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip

    twin = open_clip.model.CLIP(**open_clip_kwargs(model.config))
    twin.load_state_dict(clipforge_to_open_clip(model.state_dict()), strict=True)
    return twin.eval()


class OnnxTower:
    """onnxruntime session for one exported tower, callable like ``encode_image``/``encode_text``.

    Runs on the CPU execution provider (``onnxruntime`` wheels); inputs and outputs are CPU
    tensors. Token rows are trimmed to the batch's last EOT, as the PyTorch tower does.
    """

    def __init__(self, model: nn.Module, tower: str, threads: int | None, int8: bool = False) -> None:
        import onnxruntime as ort

        from clipforge.export import export_onnx

        self._tmp = tempfile.TemporaryDirectory(prefix="clipforge-onnx-")
        cpu_model = copy.deepcopy(model).cpu().float()
        paths = export_onnx(cpu_model, self._tmp.name, towers=(tower,), verify=False, int8=int8).paths
        path = paths[f"{tower}-int8" if int8 else tower]
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.tower = tower
        self.text_tower = getattr(model, "text", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tower == "text":
            from clipforge.inference import trim_tokens

            x = trim_tokens(x, self.text_tower)
        return torch.from_numpy(self.session.run(None, {self.input: x.cpu().numpy()})[0])


VARIANTS = ("clipforge", "open_clip", "int8", "bf16", "open_clip-bf16", "compile", "onnx", "onnx-int8")


def _variants(model: nn.Module, names: list[str], device: torch.device) -> dict[str, Any]:
    from clipforge.inference import optimize_for_inference

    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown bench variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if device.type != "cpu" and "int8" in names:
        raise ConfigError(
            "the int8 variant (dynamic quantisation) runs on the CPU only; drop --int8 or use --device cpu"
        )
    built: dict[str, Any] = {}
    for variant in names:
        if variant == "clipforge":
            built[variant] = optimize_for_inference(model).to(device)
        elif variant in ("open_clip", "open_clip-bf16"):
            twin = open_clip_twin(model)
            dtype = torch.bfloat16 if variant == "open_clip-bf16" else torch.float32
            built[variant] = twin.to(device, dtype) if twin is not None else None
        elif variant == "int8":
            built[variant] = optimize_for_inference(model, quantize=True)
        elif variant == "bf16":
            built[variant] = optimize_for_inference(model, dtype=torch.bfloat16).to(device)
        elif variant == "compile":
            built[variant] = optimize_for_inference(model, compile=True).to(device)
        else:
            built[variant] = variant  # onnxruntime sessions are created per tower below
    return {k: v for k, v in built.items() if v is not None}


def run_bench(
    model: nn.Module,
    *,
    variants: list[str],
    kinds: tuple[str, ...] = ("image", "text"),
    batch_size: int = 32,
    rounds: int = 5,
    threads: int | None = None,
    num_texts: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
) -> list[BenchRow]:
    """Time ``variants`` of one model side by side; the first variant is the ratio baseline.

    Images: one random batch of ``batch_size`` per call. Texts: ``num_texts`` realistic captions
    (default ``4 * batch_size``) encoded in batches of ``batch_size``; clipforge variants use
    :func:`clipforge.inference.encode_texts` (length bucketing), open_clip plain batches.
    ``device``: ``"cpu"``, ``"cuda"``, ``"auto"``; the onnx variants always run on the CPU.
    """
    from clipforge.tokenizer import Tokenizer

    if threads:
        torch.set_num_threads(threads)
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    dev = resolve_device(device)
    model = model.eval().float().cpu()
    built = _variants(model, variants, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    size = model.config.vision.image_size
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
    tokens = Tokenizer(model.config.text.context_length)(
        realistic_captions(num_texts or 4 * batch_size, seed=seed)
    )
    rows: list[BenchRow] = []
    for kind in kinds:
        if kind == "image":
            fns = {v: _image_call(m, model, images, threads) for v, m in built.items()}
            count = batch_size
        else:
            fns = {v: _text_call(m, model, tokens, batch_size, threads) for v, m in built.items()}
            count = len(tokens)
        for c in compare_variants(fns, count, rounds=rounds, sync=sync):
            rows.append(BenchRow(**asdict(c), kind=kind, batch_size=batch_size))
    return rows


def _on(m: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the variant's device (pixels also in its dtype), moved once, before timing."""
    param = next(m.parameters(), None)
    if param is None:
        return x
    return x.to(param.device, dtype=param.dtype if x.is_floating_point() else None)


def _text_call(
    m: Any, model: nn.Module, tokens: torch.Tensor, batch_size: int, threads: int | None
) -> Callable[[], torch.Tensor]:
    """One timed call encoding every token row with variant ``m`` (a module, or an onnx variant's name)."""
    from clipforge.inference import encode_texts

    if m in ("onnx", "onnx-int8"):
        tower = OnnxTower(model, "text", threads, int8=m == "onnx-int8")
        return lambda: torch.cat(
            [tower(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
        )
    if getattr(m, "text", None) is not None and hasattr(m.text, "trim"):  # clipforge: length bucketing
        return lambda: encode_texts(m, tokens, batch_size=batch_size, normalize=False)
    chunks = [_on(m, tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
    return lambda: torch.cat([m.encode_text(c) for c in chunks])


def _image_call(
    m: Any, model: nn.Module, images: torch.Tensor, threads: int | None
) -> Callable[[], torch.Tensor]:
    """One timed call encoding the image batch with variant ``m``."""
    if m in ("onnx", "onnx-int8"):
        tower = OnnxTower(model, "image", threads, int8=m == "onnx-int8")
        return lambda: tower(images)
    inputs = _on(m, images)
    return lambda: m.encode_image(inputs)


def describe_device(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H100 ...)`` for the table header."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def format_rows(rows: list[BenchRow], baseline: str) -> str:
    lines = [
        f"{'kind':5s}  {'variant':14s}  {'batch':>5s}  {'items/s':>9s}  {'vs ' + baseline:>14s}  "
        f"{'(median)':>8s}  {'max|diff|':>9s}  {'min cos':>8s}"
    ]
    for r in rows:
        lines.append(
            f"{r.kind:5s}  {r.variant:14s}  {r.batch_size:5d}  {r.items_per_s:9.1f}  {r.ratio:13.2f}x  "
            f"{r.median_ratio:7.2f}x  {r.max_abs_diff:9.2e}  {r.min_cos:8.5f}"
        )
    return "\n".join(lines)
