"""Token-level text conditioning: layer choice, final LN, padding conventions, parity with HF."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_clip_model

from clipforge.conditioning import CONVENTIONS, encode_text_for_conditioning
from clipforge.errors import ConfigError
from clipforge.factory import create_model, get_tokenizer

TEXTS = ["a photo of a dog", "an oil painting of a lighthouse at dusk, highly detailed"]
TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("tiny-vit").eval()
    with torch.no_grad():  # non-trivial LayerNorm so "with/without ln_final" differ visibly
        m.text.ln_final.weight.add_(torch.randn_like(m.text.ln_final.weight) * 0.2)
        m.text.ln_final.bias.add_(torch.randn_like(m.text.ln_final.bias) * 0.2)
    return m


@pytest.fixture(scope="module")
def tokenizer(model):
    return get_tokenizer(model)


def _reference(model, tokens):
    with torch.no_grad():
        return model.text.forward_hidden(tokens, pad_to_context=True)


def test_shapes_and_pooled_matches_encode_text(model, tokenizer):
    with torch.no_grad():
        out = encode_text_for_conditioning(model, tokenizer, TEXTS)
        pooled = model.encode_text(tokenizer(TEXTS))
    width, ctx = model.config.text.width, model.config.text.context_length
    assert out.hidden.shape == (2, ctx, width)
    assert out.pooled.shape == (2, model.config.embed_dim)
    assert out.tokens.shape == (2, ctx)
    assert torch.allclose(out.pooled, pooled, atol=TOL)
    assert out.eot_index.tolist() == tokenizer(TEXTS).argmax(-1).tolist()


def test_layers_equal_forward_hidden(model, tokenizer):
    tokens = tokenizer(TEXTS)
    ref = _reference(model, tokens)
    with torch.no_grad():
        last = encode_text_for_conditioning(model, tokenizer, TEXTS, "last")
        last_raw = encode_text_for_conditioning(model, tokenizer, TEXTS, "last", apply_final_ln=False)
        pen = encode_text_for_conditioning(model, tokenizer, TEXTS, "penultimate")
        pen_ln = encode_text_for_conditioning(model, tokenizer, TEXTS, "penultimate", apply_final_ln=True)
        by_index = encode_text_for_conditioning(model, tokenizer, TEXTS, -2)
        embeddings = encode_text_for_conditioning(model, tokenizer, TEXTS, 0)
    assert torch.equal(last.hidden, ref.last_hidden)
    assert torch.equal(last_raw.hidden, ref.hidden_states[-1])
    assert torch.equal(pen.hidden, ref.hidden_states[-2])
    assert torch.equal(pen.hidden, ref.penultimate)
    assert torch.allclose(pen_ln.hidden, model.text.ln_final(ref.hidden_states[-2]), atol=TOL)
    assert torch.equal(by_index.hidden, pen.hidden)
    assert torch.allclose(embeddings.hidden, model.text.embed(tokens), atol=TOL)
    assert not torch.allclose(pen.hidden, pen_ln.hidden, atol=1e-3)  # the LN flag does something


def test_conventions(model, tokenizer):
    with torch.no_grad():
        sd1 = encode_text_for_conditioning(model, tokenizer, TEXTS, convention="sd1")
        sd2 = encode_text_for_conditioning(model, tokenizer, TEXTS, convention="sd2")
        sdxl = encode_text_for_conditioning(model, tokenizer, TEXTS, convention="sdxl-openclip")
        eot_padded = tokenizer(TEXTS)
        for row, eot in enumerate(eot_padded.argmax(-1).tolist()):
            eot_padded[row, eot + 1 :] = tokenizer.eot_token_id
        ref_sd1 = _reference(model, eot_padded)
        ref = _reference(model, tokenizer(TEXTS))
    assert set(CONVENTIONS) >= {"sd1", "sd2", "sdxl-clip-l", "sdxl-openclip"}
    assert torch.equal(sd1.tokens, eot_padded)
    assert torch.equal(sd1.hidden, ref_sd1.last_hidden)
    assert torch.allclose(sd2.hidden, model.text.ln_final(ref.hidden_states[-2]), atol=TOL)
    assert torch.equal(sdxl.hidden, ref.hidden_states[-2])
    # The causal mask: padding changes only positions after EOT.
    diff = (sd1.hidden - ref.last_hidden).abs().amax(-1)
    for row, eot in enumerate(sd1.eot_index.tolist()):
        assert diff[row, : eot + 1].max() < TOL
        assert diff[row, eot + 1 :].max() > 1e-4
    # Explicit arguments override the preset.
    with torch.no_grad():
        override = encode_text_for_conditioning(
            model, tokenizer, TEXTS, apply_final_ln=False, convention="sd2"
        )
    assert torch.equal(override.hidden, ref.hidden_states[-2])


def test_token_tensor_input_text_tower_and_normalize(model, tokenizer):
    tokens = tokenizer(TEXTS)[:, :20]  # short rows are padded to the context length
    with torch.no_grad():
        out = encode_text_for_conditioning(model.text, None, tokens, normalize_pooled=True)
    assert out.hidden.shape[1] == model.config.text.context_length
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_gradients_flow_when_not_frozen(model, tokenizer):
    out = encode_text_for_conditioning(model, tokenizer, TEXTS[:1], "penultimate")
    out.hidden.sum().backward()
    grad = model.text.token_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"layer": "middle"}, {"layer": 99}, {"convention": "sd9"}, {"pad": "zero"}, {"layer": True}],
)
def test_bad_arguments_raise(model, tokenizer, kwargs):
    with pytest.raises(ConfigError):
        encode_text_for_conditioning(model, tokenizer, TEXTS, **kwargs)


def test_strings_without_tokenizer_raise(model):
    with pytest.raises(ConfigError, match="tokenizer"):
        encode_text_for_conditioning(model, None, TEXTS)


# --- parity with transformers.CLIPTextModel ----------------------------------------------------
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF CLIPModel and the clipforge model loaded from its saved folder."""
    pytest.importorskip("transformers")
    hf = hf_clip_model(text_layers=3, vision_layers=1)
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder)
    return hf, create_model(None, pretrained=folder).eval()


@pytest.mark.parametrize("pad", [None, "eot"])
def test_parity_with_hf_clip_text_model(hf_pair, pad):
    hf, model = hf_pair
    tokenizer = get_tokenizer(model)
    with torch.no_grad():
        last = encode_text_for_conditioning(model, tokenizer, TEXTS, "last", pad=pad)
        pen = encode_text_for_conditioning(model, tokenizer, TEXTS, "penultimate", pad=pad)
        ref = hf.text_model(input_ids=last.tokens, output_hidden_states=True)
        text_embeds = hf.text_projection(ref.pooler_output)
    assert torch.equal(pen.tokens, last.tokens)
    assert len(ref.hidden_states) == 4  # embeddings + 3 blocks
    assert (last.hidden - ref.last_hidden_state).abs().max() < TOL
    assert (pen.hidden - ref.hidden_states[-2]).abs().max() < TOL
    assert (last.pooled - text_embeds).abs().max() < TOL
