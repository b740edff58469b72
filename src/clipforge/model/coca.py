"""CoCa (contrastive captioner): a CLIP whose towers also feed a captioning decoder.

Built from clipforge's towers, in open_clip's layout so its CoCa weights load unchanged:

- the image tower (:class:`~clipforge.model.vision.VisionTransformer` with ``attentional_pool``)
  pools its tokens with learned queries: query 0 is the contrastive feature, the other queries
  are the image tokens the decoder reads;
- the text tower (:class:`~clipforge.model.text.TextTransformer` with ``embed_cls``) appends a
  class token whose output is the contrastive text feature; its per-token states (before
  ``ln_final``) are the decoder's input;
- the :class:`MultimodalDecoder` alternates causal self-attention blocks and cross-attention
  blocks over the image tokens, then projects to the vocabulary (its own LM head).

``encode_image``/``encode_text`` are CLIP's, so zero-shot, retrieval, search and export use a
CoCa like any other model. ``forward`` adds the teacher-forced caption logits (and labels) that
the ``coca`` loss needs; ``generate`` writes captions (see :mod:`clipforge.model.generate`).

Incremental decoding (:class:`DecodeState`) caches keys and values of the text tower and of the
decoder's self-attention, and the cross-attention keys/values of the image tokens, so each new
token costs one position instead of a re-run over the whole prefix. This is exact because every
text position only attends to earlier ones (the class token, which sees everything, is not
needed to caption).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.model.clip import CLIP, CLIPOutput
from clipforge.model.config import CLIPConfig, MultimodalConfig
from clipforge.model.layers import (
    BlockOptions,
    CrossAttention,
    LayerNorm,
    PreNormBlock,
    ResidualAttentionBlock,
    activation,
    init_transformer,
)

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CoCaOutput(CLIPOutput):
    """CLIP's output plus the teacher-forced caption ``logits`` ``[B, L', V]`` and their ``labels``.

    ``L'`` is ``L - 1`` cut after the batch's last non-pad label (see ``CoCa._caption_columns``).
    """

    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None


class CrossAttentionBlock(PreNormBlock):
    """Pre-LN cross-attention block: ``x + attn(ln_1(x), ln_1_kv(image))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, opts: BlockOptions | None = None) -> None:
        super().__init__(width, CrossAttention(width, heads), opts or BlockOptions(), kv_norm=True)

    def context(self, image_tokens: torch.Tensor) -> KV:
        """Keys/values of the image tokens: once per image, however many tokens are decoded."""
        return self.attn.project_context(self.ln_1_kv(image_tokens))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x = x + self.ls_1(self.attn.attend(self.ln_1(x), keys, values))
        return self.feed_forward(x)


class MultimodalDecoder(nn.Module):
    """CoCa's text decoder; module names are open_clip's ``MultimodalTransformer``'s."""

    def __init__(self, cfg: MultimodalConfig, act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.width = cfg.width
        self.layers = cfg.layers
        self.context_length = cfg.context_length
        self.grad_checkpointing = False
        opts = BlockOptions(cfg.mlp_ratio, cfg.ls_init_value, act_layer)
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, opts) for _ in range(cfg.layers)
        )
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(cfg.width, cfg.heads, opts) for _ in range(cfg.layers)
        )
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.vocab_size))
        self.init_parameters()

    def init_parameters(self) -> None:
        init_transformer(self)  # reads .width, .layers and .resblocks
        std = self.width**-0.5
        proj_std = std * (2 * max(self.layers, 1)) ** -0.5
        for block in self.cross_attn:
            for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj):
                nn.init.normal_(linear.weight, std=std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=std)

    def contexts(self, image_tokens: torch.Tensor) -> list[KV]:
        return [block.context(image_tokens) for block in self.cross_attn]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x) @ self.text_projection.to(x.dtype)

    def forward(self, image_tokens: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, L, V]`` for every position of ``text_states`` (causal)."""
        x = text_states
        for block, cross in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, True, use_reentrant=False)
                x = checkpoint(lambda h, c=cross: c(h, *c.context(image_tokens)), x, use_reentrant=False)
            else:
                x = block(x, is_causal=True)
                x = cross(x, *cross.context(image_tokens))
        return self.head(x)


def _cached_self_attention(
    block: ResidualAttentionBlock, x: torch.Tensor, cache: KV | None, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, KV]:
    """One new position ``x`` ``[N, 1, W]`` through a self-attention block, keys/values cached."""
    attn = block.attn
    batch, _, width = x.shape
    qkv = attn.in_proj(block.ln_1(x)).view(batch, 1, 3, attn.heads, width // attn.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, 1, D]
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(batch, 1, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x))), (k, v)


@dataclass
class DecodeState:
    """What incremental decoding keeps between tokens; every tensor has the rows (images x beams) first."""

    image_kv: list[KV]
    text_kv: list[KV | None]
    decoder_kv: list[KV | None]
    key_valid: torch.Tensor  # [N, T] text-tower keys that may be attended to
    last_token: torch.Tensor | None = None  # [N] previous token (open_clip's shifted mask reads it)
    length: int = 0

    def select(self, rows: torch.Tensor) -> DecodeState:
        """Keep (and reorder, or repeat) rows: beam search's reshuffle after each step."""

        def pick(kv: KV | None) -> KV | None:
            return None if kv is None else (kv[0].index_select(0, rows), kv[1].index_select(0, rows))

        return DecodeState(
            image_kv=[pick(kv) for kv in self.image_kv],
            text_kv=[pick(kv) for kv in self.text_kv],
            decoder_kv=[pick(kv) for kv in self.decoder_kv],
            key_valid=self.key_valid.index_select(0, rows),
            last_token=None if self.last_token is None else self.last_token.index_select(0, rows),
            length=self.length,
        )


class CoCa(CLIP):
    """CLIP towers (attention-pooled image tower, class-token text tower) plus a captioning decoder."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.text_decoder = MultimodalDecoder(config.multimodal, activation(config.quick_gelu))
        self.pad_id = config.text.pad_id

    # --- encoders ---------------------------------------------------------------------------------
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contrastive image features ``[B, E]``, not normalised; image tokens ``[B, Q-1, E]``)."""
        out = self.visual.forward_tokens(images)
        return out.pooled, out.tokens

    def caption_logits(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, L, V]`` at every position of ``tokens`` given the image tokens."""
        return self.text_decoder(image_tokens, self.text.forward_tokens(tokens)[1])

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> CoCaOutput:
        """CLIP's features; with both inputs also the caption logits for ``tokens[:, 1:]`` (teacher forcing)."""
        image_features = image_tokens = text_features = logits = labels = None
        if images is not None:
            pooled, image_tokens = self.encode_image_tokens(images)
            image_features = F.normalize(pooled, dim=-1)
        if tokens is not None:
            pooled, states = self.text.forward_tokens(tokens)
            text_features = F.normalize(pooled, dim=-1)
            if image_tokens is not None:
                labels = tokens[:, 1:]
                keep = self._caption_columns(labels)
                logits, labels = self.text_decoder(image_tokens, states[:, :keep]), labels[:, :keep]
        return CoCaOutput(
            image_features=image_features,
            text_features=text_features,
            logit_scale=self.logit_scale.exp(),
            logit_bias=self.logit_bias,
            logits=logits,
            labels=labels,
        )

    def _caption_columns(self, labels: torch.Tensor) -> int:
        """Label columns up to the batch's last non-pad one (all of them when tracing or ``text.trim`` is off).

        Later columns are padding, which the caption loss ignores; the decoder is causal, so the
        kept logits equal an untrimmed run's. Short captions in a long context would otherwise
        spend most of the decoder's time on the ``[width, vocab]`` LM head over padding.
        """
        from clipforge.model.text import is_tracing

        if not self.text.trim or is_tracing() or labels.numel() == 0:
            return labels.shape[1]
        used = (labels != self.pad_id).any(dim=0).nonzero()
        return int(used.max()) + 1 if used.numel() else 1

    # --- incremental decoding ---------------------------------------------------------------------
    def start_decoding(self, image_tokens: torch.Tensor) -> DecodeState:
        """A fresh :class:`DecodeState` for these image tokens (cross-attention keys computed once)."""
        layers = len(self.text_decoder.resblocks)
        return DecodeState(
            image_kv=self.text_decoder.contexts(image_tokens),
            text_kv=[None] * len(self.text.transformer.resblocks),
            decoder_kv=[None] * layers,
            key_valid=torch.ones(image_tokens.shape[0], 0, dtype=torch.bool, device=image_tokens.device),
        )

    def _new_key_valid(self, state: DecodeState, token: torch.Tensor) -> torch.Tensor:
        """Validity of the new text position as a key, by the text tower's mask convention."""
        if self.text.correct_cls_mask:
            return token != self.pad_id
        if state.last_token is None:  # position 0: the legacy mask's always-valid slot
            return torch.ones_like(token, dtype=torch.bool)
        return state.last_token != self.pad_id

    def decode_step(self, state: DecodeState, token: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        """Append ``token`` ``[N]`` at position ``state.length``; return the next-token logits ``[N, V]``."""
        text = self.text
        position = state.length
        if position >= min(text.context_length, self.text_decoder.context_length):
            raise ValueError(f"cannot decode past position {position}: the model's context is full")
        key_valid = torch.cat([state.key_valid, self._new_key_valid(state, token)[:, None]], dim=1)
        x = text.token_embedding(token[:, None]) + text.positional_embedding[position].to(
            text.token_embedding.weight.dtype
        )
        mask = key_valid[:, None, None, :]
        text_kv: list[KV | None] = []
        for block, cache in zip(text.transformer.resblocks, state.text_kv):
            x, kv = _cached_self_attention(block, x, cache, mask)
            text_kv.append(kv)
        decoder_kv: list[KV | None] = []
        for block, cross, cache, image_kv in zip(
            self.text_decoder.resblocks, self.text_decoder.cross_attn, state.decoder_kv, state.image_kv
        ):
            x, kv = _cached_self_attention(block, x, cache, None)
            decoder_kv.append(kv)
            x = cross(x, *image_kv)
        logits = self.text_decoder.head(x)[:, 0]
        new_state = DecodeState(state.image_kv, text_kv, decoder_kv, key_valid, token, position + 1)
        return logits, new_state

    def generate(self, images: torch.Tensor, text: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Caption token ids ``[B, T]`` (SOT first); arguments are open_clip's (see :func:`~clipforge.model.generate.generate`)."""
        from clipforge.model.generate import generate

        return generate(self, images, text, **kwargs)

    # --- training helpers -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        self.text_decoder.grad_checkpointing = enable
