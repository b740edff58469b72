"""Export the image and text towers to ONNX (or a ``torch.export`` program), verified on the way out.

Each tower becomes its own graph, ``image.onnx`` (input ``images [batch, 3, H, W]``) and
``text.onnx`` (input ``tokens [batch, length]``, int64), both returning un-normalised features
``[batch, embed_dim]``. Batch is dynamic for both; text length is dynamic too, so callers can
trim token rows to their longest caption (:func:`clipforge.inference.trim_tokens`) and keep the
speed-up the PyTorch text tower gets. After writing, every graph is run with onnxruntime on
fresh inputs of other sizes and compared with PyTorch; a mismatch raises instead of leaving a
silently wrong file behind.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from clipforge.errors import ClipforgeError, ConfigError

logger = logging.getLogger(__name__)

TOWERS = ("image", "text")


class ExportError(ClipforgeError):
    """An exported graph could not be written or does not reproduce the PyTorch outputs."""


class ImageEncoder(nn.Module):
    """``images -> encode_image(images)`` as a stand-alone module (what gets exported)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


class TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(tokens)


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


def _float32_eval(model: nn.Module) -> nn.Module:
    """The model in eval mode with float32 weights; a copy when it has others (the caller's stays bf16)."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    return model.eval()


def _wrapper(model: nn.Module, tower: str) -> nn.Module:
    if tower not in TOWERS:
        raise ConfigError(f"unknown tower {tower!r}; choose from {', '.join(TOWERS)}")
    module = ImageEncoder(model) if tower == "image" else TextEncoder(model)
    return module.eval()


def _export_onnx_file(
    module: nn.Module, tower: str, example: torch.Tensor, path: Path, opset: int, dynamo: bool
) -> None:
    name = "images" if tower == "image" else "tokens"
    axes = {0: "batch"} if tower == "image" else {0: "batch", 1: "length"}
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constant here
        if dynamo:
            dims = {i: torch.export.Dim(label, min=1) for i, label in axes.items()}
            torch.onnx.export(
                module, (example,), tmp, dynamo=True, dynamic_shapes=(dims,),
                input_names=[name], output_names=["features"], opset_version=max(opset, 18),
            )  # fmt: skip
        else:
            torch.onnx.export(
                module, (example,), tmp, dynamo=False, dynamic_axes={name: axes, "features": {0: "batch"}},
                input_names=[name], output_names=["features"], opset_version=opset,
            )  # fmt: skip
    os.replace(tmp, path)
    data = tmp.with_name(tmp.name + ".data")  # large models keep weights in a side file
    if data.exists():
        os.replace(data, path.with_name(path.name + ".data"))


def verify_onnx(model: nn.Module, path: str | Path, tower: str, *, atol: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| on inputs of a different batch (and text length) than traced."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = _wrapper(model, tower)
    checks = [example_inputs(model, tower, batch=3, seed=1)]
    if tower == "text":
        checks.append(
            example_inputs(model, tower, batch=1, length=min(9, model.config.text.context_length), seed=2)
        )
    worst = 0.0
    input_name = session.get_inputs()[0].name
    for inputs in checks:
        with torch.inference_mode():
            expected = module(inputs).float().numpy()
        got = session.run(None, {input_name: inputs.numpy()})[0]
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
    tmp = path.with_name(f".{out.name}.tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime logs pre-processing advice on the root logger
    try:
        quantize_dynamic(
            str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
    finally:
        root.setLevel(level)
    os.replace(tmp, out)
    return out


def verify_onnx_int8(model: nn.Module, path: str | Path, tower: str, *, min_cos: float = 0.99) -> float:
    """Min cosine similarity between a quantised graph's features and PyTorch float32 features."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = example_inputs(model, tower, batch=3, seed=1)
    with torch.inference_mode():
        expected = _wrapper(model, tower)(inputs).float()
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])
    cos = float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min())
    if cos < min_cos:
        raise ExportError(f"{path}: int8 features have cosine similarity {cos:.4f} to float32 (< {min_cos})")
    return cos


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
    """Write ``image.onnx`` / ``text.onnx`` into ``out_dir`` and (by default) verify them.

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
        module = _wrapper(model, tower)
        logger.debug("exporting the %s tower to %s", tower, path)
        try:
            _export_onnx_file(module, tower, example_inputs(model, tower), path, opset, dynamo)
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
    """Save ``torch.export`` programs (``image.pt2`` / ``text.pt2``) with dynamic batch/length."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _float32_eval(model)
    result = ExportResult()
    for tower in towers:
        module = _wrapper(model, tower)
        example = example_inputs(model, tower)
        dims = {0: torch.export.Dim("batch", min=1)}
        if tower == "text":
            dims[1] = torch.export.Dim("length", min=2, max=model.config.text.context_length)
        with torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes=(dims,))
        path = out / f"{tower}.pt2"
        tmp = path.with_name(f".tmp.{path.name}")  # torch.export wants the .pt2 suffix
        torch.export.save(program, tmp)
        os.replace(tmp, path)
        result.paths[tower] = path
    return result
