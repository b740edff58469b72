"""Build a model whose parameters live on the meta device, for a strict checkpoint load to fill.

Every parameter is about to be replaced by a strict load, and drawing 100M+ random numbers for
them first costs seconds on CPU for nothing. Putting only the *parameters* on the meta device
(not buffers) keeps what ``__init__`` computes, such as position ids, attention masks and rotary
tables, exactly as a normal build makes them, so nothing needs to be re-derived afterwards.

The switch is a context variable read by one parameter-registration hook installed once, so it
only ever affects the thread (or asyncio task) that entered :func:`parameters_on_meta`; nothing
in ``torch`` is patched.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

__all__ = ["meta_tensor_names", "parameters_on_meta"]

_ON_META: contextvars.ContextVar[bool] = contextvars.ContextVar("clipforge_parameters_on_meta", default=False)
_HOOK: list[object] = []  # the one installed hook's handle (installed on first use)


def _to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """Registration hook: while the switch is on, a new plain parameter is replaced by its meta twin."""
    if not _ON_META.get() or param is None or type(param) is not nn.Parameter or param.is_meta:
        return None
    return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block, parameters registered on any module are created on the meta device.

    Initialisers then run on meta tensors (free); buffers stay real. Load with
    ``load_state_dict(..., assign=True)`` afterwards, giving a tensor for every parameter.
    """
    if not _HOOK:
        _HOOK.append(register_module_parameter_registration_hook(_to_meta))
    token = _ON_META.set(True)
    try:
        yield
    finally:
        _ON_META.reset(token)


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device (empty once loaded)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if isinstance(tensor, torch.Tensor) and tensor.is_meta]
