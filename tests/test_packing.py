"""Packed text encoding (clipforge.model.packing): every plan equals the plain computation."""

from __future__ import annotations

import copy

import pytest
import torch
from realdata import concept, icons

from clipforge.eval.zero_shot import zero_shot_classifier
from clipforge.factory import get_tokenizer
from clipforge.inference import optimize_for_inference
from clipforge.model import packing, prepack
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


def _prepack_off(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    model.text.prepack = False
    try:
        return model.encode_text(tokens)
    finally:
        model.text.prepack = True


@pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN prepacked linear")
@pytest.mark.parametrize("batch", [1, 2, 24])
def test_prepacked_weights_equal_the_modules(batch):
    """Batch 1 (the lean last-position path), packed rows and sorted groups, with and without
    oneDNN-prepacked weights; the packed copies are made once and reused."""
    model, tok = _model(), get_tokenizer()
    prepack.enable(model)
    tokens = tok(_captions(24))[:batch]
    with torch.inference_mode():
        want = _prepack_off(model, tokens)
        assert model.text.fast_linear() is not None
        got = model.encode_text(tokens)
        cache = model.text.fast_linear()
        assert cache.count == 3 * 4  # in_proj, out_proj, c_fc, c_proj of each block
        again = model.encode_text(tokens)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.equal(again, got)


@pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN prepacked linear")
def test_prepacked_weights_follow_weight_changes_and_stay_out_of_training():
    model, tok = _model(), get_tokenizer()
    prepack.enable(model)
    tokens = tok(_captions(8))
    with torch.inference_mode():
        before = model.encode_text(tokens)
    with torch.no_grad():  # an optimiser step or load_state_dict writes in place like this
        model.text.transformer.resblocks[1].mlp.c_fc.weight.mul_(1.5)
    with torch.inference_mode():
        after = model.encode_text(tokens)
        want = _prepack_off(model, tokens)
    assert (after - before).abs().max() > 1e-3  # the change is seen, not a stale packed copy
    assert torch.allclose(after, want, atol=1e-5, rtol=0)
    model.text.transformer.resblocks[0].attn.in_proj.weight = torch.nn.Parameter(torch.zeros(3 * 96, 96))
    with torch.inference_mode():
        assert torch.allclose(model.encode_text(tokens), _prepack_off(model, tokens), atol=1e-5, rtol=0)
    assert model.text.fast_linear() is None  # grad mode: the modules themselves
    with torch.inference_mode():
        model.train()
        assert model.text.fast_linear() is None
        model.eval()
        want = model.encode_text(tokens)
    with torch.no_grad():
        twin = copy.deepcopy(model)  # the packed copies live outside the module, not in the copy
        assert torch.allclose(twin.encode_text(tokens), want, atol=1e-6, rtol=0)
    with torch.inference_mode():  # weights made here are inference tensors: never packed
        twin = copy.deepcopy(model)
        assert torch.allclose(twin.encode_text(tokens), want, atol=1e-5, rtol=0)
        assert twin.text.fast_linear().count == 0


@pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN prepacked linear")
def test_prepacking_is_off_unless_the_weights_owner_turns_it_on():
    """A write through ``.data`` moves no version counter, so a model the user holds is never
    prepacked outside one evaluation; optimize_for_inference's model is, until ``forget``."""
    model, tok = _model(), get_tokenizer()
    tokens = tok(_captions(8))
    with torch.inference_mode():
        assert model.text.fast_linear() is None  # off by default
    classes = [concept(p) for p in icons()[:4]]
    before = zero_shot_classifier(model, tok, classes, templates="simple")
    with torch.inference_mode():
        assert not model.text.prepack and model.text.fast_linear() is None  # off again after it
    model.text.transformer.resblocks[1].mlp.c_fc.weight.data.mul_(1.5)  # no version bump
    after = zero_shot_classifier(model, tok, classes, templates="simple")  # a fresh evaluation
    assert (after - before).abs().max() > 1e-3
    with torch.inference_mode():
        assert torch.allclose(after, zero_shot_classifier(model, tok, classes, templates="simple"))
        fast = optimize_for_inference(model)
        assert fast.text.prepack and fast.visual.prepack and not model.text.prepack
        first = fast.encode_text(tokens)
        fast.text.transformer.resblocks[0].attn.in_proj.weight.data.mul_(0.5)
        prepack.forget(fast)
        assert fast.text.fast_linear().count == 0
        changed = fast.encode_text(tokens)
        fast.text.prepack = False
        plain = fast.encode_text(tokens)
    assert (changed - first).abs().max() > 1e-3
    assert torch.allclose(changed, plain, atol=1e-5, rtol=0)


@pytest.mark.skipif(not prepack.available(), reason="this PyTorch build has no oneDNN prepacked linear")
def test_vit_prepacked_weights_equal_the_modules():
    """The image tower's class-token path on prepacked weights: same features, only without
    autograd, and a weight change is seen."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, head_width=32),
        text=TextConfig(context_length=77, width=64, heads=2, layers=1),
    )
    model = CLIP(cfg).eval()
    prepack.enable(model)
    images = torch.randn(5, 3, 32, 32)
    visual = model.visual
    with torch.inference_mode():
        model.encode_image(torch.randn(16, 3, 32, 32))  # 16 x 17 rows > SMALL_ROWS: F.linear is faster
        assert prepack.linear_for(visual, visual.proj).count == 0
        visual.prepack = False
        want = model.encode_image(images)
        assert prepack.linear_for(visual, visual.proj) is None
        visual.prepack = True
        got = model.encode_image(images)
        assert prepack.linear_for(visual, visual.proj).count == 3 * 4
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert prepack.linear_for(visual, visual.proj) is None  # autograd on: the modules themselves
    with torch.no_grad():
        visual.transformer.resblocks[2].mlp.c_proj.weight.mul_(2.0)
        changed = model.encode_image(images)
        visual.prepack = False
        plain = model.encode_image(images)
    assert (changed - got).abs().max() > 1e-3
    assert torch.allclose(changed, plain, atol=1e-5, rtol=0)
