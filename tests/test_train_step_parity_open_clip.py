"""A few training steps on the same batches: clipforge's loss, optimiser and temperature clamp vs
open_clip_train's (open_clip's ``ClipLoss``, ``torch.optim.AdamW`` with its weight-decay rule).

Why: the real-PNG benchmark (``benchmarks/train_throughput.py --real icons``) compares the two
trainers from the same initial weights; what may then differ is only the data order and the
augmentation draws. This checks the rest (loss, gradients, AdamW groups and arithmetic, clamp)
step by step on identical inputs, with a large learning rate and weight decay so that a wrong
group or update shows up in the features. open_clip is the test oracle only.
"""

from __future__ import annotations

import math

import pytest
import torch

from clipforge.checkpoints.open_clip import clipforge_to_open_clip
from clipforge.checkpoints.open_clip_config import config_to_open_clip
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config
from clipforge.train.optim import build_optimizer
from clipforge.train.task import build_loss

open_clip = pytest.importorskip("open_clip")

LR, WD, STEPS = 1e-2, 0.2, 4


def _oc_exempt(name: str, p: torch.Tensor) -> bool:
    """open_clip_train's ``main.py`` rule, written out here as the oracle."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def _pair(seed: int = 0) -> tuple[CLIP, torch.nn.Module]:
    cfg = get_model_config("tiny-vit").replace(text={"vocab_size": 1000, "context_length": 16})
    torch.manual_seed(seed)
    ours = CLIP(cfg)
    theirs = open_clip.model.CLIP(**config_to_open_clip(cfg))
    sd = clipforge_to_open_clip({k: v.detach() for k, v in ours.state_dict().items()})
    theirs.load_state_dict(sd, strict=True)
    return ours, theirs


def _batches(n: int, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    out = []
    for _ in range(n):
        images = torch.randn(16, 3, size, size, generator=g)
        tokens = torch.zeros(16, ctx, dtype=torch.long)
        for i in range(16):
            length = int(torch.randint(3, ctx, (1,), generator=g))
            tokens[i, :length] = torch.randint(1, 998, (length,), generator=g)
            tokens[i, length - 1] = 999  # the highest id: where argmax pooling reads
        out.append((images, tokens))
    return out


def _train(ours: CLIP, theirs: torch.nn.Module, groups: str) -> list[tuple[float, float]]:
    """``STEPS`` steps of both; the two losses of every step."""
    opt_c = build_optimizer(ours, LR, WD, (0.9, 0.98), 1e-6, groups=groups)
    named = list(theirs.named_parameters())
    opt_o = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if _oc_exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not _oc_exempt(n, p)], "weight_decay": WD},
        ],
        lr=LR,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_c, loss_o = build_loss("clip"), open_clip.loss.ClipLoss()
    losses = []
    for images, tokens in _batches(STEPS, ours.config):
        opt_c.zero_grad()
        opt_o.zero_grad()
        lc = loss_c(
            ours.encode_image(images, normalize=True),
            ours.encode_text(tokens, normalize=True),
            ours.logit_scale.exp(),
        )
        image_f, text_f, scale = theirs(images, tokens)[:3]
        lo = loss_o(image_f, text_f, scale)
        lc.backward()
        lo.backward()
        opt_c.step()
        opt_o.step()
        with torch.no_grad():
            ours.logit_scale.clamp_(0, math.log(100))
            theirs.logit_scale.clamp_(0, math.log(100))
        losses.append((lc.item(), lo.item()))
    return losses


def _feature_gap(ours: CLIP, theirs: torch.nn.Module) -> float:
    images, tokens = _batches(1, ours.config)[0]
    with torch.no_grad():
        a = (ours.encode_image(images, normalize=True) - theirs.encode_image(images, normalize=True)).abs()
        b = (ours.encode_text(tokens, normalize=True) - theirs.encode_text(tokens, normalize=True)).abs()
    return max(a.max().item(), b.max().item())


def test_open_clip_groups_train_like_open_clip_train_step_by_step():
    ours, theirs = _pair()
    assert _feature_gap(ours, theirs) < 1e-6  # same start
    losses = _train(ours, theirs, "open_clip")
    for step, (lc, lo) in enumerate(losses):
        assert abs(lc - lo) < 1e-5 * max(1.0, abs(lo)), (step, lc, lo)
    assert losses[-1][0] < losses[0][0] - 0.05  # the steps did train (not a no-op comparison)
    assert _feature_gap(ours, theirs) < 5e-5  # fused vs foreach AdamW rounding: ~1.3e-5
    assert abs(ours.logit_scale.item() - theirs.logit_scale.item()) < 1e-6


def test_the_comparison_detects_another_weight_decay_rule():
    """Negative control: clipforge's own groups (embedding tables not decayed) drift apart from
    open_clip_train's within the same few steps, so the tolerance above can fail."""
    ours, theirs = _pair()
    _train(ours, theirs, "clipforge")
    assert _feature_gap(ours, theirs) > 1.5e-4  # ~2.9e-4: 20x the gap of the same rule
