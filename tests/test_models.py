"""Model modules: registry-driven shape/gradient tests at tiny sizes, plus the tower contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.model.build import build_model
from clipforge.model.clip import CLIP, CLIPOutput
from clipforge.model.config import CLIPConfig
from clipforge.model.layers import LayerNorm, PatchDropout
from clipforge.model.registry import get_model_config, has_builtin_towers, list_models
from clipforge.model.stats import count_params, gflops

EOT = 49407
ALL_MODELS = [n for n in list_models() if has_builtin_towers(n)]  # timm/HF towers: test_zoo_registry.py
FULL_MODELS = [n for n in ALL_MODELS if not n.startswith("tiny")]


def tiny_variant(cfg: CLIPConfig) -> CLIPConfig:
    """Same structure (tower type, patch size, mlp ratio, layer scale, stage count), tiny widths."""
    v = cfg.vision
    if v.is_resnet:
        vision = {"width": 8, "layers": tuple(min(d, 2) for d in v.layers), "image_size": 64}
    else:
        vision = {"width": 64, "head_width": 32, "layers": 2, "image_size": 2 * v.patch_size}
    text = {"width": 32, "heads": 2, "layers": 2, "vocab_size": 50000}
    if cfg.multimodal is not None:  # CoCa: the decoder has embed_dim channels and the text vocabulary
        decoder = {"width": 32, "heads": 2, "layers": 2, "vocab_size": 50000}
        return cfg.replace(embed_dim=32, vision=vision, text=text, multimodal=decoder)
    return cfg.replace(embed_dim=32, vision=vision, text=text)


def make_tokens(batch: int, lengths: list[int], context: int = 77, seed: int = 0) -> torch.Tensor:
    """SOT, random ids, EOT at ``length - 1``, zero padding (like the CLIP tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0] = 49406
        tokens[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tokens[i, n - 1] = EOT
    return tokens


def build(name: str, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    cfg = get_model_config(name)
    if not name.startswith("tiny"):  # registered tiny entries are already small
        cfg = tiny_variant(cfg)
    return build_model(cfg)


def images_for(model: CLIP, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = model.config.vision.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_architecture_forward_backward(name: str) -> None:
    model = build(name)
    images, tokens = images_for(model), make_tokens(2, [5, 12], context=model.context_length)
    if model.config.text.pool_type == "eos":  # the tower's tokenizer ends captions with its own id
        tokens[tokens == EOT] = model.config.text.eos_id
    out = model(images, tokens)
    assert isinstance(out, CLIPOutput)
    embed = model.config.embed_dim
    assert out.image_features.shape == (2, embed) and out.text_features.shape == (2, embed)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.text_features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.isfinite(out.image_features).all() and torch.isfinite(out.text_features).all()
    assert out.logit_scale.item() == pytest.approx(math.exp(model.config.init_logit_scale), rel=1e-5)
    assert (out.logit_bias is None) == (model.config.init_logit_bias is None)

    raw = model.encode_image(images)
    assert raw.shape == (2, embed) and not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    logits = out.logit_scale * out.image_features @ out.text_features.T
    F.cross_entropy(logits, torch.arange(2)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for key in ("text.token_embedding.weight", "logit_scale"):
        assert grads[key] is not None and grads[key].abs().sum() > 0
    image_grads = [g for n, g in grads.items() if n.startswith("visual.") and g is not None]
    assert image_grads and sum(g.abs().sum() for g in image_grads) > 0


def test_state_dict_key_contract() -> None:
    vit = CLIP(get_model_config("tiny-vit").replace(vision={"ls_init_value": 0.1})).state_dict()
    for key in (
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.0.attn.in_proj.weight",
        "visual.transformer.resblocks.1.attn.out_proj.bias",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "visual.transformer.resblocks.0.mlp.c_proj.bias",
        "visual.transformer.resblocks.0.ls_1.gamma",
        "visual.ln_post.bias",
        "visual.proj",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "text.transformer.resblocks.1.ln_2.weight",
        "text.ln_final.weight",
        "text.text_projection",
        "logit_scale",
    ):
        assert key in vit, key
    assert "visual.conv1.bias" not in vit and not any("attn_mask" in k for k in vit)
    assert vit["logit_scale"].shape == () and vit[
        "visual.transformer.resblocks.0.attn.in_proj.weight"
    ].shape == (192, 64)
    rn = CLIP(get_model_config("tiny-rn")).state_dict()
    for key in ("visual.conv3.weight", "visual.bn3.running_var", "visual.layer2.0.downsample.0.weight",
                "visual.layer4.0.downsample.1.bias", "visual.attnpool.positional_embedding",
                "visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.bias"):  # fmt: skip
        assert key in rn, key
    siglip = CLIP(get_model_config("tiny-vit-siglip")).state_dict()
    assert siglip["logit_bias"].shape == () and siglip["logit_bias"].item() == -10.0


def test_published_parameter_counts() -> None:
    """Full-size models on the meta device: totals as published for OpenAI's CLIP."""
    expected = {"ViT-B-32": 151.28, "RN50": 102.01, "ViT-L-14": 427.62, "ViT-bigG-14": 2539.57}
    for name, millions in expected.items():
        assert count_params(get_model_config(name))[2] / 1e6 == pytest.approx(millions, abs=0.01), name


def test_gflops_formula_matches_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    for name in ("ViT-B-32", "RN50", "tiny-vit", "tiny-rn"):
        cfg = get_model_config(name)
        with torch.device("meta"):
            model = CLIP(cfg).eval()
            model.text.trim = False
            size = cfg.vision.image_size
            image_in = torch.empty(1, 3, size, size)
            # The published convention counts every token through every block; encode_image on a
            # ViT skips the last block's non-class tokens, so count the full path and check that
            # the shortcut really does less work.
            full_path = getattr(model.visual, "forward_tokens", model.visual)
            with FlopCounterMode(display=False) as image_counter:
                full_path(image_in)
            with FlopCounterMode(display=False) as fast_counter:
                model.encode_image(image_in)
            if cfg.vision.is_resnet:
                assert fast_counter.get_total_flops() == image_counter.get_total_flops(), name
            else:
                assert fast_counter.get_total_flops() < image_counter.get_total_flops(), name
            with FlopCounterMode(display=False) as text_counter:
                model.text.forward_hidden(torch.zeros(1, cfg.text.context_length, dtype=torch.long))
        image, text = gflops(cfg)
        assert image == pytest.approx(image_counter.get_total_flops() / 2e9, rel=1e-9), name
        assert text == pytest.approx(text_counter.get_total_flops() / 2e9, rel=1e-9), name
    assert gflops(get_model_config("ViT-B-32"))[0] == pytest.approx(4.41, abs=0.01)


def test_forward_hidden_outputs() -> None:
    model = build("tiny-vit").eval()
    tokens = make_tokens(3, [4, 9, 20])
    with torch.no_grad():
        out = model.text.forward_hidden(tokens)
        layers = model.config.text.layers
        assert len(out.hidden_states) == layers + 1 and out.last_hidden.shape == (3, 20, 64)
        x = model.text.embed(tokens[:, :20])
        assert torch.allclose(out.hidden_states[0], x)
        penultimate = model.text.transformer(x, is_causal=True, num_layers=layers - 1)
        assert torch.allclose(out.penultimate, penultimate, atol=1e-6)
        assert torch.allclose(out.penultimate, out.hidden_states[-2])
        assert torch.allclose(out.last_hidden, model.text.ln_final(out.hidden_states[-1]), atol=1e-6)
        assert torch.allclose(out.pooled, model.encode_text(tokens), atol=1e-6)

        full = model.text.forward_hidden(tokens, pad_to_context=True)
        model.text.trim = False
        untrimmed = model.text.forward_hidden(tokens)
        assert full.last_hidden.shape == (3, 77, 64)
        assert torch.allclose(full.last_hidden, untrimmed.last_hidden, atol=1e-6)
        assert torch.allclose(full.penultimate[:, :20], out.penultimate, atol=1e-5)
        short = model.text.forward_hidden(tokens[:, :25], pad_to_context=True)
        assert torch.allclose(short.last_hidden, untrimmed.last_hidden, atol=1e-6)


def test_causal_tokens_after_eot_do_not_matter() -> None:
    model = build("tiny-vit").eval()
    tokens = make_tokens(2, [6, 10])
    noisy = tokens.clone()
    noisy[0, 6:] = torch.randint(1, 1000, (71,))
    noisy[1, 10:30] = 7
    model.text.trim = False  # without trimming, the noise really goes through the transformer
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens), model.encode_text(noisy), atol=1e-6)
        changed = tokens.clone()
        changed[0, 2] = 123  # a token before EOT does matter
        assert not torch.allclose(model.encode_text(tokens)[0], model.encode_text(changed)[0], atol=1e-4)


@pytest.mark.parametrize("pool_type", ["argmax", "first", "last"])
def test_trimmed_text_equals_full_run(pool_type: str) -> None:
    model = build("tiny-vit").eval()
    model.text.pool_type = pool_type
    tokens = make_tokens(4, [3, 17, 8, 40])
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        model.text.trim = False
        full = model.encode_text(tokens)
    assert (trimmed - full).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_grad_checkpointing_gives_identical_grads(name: str) -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build(name, seed=3)
        model.set_grad_checkpointing(checkpointing)
        out = model(images_for(model), make_tokens(2, [5, 9]))
        (out.image_features @ out.text_features.T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for key in plain:
        assert torch.allclose(plain[key], ckpt[key], atol=1e-6), key


def test_lock_freezes_parameters() -> None:
    model = build("tiny-vit")
    model.lock_image_tower()
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.text.parameters())
    model.lock_image_tower(unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}
    model.lock_image_tower(unlocked_groups=2)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert "ln_post.weight" in trainable and "transformer.resblocks.1.mlp.c_fc.weight" in trainable
    assert "transformer.resblocks.0.mlp.c_fc.weight" not in trainable
    model.lock_text_tower(unlocked_groups=1)
    assert {n for n, p in model.text.named_parameters() if p.requires_grad} == {"text_projection"}


def test_resnet_lock_freezes_batchnorm_stats() -> None:
    model = build("tiny-rn")
    model.lock_image_tower(freeze_bn_stats=True)
    model.train()
    assert not any(p.requires_grad for p in model.visual.parameters())
    bn = model.visual.layer1[0].bn1
    assert not bn.training
    before = bn.running_mean.clone()
    model.encode_image(images_for(model))
    assert torch.equal(before, bn.running_mean)


def test_no_weight_decay_names_exist() -> None:
    for name in ("tiny-vit", "tiny-rn", "tiny-vit-siglip"):
        model = build(name)
        names = dict(model.named_parameters())
        nwd = model.no_weight_decay()
        assert {"logit_scale", "text.positional_embedding"} <= nwd
        assert nwd <= set(names), nwd - set(names)


def test_patch_dropout_keeps_class_token() -> None:
    torch.manual_seed(0)
    drop = PatchDropout(0.5)
    x = torch.randn(2, 17, 8)
    y = drop(x)
    assert y.shape == (2, 9, 8) and torch.equal(y[:, 0], x[:, 0])
    assert all(
        any(torch.equal(y[b, i], x[b, j]) for j in range(1, 17)) for b in range(2) for i in range(1, 9)
    )
    drop.eval()
    assert drop(x) is x
    model = CLIP(get_model_config("tiny-vit").replace(vision={"patch_dropout": 0.5}))
    model.train()
    assert model.visual.embed(images_for(model)).shape[1] == 1 + 8


def test_layernorm_computes_in_float32() -> None:
    torch.manual_seed(0)
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(4, 16) * 100 + 50
    ref = ln(x)
    out = ln.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05


def test_intermediates_and_tokens() -> None:
    vit = build("tiny-vit").eval()
    images = images_for(vit)
    with torch.no_grad():
        out = vit.visual.forward_intermediates(images, indices=[0, -1])
        assert len(out.intermediates) == 2 and out.intermediates[0].shape == (2, 17, 64)
        assert torch.allclose(out.pooled, vit.encode_image(images), atol=1e-6)
        assert vit.visual.forward_tokens(images).tokens.shape == (2, 16, 64)
    rn = build("tiny-rn").eval()
    with torch.no_grad():
        out = rn.visual.forward_intermediates(images_for(rn), indices=2)
        assert [t.shape[1] for t in out.intermediates] == [256, 512]
        assert torch.allclose(out.pooled, rn.encode_image(images_for(rn)), atol=1e-6)


def test_vit_pool_variants() -> None:
    images = None
    results = {}
    for variant in (
        {"pool_type": "tok"},
        {"pool_type": "avg"},
        {"final_ln_after_pool": True},
        {"no_ln_pre": True},
    ):
        torch.manual_seed(0)
        model = CLIP(get_model_config("tiny-vit").replace(vision=variant)).eval()
        images = images_for(model) if images is None else images
        with torch.no_grad():
            results[str(variant)] = model.encode_image(images)
    values = list(results.values())
    assert all(v.shape == (2, 64) and torch.isfinite(v).all() for v in values)
    assert not torch.allclose(values[0], values[1])


def test_timm_image_tower() -> None:
    pytest.importorskip("timm")
    cfg = get_model_config("tiny-vit").replace(vision={"timm_model_name": "test_vit", "image_size": 160})
    torch.manual_seed(0)
    model = CLIP(cfg)
    out = model(torch.randn(2, 3, 160, 160), make_tokens(2, [4, 6]))
    assert out.image_features.shape == (2, 64)
    assert "visual.head.proj.weight" in model.state_dict()
    model.lock_image_tower()
    assert not any(p.requires_grad for p in model.visual.trunk.parameters())


def test_hf_text_tower(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = CLIP(get_model_config("tiny-vit").replace(text={"hf_model_name": str(tmp_path)})).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    feats = model.encode_text(tokens, normalize=True)
    assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    hidden = model.text.forward_hidden(tokens)
    assert len(hidden.hidden_states) == 3 and torch.allclose(
        hidden.pooled, model.encode_text(tokens), atol=1e-6
    )
    model.lock_text_tower(unlocked_groups=1)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert "proj.weight" in trainable and any(".layer.1." in n for n in trainable)
    assert not any(".layer.0." in n for n in trainable)


def test_models_command_prints_table(capsys) -> None:
    from clipforge.cli import main

    assert main(["models", "--filter", "ViT-B-32"]) == 0
    out = capsys.readouterr().out.splitlines()
    # --filter is a substring: coca_ViT-B-32 is listed too (the towers only: its decoder is extra).
    listed = [line.split()[0] for line in out[1:]]
    assert out[0].split()[0] == "model" and listed[0] == "ViT-B-32" and "coca_ViT-B-32" in listed
    assert all("vit-b-32" in n.lower() for n in listed)
    fields = out[1].split()
    assert fields[0] == "ViT-B-32"
    assert float(fields[1]) + float(fields[2]) == pytest.approx(151.28, abs=0.02)
    assert float(fields[3]) == pytest.approx(4.41, abs=0.01) and fields[5:] == [
        "512",
        "224",
        "vit",
        "+",
        "text",
    ]
