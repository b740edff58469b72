"""CLIP's text transformer with every open_clip ``text_cfg`` option, and hidden-state outputs.

Causal (CLIP) or bidirectional (``no_causal_mask``: SigLIP, MobileCLIP) attention; pooling at the
EOT (``argmax``: highest id), the first ``eos_id`` (``eos``), the ``last`` or the ``first``
position; a projection matrix, a biased ``Linear`` (``proj_bias``) or none (``proj_type='none'``);
LayerNorm ``norm_eps`` and GELU ``act_approximate`` as open_clip's ``norm_kwargs``/``act_kwargs``.

Speed note: under the causal mask, position ``i`` only sees positions ``<= i``. The pooled
feature therefore does not depend on anything after the batch's last pooled position, so
``forward`` runs the transformer on ``tokens[:, :max_eot + 1]`` only, and in eval mode may pack
captions end to end (:mod:`clipforge.model.packing`). Real captions are 10-30 tokens out of 77,
which makes text encoding several times faster with identical outputs. A bidirectional tower
reads the padding too (every token sees every other), so it always runs the full given length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model import prepack
from clipforge.model.config import TextConfig
from clipforge.model.layers import BlockOptions, LayerNorm, Transformer, init_transformer, lock_groups
from clipforge.model.prepack import is_tracing

logger = logging.getLogger(__name__)


@dataclass
class TextOutput:
    """Everything the text tower computes for a batch.

    ``pooled``: projected EOT feature ``[B, E]`` (what ``forward`` returns).
    ``last_hidden``: all token features after ``ln_final`` ``[B, L, W]``.
    ``hidden_states``: ``layers + 1`` tensors ``[B, L, W]``: the embeddings, then each block's
    output, before ``ln_final`` (Hugging Face's convention).
    ``penultimate``: ``hidden_states[-2]``, the output of block ``layers - 1`` without
    ``ln_final`` (what Stable Diffusion 2 style models condition on; apply ``text.ln_final``
    yourself if your model expects it normalised).
    """

    pooled: torch.Tensor
    last_hidden: torch.Tensor
    hidden_states: list[torch.Tensor]
    penultimate: torch.Tensor


def text_activation(act_layer: Callable[[], nn.Module], approximate: str) -> Callable[[], nn.Module]:
    """The MLP activation with open_clip's ``act_kwargs``: ``approximate='tanh'`` is GELU's tanh
    form (SigLIP 2); QuickGELU has no such option, so asking for both is an error, not a guess."""
    if approximate == "none":
        return act_layer
    if act_layer is not nn.GELU:
        raise ConfigError(
            f"text.act_approximate={approximate!r} applies to GELU, but the model uses "
            f"{getattr(act_layer, '__name__', act_layer)} (quick_gelu=True); set one of them"
        )
    return functools.partial(nn.GELU, approximate=approximate)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.width = cfg.width
        self.heads = cfg.heads
        self.pool_type = cfg.pool_type
        self.pad_id = cfg.pad_id
        self.eos_id = cfg.eos_id
        #: False for bidirectional towers (``no_causal_mask``): then nothing is trimmed or packed.
        self.causal = not cfg.no_causal_mask
        self.output_dim = embed_dim
        #: Run only up to the batch's last EOT (identical outputs); turn off to time the full run.
        self.trim = True
        #: In eval mode, pack captions or sort them into micro-batches when cheaper (model.packing).
        self.pack = True
        #: Run the linear layers on oneDNN-prepacked weights without autograd on the CPU (same
        #: outputs to float rounding; a copy of the weights). Off until the weights' owner turns
        #: it on: see clipforge.model.prepack (frozen, enable).
        self.prepack = False

        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # CoCa: a class token appended after the text (one more position), pooled instead of EOT.
        self.cls_emb = nn.Parameter(torch.empty(cfg.width)) if cfg.embed_cls else None
        self.correct_cls_mask = cfg.correct_cls_mask
        positions = cfg.context_length + (1 if cfg.embed_cls else 0)
        self.positional_embedding = nn.Parameter(torch.empty(positions, cfg.width))
        act = text_activation(act_layer, cfg.act_approximate)
        opts = BlockOptions(cfg.mlp_ratio, cfg.ls_init_value, act, cfg.norm_eps)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, opts)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.text_projection = _projection(cfg, embed_dim)
        self.init_parameters()

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """Additive causal mask ``[ctx, ctx]`` (0 on and below the diagonal, -inf above), or None
        for a bidirectional tower (as open_clip's ``attn_mask``).

        Built on demand rather than stored: forward uses SDPA's ``is_causal`` (the kernel skips
        the masked half), and a computed mask is never in the state dict nor left behind on the
        ``meta`` device when a model is built there and loaded with ``assign=True``.
        """
        if not self.causal:
            return None
        ctx = self.context_length
        ref = self.positional_embedding
        return torch.full((ctx, ctx), float("-inf"), device=ref.device, dtype=ref.dtype).triu_(1)

    # --- contract ---------------------------------------------------------------------------------
    def init_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        init_transformer(self.transformer)
        std = self.width**-0.5
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=std)
            nn.init.zeros_(self.text_projection.bias)
        elif self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"} | ({"cls_emb"} if self.cls_emb is not None else set())

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower except the last ``unlocked_groups`` groups (as open_clip's lock_text_tower)."""
        blocks = self.transformer.resblocks
        groups = [
            [
                self.token_embedding,
                self.positional_embedding,
                *([self.cls_emb] if self.cls_emb is not None else []),
            ],
            *blocks[:-1],
            [blocks[-1], self.ln_final],
            *([self.text_projection] if self.text_projection is not None else []),
        ]
        lock_groups(self, groups, unlocked_groups)

    # --- forward ----------------------------------------------------------------------------------
    def eot_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position pooled for each row: the EOT (highest id, CLIP's tokenizer), the first
        ``eos_id`` (row 0 when a row has none, as open_clip), the first or the last position."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)

    def _token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, after checking the length fits the position table."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ConfigError(
                f"text has {length} tokens but the model's context_length is {self.context_length}; "
                "tokenize with the model's tokenizer (it truncates)"
            )
        return self.token_embedding(tokens)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._token_embedding(tokens)
        return x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return pooled
        if isinstance(self.text_projection, nn.Module):  # nn.Linear, or its int8 twin (quantize_dynamic)
            return self.text_projection(pooled)
        return pooled @ self.text_projection

    def _trim_length(self, tokens: torch.Tensor, idx: torch.Tensor) -> int:
        """How many leading positions decide the pooled feature: up to the last pooled one under
        the causal mask, all of them in a bidirectional tower."""
        if not self.causal or not self.trim or is_tracing() or tokens.shape[0] == 0:
            return tokens.shape[1]
        return int(idx.max()) + 1

    def trim_length(self, tokens: torch.Tensor) -> int:
        """Leading token columns that decide the pooled feature, for callers that trim before
        the tower (export, benchmarks): the batch's last pooled position + 1 under the causal
        mask, every column in a bidirectional or class-token (CoCa) tower."""
        if self.cls_emb is not None or not self.causal or tokens.shape[0] == 0:
            return tokens.shape[1]
        return int(self.eot_indices(tokens).max()) + 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_emb is not None:
            return self.forward_tokens(tokens)[0]
        idx = self.eot_indices(tokens)
        if self.pack and self.trim and self.causal and not self.training and tokens.shape[0] > 1:
            if not is_tracing():
                from clipforge.model.packing import encode as encode_packed

                packed = encode_packed(self, tokens, idx)
                if packed is not None:
                    return packed
        return self.encode_trimmed(tokens[:, : self._trim_length(tokens, idx)], idx)

    def encode_trimmed(self, tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Projected features of already-trimmed tokens pooled at ``idx`` (the compilable part)."""
        # Only the EOT row of the last block is read: forward_at skips the rest of its work, and
        # LayerNorm being per token, normalising just the pooled rows is exact.
        linear = self.fast_linear()
        if linear is None:
            pooled = self.transformer.forward_at(self.embed(tokens), idx, is_causal=self.causal)
        else:
            pooled = self._forward_at_prepacked(self.embed(tokens), idx, linear)
        return self.project(self.ln_final(pooled))

    def fast_linear(self) -> prepack.Linear | None:
        """The prepacked-weight linear of :mod:`clipforge.model.prepack` when it applies to this
        call, else None (see :func:`clipforge.model.prepack.linear_for`)."""
        return prepack.linear_for(self, self.token_embedding.weight)

    def _forward_at_prepacked(
        self, x: torch.Tensor, idx: torch.Tensor, linear: prepack.Linear
    ) -> torch.Tensor:
        """``transformer.forward_at`` with the linear layers run through ``linear``. When every
        pooled position is the last one (a trimmed single caption, or captions of one length),
        the last block's query reads its row's last state and sees every key: no mask to build."""
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = prepack.block_forward(block, x, linear, is_causal=self.causal)
        length = x.shape[1]
        if self.causal and x.shape[0] == 1 and int(idx[0]) == length - 1:
            return prepack.block_at(blocks[-1], x, linear, None, None, None)
        rows = torch.arange(x.shape[0], device=x.device)
        mask = None
        if self.causal:  # the single query at idx[b] may see keys 0..idx[b]
            mask = torch.arange(length, device=x.device)[None, :] <= idx[:, None]
        return prepack.block_at(blocks[-1], x, linear, rows, idx, mask)

    # --- CoCa: class token ---------------------------------------------------------------------------
    def key_valid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which positions of ``[tokens, cls]`` may be attended to (``[B, L + 1]``, True = keep).

        Padding is hidden from every query. open_clip's released CoCa weights were trained with
        this validity shifted right by one (key ``j`` hidden when token ``j - 1`` is padding, the
        class slot always first-valid); that legacy mask is the default so those weights compute
        what they were trained to. ``correct_cls_mask`` hides the padding tokens themselves.
        """
        valid = tokens != self.pad_id
        always = torch.ones_like(valid[:, :1])
        return torch.cat([valid, always] if self.correct_cls_mask else [always, valid], dim=1)

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected class-token feature ``[B, E]``, token states ``[B, L, W]``) of a CoCa text tower.

        The token states are the last block's output without ``ln_final`` (what open_clip's CoCa
        feeds its decoder); the class token is normalised after pooling.
        """
        if self.cls_emb is None:
            raise ConfigError("forward_tokens needs a text tower with embed_cls=True (CoCa)")
        length = tokens.shape[1]
        x = self.embed_with_cls(tokens)
        causal = torch.ones(length + 1, length + 1, dtype=torch.bool, device=x.device).tril_()
        mask = causal[None, None] & self.key_valid(tokens)[:, None, None, :]
        x = self.transformer(x, attn_mask=mask)
        return self.project(self.ln_final(x[:, -1])), x[:, :-1]

    def embed_with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self._token_embedding(tokens)
        x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        return x + self.positional_embedding[: tokens.shape[1] + 1].to(x.dtype)

    def forward_hidden(self, tokens: torch.Tensor, pad_to_context: bool = False) -> TextOutput:
        """Pooled features plus all token states.

        By default a causal run is trimmed to the batch's last EOT, so ``last_hidden`` and
        ``hidden_states`` have that many positions (a bidirectional one keeps the given length).
        ``pad_to_context=True`` returns all ``context_length`` positions (short inputs are padded
        with ``pad_id`` first, and the pooled position is read from the padded tokens), computed
        in full so that they equal an untrimmed run exactly: positions after EOT depend on the
        padding tokens, so they cannot be filled in without running them.
        """
        if self.cls_emb is not None:
            raise ConfigError(
                "forward_hidden (per-layer EOT states) is not defined for a class-token text tower "
                "(CoCa); use forward_tokens"
            )
        if pad_to_context and tokens.shape[1] < self.context_length:
            tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]), value=self.pad_id)
        idx = self.eot_indices(tokens)
        if not pad_to_context:
            tokens = tokens[:, : self._trim_length(tokens, idx)]
        x, hidden = self.transformer.forward_hidden(self.embed(tokens), is_causal=self.causal)
        last = self.ln_final(x)
        pooled = self.project(last[torch.arange(x.shape[0], device=x.device), idx])
        penultimate = hidden[-2] if len(hidden) > 1 else hidden[-1]
        return TextOutput(pooled=pooled, last_hidden=last, hidden_states=hidden, penultimate=penultimate)


def _projection(cfg: TextConfig, embed_dim: int) -> nn.Module | nn.Parameter | None:
    """open_clip's text projection: a ``[width, embed_dim]`` matrix, a biased ``Linear``
    (``proj_bias``), or none (``proj_type='none'``: the pooled feature is the embedding)."""
    if cfg.proj_type == "none":
        if cfg.width != embed_dim:
            raise ConfigError(
                f"text.proj_type='none' needs text.width ({cfg.width}) == embed_dim ({embed_dim}): "
                "the pooled feature is the embedding"
            )
        return None
    if cfg.proj_bias:
        return nn.Linear(cfg.width, embed_dim)
    return nn.Parameter(torch.empty(cfg.width, embed_dim))
