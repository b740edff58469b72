"""Token-level text features for conditioning generative models (Stable Diffusion and kin).

A diffusion U-Net does not consume CLIP's pooled embedding: it cross-attends to the text tower's
per-token hidden states ``[B, 77, W]``. Which layer, and whether the final LayerNorm is applied,
differs between model families, and getting it wrong degrades images silently. The conventions:

=================  =====================  ==============  ====================================
family             layer                  ``ln_final``?   padding after EOT
=================  =====================  ==============  ====================================
SD 1.x             last block             yes             EOT (HF tokenizer of CLIP ViT-L/14)
SD 1.x clip-skip   penultimate block      yes             EOT
SD 2.x             penultimate block      yes             0 (open_clip tokenizer)
SDXL               penultimate block      no              EOT for CLIP-L, 0 for OpenCLIP bigG
=================  =====================  ==============  ====================================

SD 1.x reads Hugging Face ``CLIPTextModel(...).last_hidden_state``. SD 2.x's
``FrozenOpenCLIPEmbedder(layer="penultimate")`` stops one block early and then applies
``ln_final``. SDXL reads ``hidden_states[-2]`` as is (no final LN) from both of its encoders and
also uses the second encoder's pooled, projected embedding. ``CONVENTIONS`` names these presets.

Positions after EOT depend on the padding token (the causal mask lets them attend to it), so the
tokens are run at full ``context_length`` and the padding id is part of the convention.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError

log = logging.getLogger(__name__)

Layer = str | int

#: Presets: layer, whether ``ln_final`` is applied, and the padding after EOT ("eot" or an id).
CONVENTIONS: dict[str, dict[str, Any]] = {
    "sd1": {"layer": "last", "apply_final_ln": True, "pad": "eot"},
    "sd1-clip-skip-2": {"layer": "penultimate", "apply_final_ln": True, "pad": "eot"},
    "sd2": {"layer": "penultimate", "apply_final_ln": True, "pad": 0},
    "sdxl-clip-l": {"layer": "penultimate", "apply_final_ln": False, "pad": "eot"},
    "sdxl-openclip": {"layer": "penultimate", "apply_final_ln": False, "pad": 0},
}


@dataclass
class TextConditioning:
    """``hidden``: token states ``[B, L, W]`` (L = context length); ``pooled``: projected EOT
    feature ``[B, E]`` from the last layer with ``ln_final`` (SDXL's ``text_embeds``, L2-normalised
    only if asked); ``tokens``: the ids that were encoded ``[B, L]``; ``eot_index``: each row's
    pooled position ``[B]`` (useful to mask padding)."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    tokens: torch.Tensor
    eot_index: torch.Tensor


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """Accept a CLIP model or its text tower directly."""
    tower = getattr(model, "text", model)
    if not hasattr(tower, "forward_hidden"):
        raise ConfigError(
            f"{type(model).__name__} has no text tower with forward_hidden(); "
            "pass a clipforge CLIP model or its .text tower"
        )
    return tower


def _tower_device(tower: torch.nn.Module) -> torch.device:
    for p in tower.parameters():
        return p.device
    return torch.device("cpu")


def _tokens(tokenizer: Any, texts: str | Sequence[str] | torch.Tensor, context_length: int) -> torch.Tensor:
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"token tensor must be integer [B, L], got {texts.dtype} {tuple(texts.shape)}")
        return texts.long()
    if tokenizer is None:
        raise ConfigError("texts are strings but tokenizer is None; pass the model's tokenizer")
    if isinstance(texts, str):
        texts = [texts]
    return tokenizer(list(texts), context_length=context_length)


def _eot_positions(tower: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if hasattr(tower, "eot_indices"):
        return tower.eot_indices(tokens)
    return tokens.argmax(dim=-1)


def _repad(tokens: torch.Tensor, eot_index: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Replace every id after each row's EOT with ``pad_id`` (SD 1.x pads with EOT, not 0)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    after = positions.unsqueeze(0) > eot_index.unsqueeze(1)
    return tokens.masked_fill(after, pad_id)


def _select_layer(hidden_states: list[torch.Tensor], layer: Layer) -> torch.Tensor:
    """``"last"`` = output of the last block, ``"penultimate"`` = of the one before; an int
    indexes ``hidden_states`` as in Hugging Face (0 = embeddings, -1 = last block, -2 = ...)."""
    if layer == "last":
        return hidden_states[-1]
    if layer == "penultimate":
        return hidden_states[-2] if len(hidden_states) > 2 else hidden_states[-1]
    if isinstance(layer, int) and not isinstance(layer, bool):
        n = len(hidden_states)
        if not -n <= layer < n:
            raise ConfigError(
                f"layer={layer} is out of range: the text tower has {n} hidden states (0..{n - 1})"
            )
        return hidden_states[layer]
    raise ConfigError(f"layer must be 'last', 'penultimate' or an int, got {layer!r}")


def encode_text_for_conditioning(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str] | torch.Tensor,
    layer: Layer | None = None,
    apply_final_ln: bool | None = None,
    *,
    convention: str | None = None,
    pad: int | str | None = None,
    normalize_pooled: bool = False,
    device: torch.device | str | None = None,
) -> TextConditioning:
    """Token hidden states ``[B, context_length, W]`` and the pooled embedding for ``texts``.

    Args:
        model: a clipforge CLIP (or its ``.text`` tower). Gradients are not disabled here: wrap
            the call in ``torch.no_grad()`` for a frozen encoder.
        tokenizer: the model's tokenizer (ignored when ``texts`` is already a token tensor).
        layer: ``"last"`` (default), ``"penultimate"`` or an index into ``hidden_states``.
        apply_final_ln: apply the tower's ``ln_final`` to the chosen layer. Default: True for
            ``"last"`` (so it equals HF ``last_hidden_state``), False otherwise (HF ``hidden_states[i]``).
        convention: a ``CONVENTIONS`` preset ("sd1", "sd2", "sdxl-clip-l", ...); explicit
            ``layer``/``apply_final_ln``/``pad`` arguments override it.
        pad: id written after each row's EOT: ``"eot"``, an int, or None to keep the tokenizer's.
        normalize_pooled: L2-normalise ``pooled``.
    """
    preset: dict[str, Any] = {}
    if convention is not None:
        if convention not in CONVENTIONS:
            raise ConfigError(f"unknown conditioning convention {convention!r}; known: {sorted(CONVENTIONS)}")
        preset = CONVENTIONS[convention]
    layer = layer if layer is not None else preset.get("layer", "last")
    if apply_final_ln is None:
        apply_final_ln = preset.get("apply_final_ln", layer == "last")
    pad = pad if pad is not None else preset.get("pad")

    tower = _text_tower(model)
    context = int(getattr(tower, "context_length", 77))
    tokens = _tokens(tokenizer, texts, context)
    device = torch.device(device) if device is not None else _tower_device(tower)
    tokens = tokens.to(device)
    if tokens.shape[1] < context:
        tokens = F.pad(tokens, (0, context - tokens.shape[1]), value=int(getattr(tower, "pad_id", 0)))
    eot = _eot_positions(tower, tokens)
    if pad is not None:
        pad_id = _resolve_pad(pad, tokenizer, tokens)
        tokens = _repad(tokens, eot, pad_id)

    out = tower.forward_hidden(tokens, pad_to_context=True)
    hidden = _select_layer(out.hidden_states, layer)
    if apply_final_ln:
        ln = getattr(tower, "ln_final", None)
        if ln is None:
            raise ConfigError(f"{type(tower).__name__} has no ln_final; use apply_final_ln=False")
        hidden = ln(hidden)
    pooled = F.normalize(out.pooled, dim=-1) if normalize_pooled else out.pooled
    log.debug("conditioning: layer=%s final_ln=%s shape=%s", layer, apply_final_ln, tuple(hidden.shape))
    return TextConditioning(hidden=hidden, pooled=pooled, tokens=tokens, eot_index=eot)


def _resolve_pad(pad: int | str, tokenizer: Any, tokens: torch.Tensor) -> int:
    if pad == "eot":
        eot_id = getattr(tokenizer, "eot_token_id", None)
        return int(eot_id) if eot_id is not None else int(tokens.max())
    if isinstance(pad, int) and not isinstance(pad, bool):
        return pad
    raise ConfigError(f"pad must be 'eot', an int token id or None, got {pad!r}")
