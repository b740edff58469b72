"""Tower inference on the CPU with the linear layers' weights prepacked for oneDNN.

Why: ``F.linear`` hands each call to a GEMM that first rearranges (packs) the whole weight matrix
into its cache-friendly layout and only then multiplies. A short caption is a handful of rows, so
at batch 1 that repacking of every weight costs as much as the product itself. oneDNN can keep
the packed layout: each ``nn.Linear`` weight is packed once (a copy the size of the weight) and
reused, which makes small batches markedly faster (the large ones a little). The result differs
from ``F.linear`` only in float summation order (~1e-6).

Used only where it is exact to use it and nothing else can notice: no autograd (``inference_mode``
or ``no_grad``), the tower in eval mode, float32 on the CPU, a plain ``nn.Linear`` (a LoRA wrapper,
an int8 twin or any subclass keeps its own ``forward``), no tracing, and only where the weights
cannot change behind its back. A packed copy is remade when the weight's version counter moves
(an optimiser step, ``load_state_dict``, in-place ops under ``no_grad``) or its storage is
replaced, but a write through ``weight.data`` (peft's merge, hand-written EMA updates) moves no
counter. So a tower's ``prepack`` is off by default and turned on only by the owner of the
weights: :func:`frozen` for the length of one evaluation (the eval loops), or :func:`enable` for
good by :func:`clipforge.inference.optimize_for_inference` (whose model is for inference only;
after writing its weights through ``.data``, call :func:`forget`). The text tower and the ViT
image tower use it (:func:`linear_for`).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.layers import MLP, Attention, ResidualAttentionBlock

Linear = Callable[[nn.Module, torch.Tensor], torch.Tensor]

#: Row count oneDNN is told to expect when choosing the packed layout (any count works after).
_ROWS_HINT = 16
#: Up to this many rows (tokens in the batch) a prepacked linear beats ``F.linear``; beyond it
#: the product dominates the packing and MKL's GEMM is as fast or faster (the image tower checks).
SMALL_ROWS = 256


def is_tracing() -> bool:
    """True under torch.compile / jit / ONNX export, where data-dependent shapes must be avoided."""
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return bool(
        compiling or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
    )


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has oneDNN and the two prepacked-linear operators."""
    ops = torch.ops.mkldnn
    return bool(torch.backends.mkldnn.is_available()) and all(
        _has_op(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise")
    )


def _has_op(namespace: object, name: str) -> bool:
    try:
        getattr(namespace, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def plain_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own forward (the path everywhere the prepacked one does not apply)."""
    return module(x)


class PrepackedLinears:
    """oneDNN-packed copies of a tower's ``nn.Linear`` weights, made on first use.

    A copy is keyed by the weight tensor itself, its version counter and its storage, so an
    optimiser step, ``load_state_dict`` (both write in place), a replaced parameter or replaced
    ``.data`` repacks it on the next call instead of using stale weights.
    """

    def __init__(self) -> None:
        self._packed: dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = {}

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if (
            type(module) is not nn.Linear
            or module.weight.dtype != torch.float32
            or module.weight.is_inference()
        ):
            return module(x)  # an inference tensor has no version counter: a change would go unseen
        weight = module.weight
        stamp = (weight._version, weight.data_ptr())
        hit = self._packed.get(id(module))
        if hit is None or hit[0] is not weight or hit[1] != stamp:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
            hit = (weight, stamp, packed)
            self._packed[id(module)] = hit
        return torch.ops.mkldnn._linear_pointwise(x, hit[2], module.bias, "none", [], "")

    @property
    def count(self) -> int:
        """How many weights hold a packed copy."""
        return len(self._packed)


#: Each tower's prepacked linear weights, outside the module so that deepcopy, pickling and the
#: state dict never see them; dropped with the tower.
_CACHES: weakref.WeakKeyDictionary[nn.Module, PrepackedLinears] = weakref.WeakKeyDictionary()


def _towers(model: nn.Module) -> list[nn.Module]:
    """The submodules that can run on prepacked weights (those with a ``prepack`` switch)."""
    return [m for m in model.modules() if isinstance(getattr(m, "prepack", None), bool)]


def enable(model: nn.Module) -> None:
    """Prepack from now on: the caller owns ``model`` for inference (see the module docstring)."""
    for tower in _towers(model):
        tower.prepack = True


def forget(model: nn.Module) -> None:
    """Drop the packed copies, e.g. after writing weights through ``.data``; remade on next use."""
    for tower in _towers(model):
        _CACHES.pop(tower, None)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Prepack for the length of one evaluation, where nothing writes the weights; towers that
    were off are off again afterwards and their packed copies are dropped."""
    off = [tower for tower in _towers(model) if not tower.prepack]
    for tower in off:
        tower.prepack = True
    try:
        yield model
    finally:
        for tower in off:
            tower.prepack = False
            _CACHES.pop(tower, None)


def linear_for(tower: nn.Module, weight: torch.Tensor) -> PrepackedLinears | None:
    """The prepacked-weight linear for this call of ``tower`` when it applies (inference without
    autograd, eval mode, ``tower.prepack``, float32 CPU weights as ``weight`` is, stock blocks in
    ``tower.transformer``, not tracing), else None: the caller runs the modules themselves."""
    blocks = tower.transformer.resblocks
    if is_tracing() or not (getattr(tower, "prepack", False) and len(blocks) and not tower.training):
        return None
    if torch.is_grad_enabled() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if not available() or not blocks_supported(blocks):
        return None
    cache = _CACHES.get(tower)
    if cache is None:
        cache = _CACHES[tower] = PrepackedLinears()
    return cache


def blocks_supported(blocks: nn.ModuleList) -> bool:
    """True when every block is the stock pre-LN block (what :func:`block_forward` mirrors)."""
    return all(
        type(b) is ResidualAttentionBlock and type(b.attn) is Attention and type(b.mlp) is MLP for b in blocks
    )


def block_forward(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    linear: Linear,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``block(x, attn_mask, is_causal)`` with every linear layer run through ``linear``."""
    attn, mlp = block.attn, block.mlp
    batch, length, width = x.shape
    qkv = linear(attn.in_proj, block.ln_1(x)).view(batch, length, 3, attn.heads, width // attn.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None
    )
    x = x + block.ls_1(linear(attn.out_proj, out.transpose(1, 2).reshape(batch, length, width)))
    return x + block.ls_2(linear(mlp.c_proj, mlp.gelu(linear(mlp.c_fc, block.ln_2(x)))))


def block_at(
    block: ResidualAttentionBlock,
    x: torch.Tensor,
    linear: Linear,
    rows: torch.Tensor | None,
    cols: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    position: int = -1,
) -> torch.Tensor:
    """One block's output at ``(rows[b], cols[b])`` for each ``b`` (``[B, W]``): keys and values
    of the whole row, one query each. ``rows is None`` means position ``position`` of every row
    (the last: a batch trimmed to a single caption's EOT; 0: a ViT's class token): no gather."""
    attn = block.attn
    r, length, width = x.shape
    qkv = linear(attn.in_proj, block.ln_1(x)).view(r, length, 3, attn.heads, width // attn.heads)
    if rows is None or cols is None:
        q = qkv[:, position, 0].unsqueeze(2)  # [B, H, 1, D]
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        x_at, n = x[:, position], r
    else:
        q = qkv[rows, cols, 0].unsqueeze(2)  # [B, H, 1, D]
        k, v = qkv[rows, :, 1].transpose(1, 2), qkv[rows, :, 2].transpose(1, 2)  # [B, H, L, D]
        x_at, n = x[rows, cols], len(rows)
    mask = key_mask[:, None, None, :] if key_mask is not None else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    y = x_at + block.ls_1(linear(attn.out_proj, out.reshape(n, width)))
    mlp = block.mlp
    return y + block.ls_2(linear(mlp.c_proj, mlp.gelu(linear(mlp.c_fc, block.ln_2(y)))))
