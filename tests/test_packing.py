"""Packed text encoding (clipforge.model.packing): every plan equals the plain computation."""

from __future__ import annotations

import pytest
import torch
from realdata import concept, icons

from clipforge.eval.zero_shot import zero_shot_classifier
from clipforge.factory import get_tokenizer
from clipforge.model import packing
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig

LONG = "a photograph of a small brown dog with a red collar running across a wet sandy beach at sunset near the water"


def _model() -> CLIP:
    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=1, head_width=32),
        text=TextConfig(context_length=77, width=96, heads=4, layers=3),
    )
    return CLIP(cfg).eval()


def _captions(n: int) -> list[str]:
    """Real short captions (Adwaita icon names) and one long one, as a user's batch looks."""
    names = [concept(p) for p in icons()[: n - 1]]
    return names[:5] + [LONG] + names[5:]


def _plain(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    model.text.pack = False
    try:
        return model.encode_text(tokens)
    finally:
        model.text.pack = True


@pytest.mark.parametrize("batch", [2, 8, 64])
def test_encode_text_packed_equals_plain(batch):
    model, tok = _model(), get_tokenizer()
    tokens = tok(_captions(batch))
    with torch.inference_mode():
        lengths = (model.text.eot_indices(tokens) + 1).tolist()
        plan = packing.choose(lengths, model.text.width, 3)
        assert plan.kind != "plain"  # one long caption among short ones: worth rearranging
        got, want = model.encode_text(tokens), _plain(model, tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("capacity", [None, 64, 256])
def test_every_packing_and_grouping_equals_plain(capacity):
    model, tok = _model(), get_tokenizer()
    tokens = tok(_captions(24))
    idx = model.text.eot_indices(tokens)
    lengths = (idx + 1).tolist()
    with torch.inference_mode():
        want = _plain(model, tokens)
        rows = packing._packed_rows(lengths, capacity or max(lengths))
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # each caption once
        used = max(sum(lengths[i] for i in r) for r in rows)
        assert used <= (capacity or max(lengths))
        packed = packing._encode_packed(model.text, tokens, idx, rows, used)
        _, groups = packing._sorted_groups(lengths, model.text.width, 3, packing.CALL_TOKENS["cpu"])
        grouped = packing._encode_sorted(model.text, tokens, idx, groups)
    assert torch.allclose(packed, want, atol=1e-5, rtol=0)
    assert torch.allclose(grouped, want, atol=1e-5, rtol=0)


def test_cost_model_keeps_the_plain_batch_when_nothing_is_wasted():
    assert packing.choose([9] * 64, 512, 12).kind == "plain"  # equal lengths: no padding
    assert packing.choose([30], 512, 12).kind == "plain"  # one caption
    plan = packing.choose([7] * 63 + [42], 512, 12)
    assert plan.kind in ("packed", "sorted") and plan.cost < packing.choose([42] * 64, 512, 12).cost
    assert packing.choose([7] * 63 + [42], 512, 12, "cuda").cost > plan.cost  # dearer calls


def test_training_and_hidden_states_are_not_packed():
    model, tok = _model(), get_tokenizer()
    tokens = tok(_captions(16))
    model.train()
    assert torch.equal(model.encode_text(tokens), _plain(model, tokens))  # bit for bit
    model.eval()
    with torch.inference_mode():
        hidden = model.text.forward_hidden(tokens)
        model.text.pack = False
        plain_hidden = model.text.forward_hidden(tokens)
        model.text.pack = True
        packed = model.encode_text(tokens)
    assert all(torch.equal(a, b) for a, b in zip(hidden.hidden_states, plain_hidden.hidden_states))
    assert torch.allclose(hidden.pooled, packed, atol=1e-5, rtol=0)


def test_zero_shot_classifier_packed_equals_plain():
    model, tok = _model(), get_tokenizer()
    classes = [concept(p) for p in icons()[:12]]
    got = zero_shot_classifier(model, tok, classes, templates="imagenet", batch_size=96)
    model.text.pack = False
    want = zero_shot_classifier(model, tok, classes, templates="imagenet", batch_size=96)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
