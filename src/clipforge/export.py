"""Export the image and text towers (and a CoCa's captioning decoder) to ONNX or ``torch.export``, verified.

Each tower becomes its own graph, ``image.onnx`` (input ``images [batch, 3, H, W]``) and
``text.onnx`` (input ``tokens [batch, length]``, int64), both returning un-normalised features
``[batch, embed_dim]``. Batch is dynamic for both; text length is dynamic too, so callers can
trim token rows to their longest caption (:func:`clipforge.inference.trim_tokens`) and keep the
speed-up the PyTorch text tower gets. After writing, every graph is run with onnxruntime on
fresh inputs of other sizes and compared with PyTorch; a mismatch raises instead of leaving a
silently wrong file behind.

A CoCa has a third graph, ``decoder.onnx``: ``(image_tokens [batch, Q-1, E], tokens [batch,
length]) -> logits [batch, length, vocab]``, the next-token logits at every position of a caption
prefix (the full-prefix forward; no KV cache, so a caption of T tokens costs T runs). Its image
graph returns ``image_tokens`` as a second output, so greedy or beam search can run on ONNX
Runtime alone: encode the image once, then feed the growing prefix and read the last position.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.atomic import atomic_path, atomic_write, replace_file, staging_dir
from clipforge.errors import ClipforgeError, ConfigError

logger = logging.getLogger(__name__)

TOWERS = ("image", "text")
#: CoCa's captioning decoder: ``(image_tokens [batch, Q-1, E], tokens [batch, length]) -> logits [batch, length, vocab]``.
DECODER = "decoder"
GRAPHS = (*TOWERS, DECODER)


class ExportError(ClipforgeError):
    """An exported graph could not be written or does not reproduce the PyTorch outputs."""


def is_coca(model: nn.Module) -> bool:
    """Whether ``model`` has a captioning decoder whose graph can be exported next to the towers."""
    return callable(getattr(model, "caption_logits", None)) and callable(
        getattr(model, "encode_image_tokens", None)
    )


def towers_for(model: nn.Module) -> tuple[str, ...]:
    """Every graph ``model`` has: the two towers, plus the decoder for a CoCa."""
    return GRAPHS if is_coca(model) else TOWERS


class ImageEncoder(nn.Module):
    """``images -> encode_image(images)`` as a stand-alone module (what gets exported).

    A CoCa's image graph also returns the image tokens (its attentional pooler's other queries),
    the decoder graph's first input, so captioning needs no PyTorch.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual
        self.with_tokens = is_coca(model)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.with_tokens:
            out = self.visual.forward_tokens(images)
            return out.pooled, out.tokens
        return self.visual(images)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


class CaptionDecoder(nn.Module):
    """CoCa's full-prefix decoder: (image tokens, caption prefix) -> next-token logits at every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.caption_logits(image_tokens, tokens)


@dataclass(frozen=True)
class GraphSpec:
    """Names and dynamic axes of one exported graph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    axes: dict[str, dict[int, str]]


def graph_spec(model: nn.Module, tower: str) -> GraphSpec:
    if tower == "image":
        outputs = ("features", "image_tokens") if is_coca(model) else ("features",)
        return GraphSpec(("images",), outputs, {"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}})
    if tower == "text":
        return GraphSpec(
            ("tokens",), ("features",), {"tokens": {0: "batch", 1: "length"}, "features": {0: "batch"}}
        )
    axes = {
        "image_tokens": {0: "batch"},
        "tokens": {0: "batch", 1: "length"},
        "logits": {0: "batch", 1: "length"},
    }
    return GraphSpec(("image_tokens", "tokens"), ("logits",), axes)


@dataclass
class ExportResult:
    paths: dict[str, Path] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    min_cos: dict[str, float] = field(default_factory=dict)  # int8 graphs vs float32 PyTorch


def example_inputs(
    model: nn.Module, tower: str, batch: int = 2, length: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Random images or CLIP-like token rows (SOT, ids, EOT, padding) for tracing and checks."""
    g = torch.Generator().manual_seed(seed)
    if tower == "image":
        size = model.config.vision.image_size
        return torch.randn(batch, 3, size, size, generator=g)
    ctx = model.config.text.context_length
    length = length or ctx
    # A Hugging Face text tower's vocabulary is its own config's (text.vocab_size keeps CLIP's default)
    vocab = getattr(model.text, "vocab_size", None) or model.config.text.vocab_size
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        eot = int(torch.randint(1, length, (1,), generator=g)) if row else length - 1
        tokens[row, :eot] = torch.randint(1, max(2, vocab - 2), (eot,), generator=g)
        tokens[row, eot] = vocab - 1  # CLIP's EOT is the highest id
    return tokens


def decoder_length(model: nn.Module) -> int:
    """The longest caption prefix the decoder graph takes (text tower and decoder context, the smaller)."""
    return min(model.config.text.context_length, model.config.multimodal.context_length)


def graph_inputs(
    model: nn.Module, tower: str, batch: int = 2, length: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Every input of ``tower``'s graph; the decoder's image tokens come from random images."""
    if tower != DECODER:
        return (example_inputs(model, tower, batch, length, seed),)
    with torch.inference_mode():
        _, image_tokens = model.encode_image_tokens(example_inputs(model, "image", batch, seed=seed))
    tokens = example_inputs(model, "text", batch, length or decoder_length(model), seed)
    return image_tokens.clone(), tokens


def _float32_eval(model: nn.Module) -> nn.Module:
    """The model in eval mode with float32 weights; a copy when it has others (the caller's stays bf16)."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    return model.eval()


def _wrapper(model: nn.Module, tower: str) -> nn.Module:
    if tower not in towers_for(model):
        if tower == DECODER:
            raise ConfigError(
                f"{getattr(model, 'architecture', 'this model')} has no captioning decoder to export "
                "(only a CoCa has one); export the towers: image, text"
            )
        raise ConfigError(f"unknown tower {tower!r}; choose from {', '.join(towers_for(model))}")
    module = {"image": ImageEncoder, "text": TextEncoder, DECODER: CaptionDecoder}[tower](model)
    return module.eval()


def _dynamic_shapes(model: nn.Module, tower: str) -> tuple[dict[int, Any], ...]:
    """torch.export dimensions for each input: batch >= 1, lengths bounded by the positions the model has."""
    longest = decoder_length(model) if tower == DECODER else model.config.text.context_length
    dims = {
        "batch": torch.export.Dim("batch", min=1),
        "length": torch.export.Dim("length", min=2, max=longest),
    }
    spec = graph_spec(model, tower)
    return tuple({i: dims[label] for i, label in spec.axes[name].items()} for name in spec.inputs)


def _export_onnx_file(model: nn.Module, tower: str, path: Path, opset: int, dynamo: bool) -> None:
    """Write ``path`` (and its ``.data`` weights side file, when the exporter makes one) atomically.

    The graph is written under its final name in a private folder, then moved: a side file's
    location is recorded inside the graph by name, so it must never be exported under another one.
    """
    module, spec = _wrapper(model, tower), graph_spec(model, tower)
    example = graph_inputs(model, tower)
    names = {"input_names": list(spec.inputs), "output_names": list(spec.outputs)}
    with staging_dir(path.parent, path.name) as staging:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant here
            if dynamo:
                torch.onnx.export(
                    module, example, staging / path.name, dynamo=True, dynamic_shapes=_dynamic_shapes(model, tower),
                    opset_version=max(opset, 18), **names,
                )  # fmt: skip
            else:
                torch.onnx.export(
                    module, example, staging / path.name, dynamo=False, dynamic_axes=spec.axes,
                    opset_version=opset, **names,
                )  # fmt: skip
        data = staging / f"{path.name}.data"
        if data.exists():
            replace_file(data, path.with_name(data.name))
        replace_file(staging / path.name, path)


def _checks(model: nn.Module, tower: str) -> list[tuple[torch.Tensor, ...]]:
    """Inputs of other sizes than traced: batch 3 (and for token inputs a shorter length too)."""
    checks = [graph_inputs(model, tower, batch=3, seed=1)]
    if tower == "text":
        checks.append(
            graph_inputs(model, tower, batch=1, length=min(9, model.config.text.context_length), seed=2)
        )
    if tower == DECODER:
        checks.append(graph_inputs(model, tower, batch=1, length=min(9, decoder_length(model)), seed=2))
    return checks


def _run_both(model: nn.Module, session: Any, tower: str, inputs: tuple[torch.Tensor, ...]) -> list[tuple]:
    """(onnxruntime, PyTorch) pairs of numpy arrays, one per graph output."""
    with torch.inference_mode():
        expected = _wrapper(model, tower)(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    feed = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), inputs)}
    got = session.run(None, feed)
    return [(g, e.float().numpy()) for g, e in zip(got, expected, strict=True)]


def verify_onnx(model: nn.Module, path: str | Path, tower: str, *, atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| over every output, on inputs of other sizes than traced."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in _checks(model, tower):
        for got, expected in _run_both(model, session, tower, inputs):
            if got.shape != expected.shape:
                raise ExportError(f"{path}: onnxruntime output shape {got.shape} != PyTorch {expected.shape}")
            worst = max(worst, float(abs(got - expected).max()))
    if worst > atol:
        raise ExportError(f"{path}: onnxruntime output differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst


def quantize_onnx_int8(path: str | Path) -> Path:
    """``<name>.int8.onnx`` beside ``path``: onnxruntime dynamic int8 quantisation of its MatMuls.

    Weights become int8, activations are quantised per batch at run time. Only ``MatMul`` and
    ``Gemm`` are quantised: onnxruntime's dynamic ``ConvInteger`` is slower than its float
    convolutions on CPU, and it cannot quantise convolutions whose weights the exporter
    computed (BatchNorm folded in) rather than stored.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = path.with_name(f"{path.stem}.int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime logs pre-processing advice on the root logger
    try:
        with atomic_path(out) as tmp:
            quantize_dynamic(
                str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
            )
    finally:
        root.setLevel(level)
    return out


def verify_onnx_int8(model: nn.Module, path: str | Path, tower: str, *, min_cos: float = 0.99) -> float:
    """Min cosine similarity between a quantised graph's first output and PyTorch float32's (per row)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, expected = _run_both(model, session, tower, graph_inputs(model, tower, batch=3, seed=1))[0]
    width = expected.shape[-1]
    got_rows, want_rows = (
        torch.from_numpy(got).reshape(-1, width),
        torch.from_numpy(expected).reshape(-1, width),
    )
    cos = float(torch.nn.functional.cosine_similarity(got_rows, want_rows, dim=-1).min())
    if cos < min_cos:
        raise ExportError(f"{path}: int8 outputs have cosine similarity {cos:.4f} to float32 (< {min_cos})")
    return cos


def refuse_naflex(model: nn.Module, towers: tuple[str, ...], fixed_size: bool = False) -> None:
    """Refuse an image graph for a model whose preprocessing is NaFlex, unless ``fixed_size``.

    The exported image graph takes square ``image_size`` pixels; a NaFlex checkpoint's own
    preprocessing gives patch dicts at native aspect ratio, so the graph would not match what
    the checkpoint says its inputs are. Exporting it must be asked for (``--no-naflex``).
    """
    pre = getattr(model, "preprocess_cfg", None)
    if fixed_size or "image" not in towers or getattr(pre, "naflex_max_patches", None) is None:
        return
    size = model.config.vision.image_size
    raise ConfigError(
        f"export: this model's preprocessing is NaFlex (naflex_max_patches={pre.naflex_max_patches}, "
        f"naflex_patch_size={pre.naflex_patch_size}) and the image graph cannot take NaFlex patch dicts; "
        f"pass --no-naflex (fixed_size=True) to export the fixed-size square [batch, 3, {size}, {size}] graph, "
        "fed with the fixed-size resize instead, or --towers text"
    )


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    *,
    towers: tuple[str, ...] = TOWERS,
    opset: int = 17,
    dynamo: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    int8: bool = False,
) -> ExportResult:
    """Write ``image.onnx`` / ``text.onnx`` (and ``decoder.onnx`` when ``towers`` names it) into ``out_dir``
    and (by default) verify them against PyTorch.

    ``dynamo=False`` uses the TorchScript-based exporter (seconds); ``dynamo=True`` the
    ``torch.export``-based one (slower to export, the long-term path in PyTorch). ``int8`` also
    writes ``<tower>.int8.onnx`` (see :func:`quantize_onnx_int8`); its check is a cosine
    similarity >= 0.99 to float32 (reported in ``min_cos``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _float32_eval(model)
    result = ExportResult()
    for tower in towers:
        path = out / f"{tower}.onnx"
        _wrapper(model, tower)  # a clear ConfigError for a graph the model lacks, before exporting
        logger.debug("exporting the %s graph to %s", tower, path)
        try:
            _export_onnx_file(model, tower, path, opset, dynamo)
        except Exception as e:  # exporter errors are long; keep the first line, chain the rest
            raise ExportError(f"ONNX export of the {tower} tower failed: {str(e).splitlines()[0]}") from e
        result.paths[tower] = path
        if verify:
            result.max_abs_diff[tower] = verify_onnx(model, path, tower, atol=atol)
            logger.debug("%s: max abs diff vs PyTorch %.2e", path.name, result.max_abs_diff[tower])
        if int8:
            quantized = quantize_onnx_int8(path)
            result.paths[f"{tower}-int8"] = quantized
            if verify:
                result.min_cos[f"{tower}-int8"] = verify_onnx_int8(model, quantized, tower)
    return result


def export_program(
    model: nn.Module, out_dir: str | Path, *, towers: tuple[str, ...] = TOWERS
) -> ExportResult:
    """Save ``torch.export`` programs (``image.pt2`` / ``text.pt2`` / ``decoder.pt2``) with dynamic batch/length."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _float32_eval(model)
    result = ExportResult()
    for tower in towers:
        module = _wrapper(model, tower)
        dims = _dynamic_shapes(model, tower)
        with torch.no_grad():
            program = torch.export.export(module, graph_inputs(model, tower), dynamic_shapes=dims)
        path = out / f"{tower}.pt2"
        with atomic_write(path) as f:  # a seekable file object: torch.export needs no .pt2 name then
            torch.export.save(program, f)
        result.paths[tower] = path
    return result
