"""Fast inference: one call to prepare a model, batched encoders that keep it busy.

Every optimisation here is opt-in except the ones that cannot change results:
``inference_mode``, eval mode, BatchNorm folded into convolutions and channels-last memory for
the ResNets, and length bucketing for texts (each batch is trimmed to its own longest caption,
see ``TextTransformer``). Int8 dynamic quantisation and ``torch.compile`` are flags, and what
they change is measured by ``clipforge bench`` and ``benchmarks/inference.py``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.eval.zero_shot import model_device, model_dtype
from clipforge.model import prepack

logger = logging.getLogger(__name__)


def fuse_batchnorm(module: nn.Module) -> int:
    """Fold every ``conv -> BatchNorm`` pair of a modified ResNet into the convolution (in place).

    Inference-only: the BatchNorm becomes an ``Identity`` and the conv gains a bias, so the
    state dict no longer matches the checkpoint layout. Returns the number of pairs folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from clipforge.model.resnet import Bottleneck, ModifiedResNet

    pairs: list[tuple[nn.Module, str, str]] = []
    for sub in module.modules():
        if isinstance(sub, (ModifiedResNet, Bottleneck)):
            pairs += [(sub, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(sub, Bottleneck) and sub.downsample is not None:
            pairs.append((sub.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(parent, conv_name, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            setattr(parent, bn_name, nn.Identity())
    return len(pairs)


def quantize_linear_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of every ``nn.Linear`` (weights int8, activations per batch).

    CPU only. Matrix parameters that are not ``nn.Linear`` (``visual.proj``,
    ``text.text_projection``) and convolutions stay float32.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


def optimize_for_inference(
    model: nn.Module,
    *,
    fuse_bn: bool = True,
    channels_last: bool | None = None,
    quantize: bool = False,
    dtype: torch.dtype | None = None,
    compile: bool | str = False,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` (or the model itself with ``inplace=True``) ready to embed with.

    - eval mode, gradients off;
    - ResNet towers: BatchNorm folded into convolutions (``fuse_bn``) and channels-last
      weights/activations (``channels_last``, default on for ResNets) -- identical outputs up to
      float rounding;
    - ``quantize``: int8 dynamic quantisation of linear layers (CPU; features move slightly,
      cosine similarity to float32 is typically > 0.99 -- ``clipforge bench`` reports it);
    - ``dtype``: cast the weights (e.g. ``torch.bfloat16``; LayerNorm statistics stay float32).
      Only a gain where the hardware has native bf16 units (recent GPUs, AVX512-BF16/AMX CPUs):
      on an AVX2 CPU bf16 runs several times *slower* than float32 -- measure with
      ``clipforge bench --dtype bfloat16``. Cannot be combined with ``quantize``.
    - ``compile``: ``torch.compile`` both towers (see :func:`compile_towers`); ``True`` uses
      inductor, a string names another backend (e.g. ``"aot_eager"``).
    """
    if quantize and dtype not in (None, torch.float32):
        raise ConfigError("int8 quantisation works on float32 weights; choose quantize or dtype, not both")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    visual = getattr(model, "visual", None)
    from clipforge.model.resnet import ModifiedResNet

    if isinstance(visual, ModifiedResNet):
        if fuse_bn:
            fuse_batchnorm(visual)
        if channels_last is None or channels_last:
            visual.to(memory_format=torch.channels_last)
            visual.channels_last = True
    elif channels_last:
        raise ConfigError("channels_last only applies to ResNet image towers")
    if dtype is not None:
        model.to(dtype)
    if quantize:
        quantize_linear_int8(model)
    prepack.enable(model)
    if compile:
        compile_towers(model, backend="inductor" if compile is True else compile)
    return model


def compile_towers(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """``torch.compile`` the image tower's forward and the text tower's post-trim computation.

    Methods are compiled in place of wrapping the modules, so parameter names (and state dicts)
    are unchanged. The text tower trims outside the compiled region and compiles with dynamic
    shapes, so batches of any length share one graph instead of recompiling per length (batch
    size 1 gets its own graph: dynamo specialises sizes 0 and 1).
    """
    visual, text = getattr(model, "visual", None), getattr(model, "text", None)
    if visual is not None:
        visual.forward = torch.compile(visual.forward, dynamic=True, backend=backend)
    if text is not None:
        name = "encode_trimmed" if hasattr(text, "encode_trimmed") else "forward"
        compiled = torch.compile(getattr(text, name), dynamic=True, backend=backend)

        def fresh_tokens(tokens: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
            # The trimmed tokens are a view; dynamo guards on the size of a view's base, which
            # would recompile whenever the caller's untrimmed batch changes. A copy of a few
            # hundred integers has no base.
            return compiled(tokens.clone(), *args)

        setattr(text, name, fresh_tokens)
        if hasattr(text, "pack"):  # packed rows vary in shape per batch: keep the one compiled graph
            text.pack = False
    return model


def trim_tokens(tokens: torch.Tensor, tower: nn.Module | None = None) -> torch.Tensor:
    """Drop the columns that cannot change the pooled feature: those after the batch's last EOT
    under CLIP's causal mask. With ``tower`` given, its own ``trim_length`` decides (a
    bidirectional SigLIP-style tower reads every column, so nothing is dropped)."""
    if tokens.numel() == 0:
        return tokens
    trim_length = getattr(tower, "trim_length", None)
    if tower is not None and trim_length is None:
        return tokens  # e.g. a Hugging Face tower: its attention mask, not a cut, handles padding
    keep = trim_length(tokens) if trim_length else int(tokens.argmax(dim=-1).max()) + 1
    return tokens[:, :keep]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def encode_images(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 64, normalize: bool = True
) -> torch.Tensor:
    """Embed ``[N, 3, H, W]`` images in batches under ``inference_mode``; float32 ``[N, D]`` on CPU.

    Images are cast to the model's dtype (a bf16 model takes float32 pixels). For image *files*
    (decoding in worker processes, pinned memory, order kept) see
    :func:`clipforge.search.embed.embed_images` / ``clipforge embed``.
    """
    device, dtype = model_device(model), model_dtype(model)
    out = []
    with prepack.frozen(model), torch.inference_mode():
        for part in _batches(images.shape[0], batch_size):
            batch = images[part].to(device, dtype=dtype, non_blocking=True)
            out.append(model.encode_image(batch, normalize=normalize).float().cpu())
    return torch.cat(out) if out else torch.empty(0, getattr(model.config, "embed_dim", 0))


def encode_texts(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    batch_size: int = 256,
    normalize: bool = True,
    bucket: bool = True,
) -> torch.Tensor:
    """Embed ``[N, L]`` token rows in batches; rows come back in input order.

    With ``bucket=True`` rows are sorted by EOT position first, so every batch holds captions of
    similar length and the text tower (which trims each batch to its longest caption) wastes
    almost nothing on padding.
    """
    device = model_device(model)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if bucket else torch.arange(tokens.shape[0])
    out = []
    with prepack.frozen(model), torch.inference_mode():
        for part in _batches(tokens.shape[0], batch_size):
            batch = tokens[order[part]].to(device, non_blocking=True)
            out.append(model.encode_text(batch, normalize=normalize).float().cpu())
    if not out:
        return torch.empty(0, getattr(model.config, "embed_dim", 0))
    features = torch.cat(out)
    result = torch.empty_like(features)
    result[order] = features
    return result
