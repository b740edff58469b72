"""Vision Transformer image tower (CLIP's ViT: class token, pre-LN, token pooling, projection)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from clipforge.model import prepack
from clipforge.model.config import VisionConfig
from clipforge.model.layers import (
    AttentionalPooler,
    BlockOptions,
    LayerNorm,
    PatchDropout,
    Transformer,
    init_transformer,
    lock_groups,
)


@dataclass
class VisionOutput:
    """What an image tower can return beside its pooled features.

    ``pooled`` is the projected embedding (what ``forward`` returns); ``tokens`` the final patch
    tokens (class token excluded) after ``ln_post`` unless ``final_ln_after_pool``;
    ``intermediates`` the per-block outputs requested, each ``[B, 1 + grid*grid, W]``.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    intermediates: list[torch.Tensor] = field(default_factory=list)


class VisionTransformer(nn.Module):
    def __init__(
        self, cfg: VisionConfig, embed_dim: int, act_layer: Callable[[], nn.Module] = nn.GELU
    ) -> None:
        super().__init__()
        width = cfg.width
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.grid_size = cfg.grid_size
        self.pool_type = cfg.pool_type
        self.final_ln_after_pool = cfg.final_ln_after_pool
        self.output_dim = embed_dim
        #: Run the linear layers on oneDNN-prepacked weights without autograd on the CPU (same
        #: outputs to float rounding; a copy of the weights). Off until the weights' owner turns
        #: it on: see clipforge.model.prepack (frozen, enable).
        self.prepack = False

        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size**2 + 1, width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout) if cfg.patch_dropout > 0 else nn.Identity()
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else LayerNorm(width)
        self.transformer = Transformer(
            width, cfg.layers, cfg.heads, BlockOptions(cfg.mlp_ratio, cfg.ls_init_value, act_layer)
        )
        # CoCa: queries pool the tokens into embed_dim channels; ln_post and proj then act on those.
        self.attn_pool: AttentionalPooler | None = None
        pool_width = width
        if cfg.attentional_pool:
            self.attn_pool = AttentionalPooler(
                embed_dim, width, cfg.attn_pooler_heads, cfg.attn_pooler_queries
            )
            pool_width = embed_dim
        self.ln_post = LayerNorm(pool_width)
        self.proj = nn.Parameter(scale * torch.randn(pool_width, embed_dim))
        self.init_parameters()

    # --- contract ---------------------------------------------------------------------------------
    def init_parameters(self) -> None:
        scale = self.transformer.width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        init_transformer(self.transformer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding", "class_embedding"}

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower; the last ``unlocked_groups`` groups (embeddings, blocks, head) stay trainable."""
        groups = [
            [self.conv1, self.class_embedding, self.positional_embedding, self.ln_pre],
            *self.transformer.resblocks[:-1],
            [self.transformer.resblocks[-1], self.ln_post, *([self.attn_pool] if self.attn_pool else [])],
            self.proj,
        ]
        lock_groups(self, groups, unlocked_groups)

    # --- forward ----------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patchify, prepend the class token, add positions, drop patches (training), ``ln_pre``."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, W]
        cls_tok = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm + pooling -> (projected pooled features, patch tokens).

        With an attention pooler (CoCa, open_clip's original layout) the queries' outputs are
        normalised and pooled instead: query 0 is the contrastive feature, the others the tokens.
        """
        if self.attn_pool is not None:
            pooled, tokens = self._global_pool(self.ln_post(self.attn_pool(x)))
        elif self.final_ln_after_pool:
            pooled, tokens = self._global_pool(x)
            pooled = self.ln_post(pooled)
        else:
            pooled, tokens = self._global_pool(self.ln_post(x))
        return pooled @ self.proj, tokens

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == "avg":
            return x[:, 1:].mean(dim=1), x[:, 1:]
        return x[:, 0], x[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.pool_type == "tok" and self.attn_pool is None:  # only the class token is read: skip the rest
            return self.ln_post(self._class_token_out(x)) @ self.proj
        return self.pool(self.transformer(x))[0]

    def _class_token_out(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output at the class token (``[B, W]``), on prepacked linear weights
        when they apply (inference on the CPU, see :mod:`clipforge.model.prepack`) and the batch
        has few rows: ViT-B-32 on 2 cores is 1.20x faster at 1 image (50 rows), ~1.1x at 4,
        ~1.0x at 8 and 0.92x at 32, where the GEMMs are large enough for ``F.linear``'s own packing."""
        blocks = self.transformer.resblocks
        small = x.shape[0] * x.shape[1] <= prepack.SMALL_ROWS
        linear = prepack.linear_for(self, self.proj) if small else None
        if linear is None:
            cls_index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            return self.transformer.forward_at(x, cls_index)
        for block in blocks[:-1]:
            x = prepack.block_forward(block, x, linear)
        return prepack.block_at(blocks[-1], x, linear, None, None, None, position=0)

    def forward_tokens(self, x: torch.Tensor) -> VisionOutput:
        pooled, tokens = self.pool(self.transformer(self.embed(x)))
        return VisionOutput(pooled=pooled, tokens=tokens)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int] | int | None = None) -> VisionOutput:
        """Pooled features plus block outputs: ``indices`` = list of block ids, or the last n if int."""
        x, hidden = self.transformer.forward_hidden(self.embed(x))
        blocks = hidden[1:]
        take = take_indices(len(blocks), indices)
        pooled, tokens = self.pool(x)
        return VisionOutput(pooled=pooled, tokens=tokens, intermediates=[blocks[i] for i in take])


def take_indices(n: int, indices: list[int] | int | None) -> list[int]:
    """Block ids to return: all (None), the last ``n`` (int), or the given ones (negatives allowed)."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        return list(range(n - indices, n))
    return [i % n for i in indices]
