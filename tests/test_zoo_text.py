"""Text towers of open_clip's model zoo against open_clip itself (test-only oracle), random weights.

Each tower is built by ``open_clip.create_model(name)`` from open_clip's own config (widths shrunk
where noted, one SigLIP tower at full size; the image tower swapped for a tiny ViT, which these
tests do not read) and by clipforge from ``config_from_open_clip`` of the same config. open_clip's
text weights, every 1-d parameter moved away from its 1/0 initialisation, are loaded strictly and
``encode_text`` is compared on token batches shaped like tokenized captions: varied lengths,
padding after the end token, one row truncated at the context length.

Hugging Face towers use tiny configs saved with ``save_pretrained`` into ``tmp_path``;
``hf_model_name`` points both libraries at that folder, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints.open_clip import open_clip_to_clipforge
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.conditioning import encode_text_for_conditioning
from clipforge.errors import ConfigError
from clipforge.model.clip import build_text_tower
from clipforge.model.config import CLIPConfig, TextConfig

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
TINY_VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 32}
#: Caption lengths in tokens, start and end tokens included; 999 = longer than the context.
LENGTHS = (7, 12, 5, 999, 23, 9, 16, 3)
#: Per tokenizer family: (start id or None, end id, pad id, lowest ordinary id).
CLIP_BPE = (49406, 49407, 0, 256)
SIGLIP_SP = (None, 1, 1, 3)  # SigLIP's sentencepiece: no BOS, pads with </s>
GEMMA_SP = (2, 1, 0, 3)  # SigLIP 2's Gemma tokenizer: <bos> ... <eos>, <pad> = 0


def captions(context: int, vocab: int, family: tuple, seed: int = 0, lengths=LENGTHS) -> torch.Tensor:
    """``[len(lengths), context]`` ids laid out as the family's tokenizer lays out captions."""
    sot, eot, pad, low = family
    g = torch.Generator().manual_seed(seed)
    high = min(vocab, 49000) if family is CLIP_BPE else vocab  # CLIP's EOT must stay the highest id
    rows = torch.full((len(lengths), context), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        n = min(n, context)
        ids = torch.randint(low, high, (n,), generator=g)
        if sot is not None:
            ids[0] = sot
        ids[-1] = eot
        rows[i, :n] = ids
    return rows


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """LayerNorm scales and every bias away from 1 / 0, so a dropped one cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 and not name.endswith(("logit_scale", "logit_bias")):
                base = 1.0 if name.endswith(("weight", "gamma")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def zoo_cfg(name: str, text: dict | None = None, **top) -> dict:
    """open_clip's config for ``name`` with text overrides and the tiny image tower."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["text_cfg"].update(text or {})
    cfg["vision_cfg"] = dict(TINY_VISION)
    cfg.update(top)
    return cfg


def build_pair(name: str, cfg: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(open_clip model, clipforge text tower holding the same weights, loaded strictly)."""
    overrides = {k: cfg[k] for k in ("vision_cfg", "text_cfg", "embed_dim")}
    torch.manual_seed(0)  # open_clip initialises from the global generator
    oc = randomize_(open_clip.create_model(name, pretrained_hf=False, **overrides))
    config = config_from_open_clip(cfg, source=name)
    meta = not config.text.hf_model_name  # HF modules are built for real (their init needs data)
    with torch.device("meta" if meta else "cpu"):
        tower = build_text_tower(config.text, config.embed_dim, config.quick_gelu)
    sd = open_clip_to_clipforge(oc.state_dict())
    text_sd = {k.removeprefix("text."): v for k, v in sd.items() if k.startswith("text.")}
    tower.load_state_dict(text_sd, strict=True, assign=meta)
    return oc, tower.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# --- built-in text transformer ------------------------------------------------------------------
SMALL = {"width": 64, "heads": 4, "layers": 2}
ZOO = {
    # name: (text overrides, top-level overrides, tokenizer family)
    "ViT-B-16-SigLIP": ({}, {}, SIGLIP_SP),  # full size: 12 x 768, bidirectional, last, Linear proj
    "ViT-B-16-SigLIP2": (SMALL, {}, GEMMA_SP),  # + GELU tanh
    "MobileCLIP2-S0": (SMALL, {}, CLIP_BPE),  # bidirectional with argmax pooling
    "PE-Core-B-16": (SMALL, {}, CLIP_BPE),  # causal, context 32
    "EVA02-B-16": (SMALL, {}, CLIP_BPE),  # causal
    "ViT-H-14-worldwide": ({**SMALL, "vocab_size": 32000}, {}, (0, 2, 1, 3)),  # eos pooling (XLM-V ids)
    "ViT-SO400M-16-SigLIP-i18n-256": (
        {**SMALL, "vocab_size": 32000},
        {"embed_dim": 64},
        GEMMA_SP,
    ),  # proj none
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_text_tower_matches_open_clip(name: str) -> None:
    text, top, family = ZOO[name]
    cfg = zoo_cfg(name, text, **top)
    oc, tower = build_pair(name, cfg)
    t = cfg["text_cfg"]
    full_size = not text  # a few captions through the 12 x 768 tower: it is the slow one
    tokens = captions(
        t["context_length"], t["vocab_size"], family, lengths=LENGTHS[:4] if full_size else LENGTHS
    )
    with torch.no_grad():
        want = oc.encode_text(tokens)
        diffs = [max_diff(want, tower(tokens))]  # eval: trimmed and packed where exact
        if not full_size:
            tower.pack = tower.trim = False
            diffs += [
                max_diff(want, tower(tokens)),
                max_diff(want, tower.forward_hidden(tokens, True).pooled),
            ]
    print(f"{name}: encode_text max abs diff " + ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) < TOL, diffs
    assert want.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_bidirectional_tower_reads_padding_and_skips_trimming() -> None:
    """SigLIP pools the last position and every token sees the padding: nothing may be trimmed."""
    cfg = zoo_cfg("ViT-B-16-SigLIP2", SMALL)
    oc, tower = build_pair("ViT-B-16-SigLIP2", cfg)
    tokens = captions(64, cfg["text_cfg"]["vocab_size"], GEMMA_SP)
    repadded = tokens.clone()
    repadded[tokens == 0] = 5  # another padding id: a bidirectional tower must see the change
    with torch.no_grad():
        a, b = tower(tokens), tower(repadded)
        assert max_diff(a, b) > 1e-3
        assert max_diff(b, oc.encode_text(repadded)) < TOL
        assert tower.attn_mask is None and tower.forward_hidden(tokens[:, :20]).last_hidden.shape[1] == 20


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP2", "EVA02-B-16"])
def test_token_states_and_conditioning_match_open_clip(name: str) -> None:
    """``forward_hidden``'s last_hidden and conditioning's hidden = open_clip's output tokens."""
    text, top, family = ZOO[name]
    cfg = zoo_cfg(name, text, **top)
    oc, tower = build_pair(name, cfg)
    ctx = cfg["text_cfg"]["context_length"]
    tokens = captions(ctx, cfg["text_cfg"]["vocab_size"], family, seed=3)
    oc.text.output_tokens = True
    with torch.no_grad():
        pooled, states = oc.text(tokens)
        out = tower.forward_hidden(tokens, pad_to_context=True)
        cond = encode_text_for_conditioning(tower, None, tokens)
    assert len(out.hidden_states) == cfg["text_cfg"]["layers"] + 1
    assert max_diff(out.last_hidden, states) < TOL and max_diff(out.pooled, pooled) < TOL
    assert max_diff(cond.hidden, states) < TOL and max_diff(cond.pooled, pooled) < TOL


def small_text(**fields) -> TextConfig:
    return TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1, **fields)


def test_eos_pooling_takes_the_first_eos() -> None:
    tower = build_text_tower(small_text(pool_type="eos", eos_id=2), 32)
    tokens = torch.tensor([[0, 5, 2, 2, 1], [0, 2, 7, 2, 1], [0, 4, 4, 4, 4]])
    assert tower.eot_indices(tokens).tolist() == [2, 1, 0]


def test_trim_length_only_trims_causal_towers() -> None:
    """What callers trimming before the tower (export, benchmarks) may cut: nothing when bidirectional."""
    tokens = torch.tensor([[1, 5, 63, 0, 0, 0, 0, 0], [1, 7, 7, 63, 0, 0, 0, 0]])
    assert build_text_tower(small_text(), 32).trim_length(tokens) == 4
    assert build_text_tower(small_text(no_causal_mask=True, pool_type="last"), 32).trim_length(tokens) == 8


def test_option_errors_name_the_fields() -> None:
    with pytest.raises(ConfigError, match="act_approximate.*quick_gelu"):
        build_text_tower(small_text(act_approximate="tanh"), 32, quick_gelu=True)
    with pytest.raises(ConfigError, match=r"proj_type='none' needs text.width \(32\) == embed_dim \(16\)"):
        build_text_tower(small_text(proj_type="none"), 16)


# --- Hugging Face text towers --------------------------------------------------------------------
def tiny_hf(kind: str, folder: Path) -> Path:
    """A tiny Hugging Face config of ``kind`` saved (config.json only) into ``folder``."""
    common = {"vocab_size": 1000}
    if kind == "xlm-roberta":
        config = transformers.XLMRobertaConfig(
            **common, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )  # fmt: skip
    elif kind == "mt5":
        config = transformers.MT5Config(
            **common, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=2,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )  # fmt: skip
    elif kind == "m2m_100":
        config = transformers.M2M100Config(
            **common, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=80,
            pad_token_id=1, bos_token_id=0, eos_token_id=2, scale_embedding=True,
        )  # fmt: skip
    else:
        raise ValueError(kind)
    config.save_pretrained(folder)
    return folder


HF_ZOO = {
    # case: (open_clip name, HF kind, text_cfg overrides, tokenizer family: start, end, pad, low)
    "xlm-roberta-base-ViT-B-32": ("xlm-roberta-base-ViT-B-32", "xlm-roberta", {}, (0, 2, 1, 4)),
    "xlm-roberta-cls": (
        "xlm-roberta-base-ViT-B-32",
        "xlm-roberta",
        {"hf_pooler_type": "cls_pooler"},
        (0, 2, 1, 4),
    ),
    "xlm-roberta-cls_last_hidden_state": (
        "xlm-roberta-base-ViT-B-32",
        "xlm-roberta",
        {"hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": "linear"},
        (0, 2, 1, 4),
    ),  # fmt: skip
    "nllb-clip-base": ("nllb-clip-base", "m2m_100", {}, (900, 2, 1, 4)),  # language code first
    "mt5-base-ViT-B-32": ("mt5-base-ViT-B-32", "mt5", {}, (None, 1, 0, 2)),
}


@pytest.mark.parametrize("case", list(HF_ZOO))
def test_hf_text_tower_matches_open_clip(case: str, tmp_path: Path) -> None:
    name, kind, text, family = HF_ZOO[case]
    folder = tiny_hf(kind, tmp_path / kind)
    cfg = zoo_cfg(name, {**text, "hf_model_name": str(folder), "hf_model_pretrained": False}, embed_dim=48)
    oc, tower = build_pair(name, cfg)
    tokens = captions(77, 1000, family, seed=1)
    with torch.no_grad():
        want, got = oc.encode_text(tokens), tower(tokens)
        hidden = tower.forward_hidden(tokens)
    diff = max(max_diff(want, got), max_diff(want, hidden.pooled))
    print(
        f"{case}: encode_text max abs diff {diff:.2e} ({type(tower.transformer).__name__}, {type(tower.proj).__name__})"
    )
    assert diff < TOL and want.abs().max() > 0.05
    assert any(k.startswith("proj.") for k in tower.state_dict()) == (type(tower.proj).__name__ != "Identity")


def test_hf_max_pooler_ignores_padding(tmp_path: Path) -> None:
    """open_clip 3.3's max pooler cannot run (masked_fill with a long mask): the oracle is the
    encoder's own states, maximised over each caption's real tokens."""
    folder = tiny_hf("xlm-roberta", tmp_path / "xlmr")
    cfg = config_from_open_clip(
        zoo_cfg("xlm-roberta-base-ViT-B-32", {"hf_model_name": str(folder), "hf_pooler_type": "max_pooler"})
    )
    tower = randomize_(build_text_tower(cfg.text, cfg.embed_dim))
    tokens = captions(77, 1000, (0, 2, 1, 4), seed=2)
    with torch.no_grad():
        states = tower.transformer(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
        want = torch.stack([s[t != 1].amax(dim=0) for s, t in zip(states, tokens)])
        assert max_diff(tower(tokens), tower.proj(want)) < TOL


def _hub_snapshot(cache: Path, repo_id: str, source: Path) -> None:
    """``source``'s config.json placed in a hub cache as huggingface_hub lays it out."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_bytes((source / "config.json").read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_model_name_resolves_offline_from_hub_cache(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hub"
    _hub_snapshot(cache, "someorg/tiny-xlmr", tiny_hf("xlm-roberta", tmp_path / "src"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = dataclasses.replace(CLIPConfig().text, hf_model_name="someorg/tiny-xlmr")
    tower = build_text_tower(text, 48)
    assert tower.width == 32 and tower.pad_id == 1 and len(tower.transformer.encoder.layer) == 2

    text = dataclasses.replace(text, hf_model_name="someorg/not-cached")
    with pytest.raises(ConfigError) as err:
        build_text_tower(text, 48)
    msg = str(err.value)
    assert "someorg/not-cached" in msg and "config.json" in msg and "models--someorg--not-cached" in msg
    assert "HF_HUB_OFFLINE" in msg

    for bad, why in (
        (str(tmp_path / "missing"), "no such folder"),
        (str(tmp_path / "hub"), "has no config.json"),
    ):
        text = dataclasses.replace(text, hf_model_name=bad)
        with pytest.raises(ConfigError, match=why):
            build_text_tower(text, 48)


def test_hf_open_clip_checkpoint_loads_into_clip(tmp_path: Path) -> None:
    """A whole open_clip XLM-R CLIP state dict, with the ``position_ids`` buffer that checkpoints
    saved by transformers < 4.31 carry, loads strictly into clipforge's CLIP (keys unchanged)."""
    from clipforge.checkpoints.load import apply_state_dict
    from clipforge.model.clip import CLIP

    folder = tiny_hf("xlm-roberta", tmp_path / "xlmr")
    name = "xlm-roberta-base-ViT-B-32"
    cfg = zoo_cfg(name, {"hf_model_name": str(folder), "hf_model_pretrained": False}, embed_dim=48)
    oc = randomize_(
        open_clip.create_model(
            name, pretrained_hf=False, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], embed_dim=48
        )
    )
    sd = dict(oc.state_dict())
    sd["text.transformer.embeddings.position_ids"] = torch.arange(80)[None]
    model = CLIP(config_from_open_clip(cfg, source=name)).eval()
    apply_state_dict(model, open_clip_to_clipforge(sd), name, strict=True)
    tokens = captions(77, 1000, (0, 2, 1, 4), seed=4)
    with torch.no_grad():
        assert max_diff(model.encode_text(tokens), oc.encode_text(tokens)) < TOL


def test_hf_projection_options(tmp_path: Path) -> None:
    """``hf_proj_type`` null in an open_clip config is the identity (widths must agree); proj_bias
    gives the projection linears biases (open_clip 3.3's adapter has no such option to compare)."""
    folder = str(tiny_hf("m2m_100", tmp_path / "nllb"))
    name = "nllb-clip-base"
    identity = config_from_open_clip(
        zoo_cfg(name, {"hf_model_name": folder, "hf_proj_type": None}, embed_dim=32)
    )
    tower = build_text_tower(identity.text, identity.embed_dim)
    assert isinstance(tower.proj, torch.nn.Identity) and not any(
        k.startswith("proj.") for k in tower.state_dict()
    )
    with pytest.raises(
        ConfigError, match=r"hf_proj_type='none' needs the encoder width \(32\) == embed_dim \(48\)"
    ):
        build_text_tower(identity.text, 48)
    mlp = config_from_open_clip(zoo_cfg("xlm-roberta-base-ViT-B-32", {"hf_model_name": folder}, embed_dim=48))
    assert mlp.text.hf_proj_type == "mlp"  # open_clip's default when a config names none
    mlp = mlp.replace(text={"proj_bias": True})
    keys = set(build_text_tower(mlp.text, 48).state_dict())
    assert {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"} <= keys
