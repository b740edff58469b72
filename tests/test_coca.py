"""CoCa against open_clip: weights, features, decoder logits and generated captions.

open_clip's ``CoCa`` is the oracle. Its ``generate`` needs Hugging Face's ``BeamSearchScorer``,
removed in transformers 5, so it runs in a subprocess with transformers 4.x on the path
(``.ci/run`` installs it under ``$VENV/oracles/transformers4``; locally run the same
``pip install --target`` line). The test fails, naming that step, when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import OC_TINY_VIT_96, scratch_dir
from realdata import photos

import clipforge
from clipforge.checkpoints.open_clip import clipforge_to_open_clip, infer_config, open_clip_to_clipforge
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.model.coca import CoCa
from clipforge.model.generate import captions_from_ids

open_clip = pytest.importorskip("open_clip")  # a [dev] oracle: always installed in CI
from open_clip.coca_model import CoCa as OpenClipCoCa  # noqa: E402

ORACLE = Path(__file__).parent / "oracles" / "open_clip_coca_generate.py"
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        **OC_TINY_VIT_96,
        "attentional_pool": True,
        "attn_pooler_heads": 2,
        "attn_pooler_queries": 8,
        "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "embed_cls": True,
        "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def transformers4_path() -> Path:
    path = Path(os.environ.get("CLIPFORGE_TRANSFORMERS4", Path(sys.prefix) / "oracles" / "transformers4"))
    if not (path / "transformers").is_dir():
        pytest.fail(
            f"open_clip's CoCa.generate oracle needs transformers 4.x under {path}: run "
            f"'{sys.executable} -m pip install --target {path} --no-deps transformers==4.56.2 "
            '"huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0" && '
            f"{sys.executable} -m pip install --target {path} requests' (.ci/run does this)"
        )
    return path


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Seeded random weights everywhere (open_clip leaves some CoCa parameters uninitialised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(p.shape, generator=gen) * 0.02
            p.copy_(
                1.0 + noise if (p.dim() == 1 and ".ln" in f".{name}" and name.endswith("weight")) else noise
            )


def open_clip_coca(cfg: dict, seed: int) -> torch.nn.Module:
    model = OpenClipCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"])
    randomize(model, seed)
    return model.eval()


def caption_tokens(lengths: list[int], context: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), context, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, n - 1] = 49406, 49407
        tokens[i, 1 : n - 1] = torch.randint(1, 49405, (n - 2,), generator=gen)
    return tokens


def run_oracle(tmp_path: Path, model_cfg: dict, weights: Path, images: torch.Tensor, runs: list) -> list:
    job, out = tmp_path / "job.pt", tmp_path / "out.pt"
    torch.save({"model_cfg": model_cfg, "weights": str(weights), "images": images, "runs": runs}, job)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(transformers4_path()), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(ORACLE), str(job), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def photo_batch(model: torch.nn.Module, n: int) -> torch.Tensor:
    from PIL import Image

    from clipforge.transforms import image_transform

    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    with torch.no_grad():
        return torch.stack([preprocess(Image.open(p)) for p in photos()[:: max(1, len(photos()) // n)][:n]])


# --- tiny: every code path, fast ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    oc = open_clip_coca(TINY_CFG, seed=1)
    model = clipforge.create_model(config_from_open_clip(TINY_CFG)).eval()
    model.load_state_dict(open_clip_to_clipforge(oc.state_dict()))
    return oc, model


def test_tiny_features_and_logits_match_open_clip(tiny):
    oc, model = tiny
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = caption_tokens([5, 12, 32], 32)
    with torch.no_grad():
        ref, out = oc(images, tokens), model(images, tokens)
        assert isinstance(model, CoCa)
        assert (ref["image_features"] - out.image_features).abs().max() < 1e-5
        assert (ref["text_features"] - out.text_features).abs().max() < 1e-5
        assert (ref["logits"] - out.logits).abs().max() < 1e-5
        assert torch.equal(ref["labels"], out.labels)
        assert (oc.encode_image(images) - model.encode_image(images, normalize=True)).abs().max() < 1e-5
        assert (oc.encode_text(tokens) - model.encode_text(tokens, normalize=True)).abs().max() < 1e-5


def test_state_dict_round_trips_to_open_clip(tiny):
    oc, model = tiny
    back, ref = clipforge_to_open_clip(model.state_dict()), oc.state_dict()
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    inferred = infer_config(ref)  # shapes alone rebuild the architecture (heads aside: no twin)
    assert inferred.multimodal is not None and inferred.multimodal.layers == 2
    assert inferred.vision.attn_pooler_queries == 8 and inferred.text.embed_cls
    assert inferred.text.context_length == 32


def test_kv_cache_steps_equal_full_decoder(tiny):
    _, model = tiny
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = caption_tokens([9, 14], 32)[:, :14]
    tokens[0, 3] = 0  # a pad id inside the prefix exercises open_clip's shifted class-token mask
    with torch.no_grad():
        _, image_tokens = model.encode_image_tokens(images)
        full = model.caption_logits(image_tokens, tokens)
        state, steps = model.start_decoding(image_tokens), []
        for t in range(tokens.shape[1]):
            logits, state = model.decode_step(state, tokens[:, t])
            steps.append(logits)
    assert (torch.stack(steps, 1) - full).abs().max() < 1e-5


def test_tiny_generate_matches_open_clip(tiny, tmp_path):
    oc, model = tiny
    weights = tmp_path / "oc.pt"
    torch.save(oc.state_dict(), weights)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    runs = [
        (0, {"generation_type": "top_k", "top_k": 1}),
        (0, {"generation_type": "beam_search"}),
        (0, {"generation_type": "beam_search", "num_beams": 4, "num_beam_groups": 1, "seq_len": 12}),
        (
            0,
            {
                "generation_type": "beam_search",
                "num_beams": 3,
                "num_beam_groups": 1,
                "min_seq_len": 8,
                "repetition_penalty": 1.5,
                "fixed_output_length": True,
            },
        ),
        (7, {"generation_type": "top_k", "top_k": 20, "temperature": 0.7, "repetition_penalty": 1.3}),
        (7, {"generation_type": "top_p", "top_p": 0.9, "seq_len": 20, "fixed_output_length": True}),
    ]
    expected = run_oracle(tmp_path, TINY_CFG, weights, images, runs)
    for (seed, kwargs), ref in zip(runs, expected):
        for use_cache in (True, False):
            torch.manual_seed(seed)
            got = model.generate(images, use_cache=use_cache, **kwargs)
            assert torch.equal(got, ref), (kwargs, use_cache, got, ref)
    greedy = model.generate(images, generation_type="greedy")
    assert torch.equal(greedy, expected[0])


# --- coca_ViT-B-32: the acceptance parity, once ---------------------------------------------------
@pytest.fixture(scope="module")
def b32(tmp_path_factory):
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    oc = open_clip_coca(cfg, seed=5)
    with scratch_dir(tmp_path_factory, "coca_b32") as folder:  # ~1 GB of weights
        path = folder / "open_clip_pytorch_model.bin"
        torch.save(oc.state_dict(), path)
        model = clipforge.create_model("coca_ViT-B-32", pretrained=str(path)).eval()
        yield cfg, oc, model, path


@pytest.mark.slow
def test_coca_vit_b32_parity_with_open_clip(b32, tmp_path):
    cfg, oc, model, weights = b32
    assert model.architecture == "coca_ViT-B-32"
    assert config_from_open_clip(cfg).to_dict() == clipforge.get_model_config("coca_ViT-B-32").to_dict()
    images = photo_batch(model, 2)
    tokens = caption_tokens([6, 76], 76)
    with torch.no_grad():
        ref, out = oc(images, tokens), model(images, tokens)
    assert (ref["image_features"] - out.image_features).abs().max() < 1e-5
    assert (ref["text_features"] - out.text_features).abs().max() < 1e-5
    assert (ref["logits"] - out.logits).abs().max() < 1e-5
    # open_clip's defaults (6 beams in 3 groups, min_seq_len 5), 20 tokens to bound the CPU time.
    runs = [(0, {"generation_type": "top_k", "top_k": 1, "seq_len": 20}), (0, {"seq_len": 20})]
    expected = run_oracle(tmp_path, cfg, weights, images, runs)
    assert torch.equal(model.generate(images, generation_type="greedy", seq_len=20), expected[0])
    assert torch.equal(model.generate(images, seq_len=20), expected[1])
    tok = clipforge.get_tokenizer(model)
    assert tok.context_length == 76
    assert len(captions_from_ids(tok, expected[1])) == 2


# --- names, tags, Hub folders, export --------------------------------------------------------------
SHRINK = {
    "embed_dim": 64,
    "vision": {
        "image_size": 32,
        "patch_size": 8,
        "width": 64,
        "layers": 1,
        "head_width": 32,
        "attn_pooler_queries": 4,
    },
    "text": {"width": 64, "heads": 2, "layers": 1},
    "multimodal": {"width": 64, "heads": 2, "layers": 1},
}


def test_coca_tags_resolve_through_the_tag_table(offline_cache, tmp_path):
    from helpers import populate

    torch.manual_seed(0)
    model = clipforge.create_model("coca_ViT-B-32", **SHRINK)
    weights = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clipforge_to_open_clip(model.state_dict()), weights)
    populate(offline_cache, "laion/mscoco_finetuned_CoCa-ViT-B-32-laion2B-s13B-b90k", {weights.name: weights})
    loaded = clipforge.create_model(
        "coca_ViT-B-32", pretrained="mscoco_finetuned_laion2b_s13b_b90k", **SHRINK
    )
    assert isinstance(loaded, CoCa)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert ("coca_ViT-L-14", "laion2b_s13b_b90k") in clipforge.list_pretrained()


def test_open_clip_hub_folder_with_coca_config_builds_a_coca(offline_cache, tiny):
    from helpers import populate

    oc, model = tiny
    weights = offline_cache.parent / "open_clip_pytorch_model.bin"
    torch.save(oc.state_dict(), weights)
    config = json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}).encode()
    populate(offline_cache, "test-org/tiny-coca", {weights.name: weights, "open_clip_config.json": config})
    loaded = clipforge.create_model("hf-hub:test-org/tiny-coca").eval()
    assert isinstance(loaded, CoCa) and loaded.config.to_dict() == model.config.to_dict()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.generate(images, seq_len=10), model.generate(images, seq_len=10))


def test_contrastive_towers_export_to_onnx(tmp_path):
    from clipforge.export import export_onnx

    model = clipforge.create_model("tiny-coca")
    result = export_onnx(model, tmp_path)
    assert set(result.paths) == {"image", "text"}
    assert max(result.max_abs_diff.values()) < 1e-4  # ONNX Runtime against PyTorch
