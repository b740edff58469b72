"""Building blocks shared by the image and text transformers.

Everything here is plain PyTorch. Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention` with one fused ``in_proj`` linear for
q/k/v, so PyTorch picks its fastest kernel on every device and LoRA-style adapters can target the
projections by name (``in_proj``, ``out_proj``, ``c_fc``, ``c_proj``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype.

    Half-precision LayerNorm loses accuracy on the variance; CLIP's released weights were trained
    with float32 statistics, so we keep them whatever dtype the rest of the model runs in.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and (self.weight is None or self.weight.dtype == torch.float32):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation OpenAI's released CLIP weights expect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool) -> type[nn.Module]:
    """The MLP activation for a config: weights trained with QuickGELU must run with it."""
    return QuickGELU if quick_gelu else nn.GELU


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT); parameter named ``gamma`` as in open_clip."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class PatchDropout(nn.Module):
    """Drop a random subset of patch tokens while training (FLIP); the class token is always kept.

    Randomness comes from the global torch generator so seeding the run makes it reproducible.
    """

    def __init__(self, prob: float) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_tok, patches = x[:, :1], x[:, 1:]
        batch, num = patches.shape[:2]
        keep = max(1, int(num * (1.0 - self.prob)))
        idx = torch.rand(batch, num, device=x.device).topk(keep, dim=-1).indices
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([cls_tok, patches], dim=1)


class Attention(nn.Module):
    """Multi-head self-attention over batch-first ``[B, L, W]`` tokens via SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, length, width = x.shape
        # [B, L, 3, H, D] -> 3 x [B, H, L, D] without a copy until SDPA needs one.
        qkv = self.in_proj(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    def attend_from(
        self, x: torch.Tensor, index: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention output ``[B, W]`` for one query position per row (``index``) over all keys.

        Keys and values still need every position, but the attention and ``out_proj`` are done
        for a single query. ``in_proj`` is called as a module (not via sliced weights) so LoRA
        adapters and quantised linears keep working.
        """
        batch, length, width = x.shape
        heads = self.heads
        qkv = self.in_proj(x).view(batch, length, 3, heads, width // heads)
        rows = torch.arange(batch, device=x.device)
        q = qkv[rows, index, 0].unsqueeze(2)  # [B, H, 1, D]
        k, v = qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.reshape(batch, width))


class MLP(nn.Module):
    """Two-layer feed-forward block; names ``c_fc``/``c_proj`` match OpenAI's checkpoints."""

    def __init__(self, width: int, hidden: int, act_layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


@dataclass(frozen=True)
class BlockOptions:
    """What every pre-LN residual block is built with besides its width and heads.

    One value for the self-attention blocks, the :class:`Transformer` stacking them and CoCa's
    cross-attention blocks, so their defaults live in one place.
    """

    mlp_ratio: float = 4.0
    ls_init_value: float | None = None  # None: no LayerScale (an Identity, nothing in the state dict)
    act_layer: Callable[[], nn.Module] = nn.GELU
    norm_eps: float = 1e-5

    def layer_scale(self, width: int) -> nn.Module:
        return LayerScale(width, self.ls_init_value) if self.ls_init_value is not None else nn.Identity()


class PreNormBlock(nn.Module):
    """The residual structure the blocks share: ``ln_1 -> attn -> ls_1`` and ``ln_2 -> mlp -> ls_2``.

    ``kv_norm`` adds ``ln_1_kv`` (cross-attention's norm of the image tokens) right after ``ln_1``,
    so the state-dict keys and their order are those of open_clip's blocks.
    """

    def __init__(self, width: int, attn: nn.Module, opts: BlockOptions, kv_norm: bool = False) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=opts.norm_eps)
        if kv_norm:
            self.ln_1_kv = LayerNorm(width, eps=opts.norm_eps)
        self.attn = attn
        self.ls_1 = opts.layer_scale(width)
        self.ln_2 = LayerNorm(width, eps=opts.norm_eps)
        self.mlp = MLP(width, int(width * opts.mlp_ratio), opts.act_layer)
        self.ls_2 = opts.layer_scale(width)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The second half of the block: ``x + ls_2(mlp(ln_2(x)))``."""
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class ResidualAttentionBlock(PreNormBlock):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, opts: BlockOptions | None = None) -> None:
        super().__init__(width, Attention(width, heads), opts or BlockOptions())

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal))
        return self.feed_forward(x)

    def forward_at(
        self, x: torch.Tensor, index: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """This block's output at position ``index[b]`` of each row ``b`` (``[B, W]``).

        Equal to ``forward(x)[arange(B), index]``, without the MLP and attention work for the
        positions nobody reads: the last block of a pooled tower only feeds one token per row.
        """
        rows = torch.arange(x.shape[0], device=x.device)
        y = x[rows, index] + self.ls_1(self.attn.attend_from(self.ln_1(x), index, attn_mask))
        return self.feed_forward(y)


class Transformer(nn.Module):
    """A stack of residual blocks with optional activation checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, opts: BlockOptions | None = None) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, opts) for _ in range(layers))

    def _run(
        self, block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing supports keyword args and mixes with autocast/compile.
            return checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
        return block(x, attn_mask, is_causal)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Run the first ``num_layers`` blocks (all by default)."""
        for block in self.resblocks[: self.layers if num_layers is None else num_layers]:
            x = self._run(block, x, attn_mask, is_causal)
        return x

    def forward_at(self, x: torch.Tensor, index: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """Output of the stack at one position per row (``[B, W]``); see ``ResidualAttentionBlock.forward_at``."""
        if not self.layers:
            return x[torch.arange(x.shape[0], device=x.device), index]
        for block in self.resblocks[:-1]:
            x = self._run(block, x, None, is_causal)
        mask = None
        if is_causal:  # the single query at index b may see keys 0..index[b]
            positions = torch.arange(x.shape[1], device=x.device)
            mask = (positions[None, :] <= index[:, None])[:, None, None, :]
        return self.resblocks[-1].forward_at(x, index, mask)

    def forward_hidden(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final output plus the output of every block (``[x_0, x_1, ..., x_L]``, x_0 = input)."""
        hidden = [x]
        for block in self.resblocks:
            x = self._run(block, x, attn_mask, is_causal)
            hidden.append(x)
        return x, hidden


def init_transformer(transformer: Transformer) -> None:
    """OpenAI CLIP's initialisation: normal weights whose std shrinks with width and depth.

    The residual output projections get ``1/sqrt(2 * layers)`` extra damping so the residual
    stream's variance stays roughly constant however deep the stack is.
    """
    width, layers = transformer.width, max(transformer.layers, 1)
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for linear in (block.attn.in_proj, block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj):
            nn.init.zeros_(linear.bias)


def set_requires_grad(params: object, flag: bool) -> None:
    """Set ``requires_grad`` on a Parameter, a Module, or a nested list of them."""
    if isinstance(params, nn.Parameter):
        params.requires_grad_(flag)
    elif isinstance(params, nn.Module):
        for p in params.parameters():
            p.requires_grad_(flag)
    elif isinstance(params, (list, tuple)):
        for item in params:
            set_requires_grad(item, flag)


def lock_groups(tower: nn.Module, groups: list, unlocked_groups: int) -> None:
    """Freeze a tower except its last ``unlocked_groups`` groups (LiT-style locking)."""
    set_requires_grad(tower, False)
    if unlocked_groups > 0:
        set_requires_grad(groups[-unlocked_groups:], True)


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``[B, Lq, E]`` to a context ``[B, Lk, C]`` via SDPA.

    Separate ``q_proj``/``k_proj``/``v_proj`` linears because the context width may differ from
    the query width (CoCa's pooler reads ViT tokens of the tower's width into ``embed_dim``
    queries); open_clip's ``nn.MultiheadAttention`` weights are split into them on load.
    """

    def __init__(self, width: int, heads: int, context_width: int | None = None) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        context_width = context_width or width
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(context_width, width)
        self.v_proj = nn.Linear(context_width, width)
        self.out_proj = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, E]`` -> ``[B, H, L, E/H]``."""
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def project_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, Lk, D]`` of a context: computed once and reused when decoding."""
        return self.split_heads(self.k_proj(context)), self.split_heads(self.v_proj(context))

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        batch, length, width = queries.shape
        out = F.scaled_dot_product_attention(self.split_heads(self.q_proj(queries)), keys, values)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.attend(queries, *self.project_context(context))


class AttentionalPooler(nn.Module):
    """Learned queries attending over a tower's tokens (CoCa): ``[B, L, C]`` -> ``[B, Q, E]``."""

    def __init__(self, width: int, context_width: int, heads: int = 8, queries: int = 256) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = CrossAttention(width, heads, context_width)
        self.ln_q = LayerNorm(width)
        self.ln_k = LayerNorm(context_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_q(self.query.to(x.dtype))
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), self.ln_k(x))
