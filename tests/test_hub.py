"""``hf-hub:`` references and named tags, resolved offline from a cache laid out like the Hub's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import OC_TINY_CFG, REVISION, SHRINK, populate, seeded_model

from clipforge.checkpoints import hub
from clipforge.checkpoints.io import save_safetensors
from clipforge.errors import DownloadError
from clipforge.factory import create_model, create_model_and_transforms, get_tokenizer


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """A random clipforge tiny ViT and its weights in open_clip naming (.safetensors and .bin)."""
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip

    model = seeded_model("tiny-vit")
    sd = clipforge_to_open_clip(model.state_dict())
    folder = tmp_path_factory.mktemp("weights")
    save_safetensors(sd, folder / "open_clip_model.safetensors")
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    return model, folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin"


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parse_hub_spec():
    ref = hub.parse_hub_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert ref.repo_id == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and ref.filename is None
    ref = hub.parse_hub_spec("hf-hub:org/name@v1/sub/open_clip_model.safetensors")
    assert (ref.repo_id, ref.revision, ref.filename) == ("org/name", "v1", "sub/open_clip_model.safetensors")


def test_open_clip_hub_repo_restores_config_and_preprocessing(offline_cache, tiny_weights):
    model, safetensors_file, _ = tiny_weights
    config = {
        "model_cfg": OC_TINY_CFG,
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"},
    }
    populate(
        offline_cache,
        "test-org/tiny-clip",
        {
            "open_clip_config.json": json.dumps(config).encode(),
            "open_clip_model.safetensors": safetensors_file,
        },
    )
    loaded, _, val = create_model_and_transforms(pretrained="hf-hub:test-org/tiny-clip")
    assert_same_weights(model, loaded)
    assert tuple(loaded.preprocess_cfg.mean) == (0.5, 0.5, 0.5)
    assert loaded.preprocess_cfg.resize_mode == "squash"
    assert loaded.preprocess_cfg.image_size == 32
    # open_clip's spelling: the hub reference as the model name
    again = create_model("hf-hub:test-org/tiny-clip")
    assert_same_weights(model, again)
    assert get_tokenizer("hf-hub:test-org/tiny-clip").context_length == 77


def test_hub_file_reference_with_model_name(offline_cache, tiny_weights):
    model, safetensors_file, _ = tiny_weights
    populate(offline_cache, "test-org/weights-only", {"open_clip_model.safetensors": safetensors_file})
    loaded = create_model("tiny-vit", pretrained="hf-hub:test-org/weights-only/open_clip_model.safetensors")
    assert_same_weights(model, loaded)


def test_named_tag_resolves_through_the_cache(offline_cache, tiny_weights):
    model, safetensors_file, bin_file = tiny_weights
    # The real repository of ViT-B-32/laion2b_s34b_b79k, filled with tiny random weights.
    populate(
        offline_cache,
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        {"open_clip_model.safetensors": safetensors_file},
    )
    loaded, _, _ = create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k", **SHRINK)
    assert_same_weights(model, loaded)
    assert loaded.config.quick_gelu is False

    # OpenAI weights: only the .bin exists there; the tag switches QuickGELU on.
    populate(
        offline_cache, "timm/vit_base_patch32_clip_224.openai", {"open_clip_pytorch_model.bin": bin_file}
    )
    openai = create_model("ViT-B-32", pretrained="openai", **SHRINK)
    assert openai.config.quick_gelu is True
    assert_same_weights(model, openai)


def test_tag_preprocessing_comes_from_the_table(offline_cache, tiny_weights):
    _, safetensors_file, _ = tiny_weights
    populate(
        offline_cache,
        "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
        {"open_clip_model.safetensors": safetensors_file},
    )
    shrink = {**SHRINK, "embed_dim": 64}
    model = create_model("ViT-L-14", pretrained="laion2b_s32b_b82k", **shrink)
    assert tuple(model.preprocess_cfg.mean) == (0.5, 0.5, 0.5)  # this tag used Inception mean/std


def test_hf_transformers_repo_on_the_hub(offline_cache, tmp_path):
    from clipforge.checkpoints.hf import save_hf

    model = seeded_model("tiny-vit")
    save_hf(model, tmp_path / "hf")
    populate(
        offline_cache,
        "test-org/hf-clip",
        {
            "config.json": tmp_path / "hf" / "config.json",
            "model.safetensors": tmp_path / "hf" / "model.safetensors",
        },
    )
    loaded = create_model(pretrained="hf-hub:test-org/hf-clip")
    assert_same_weights(model, loaded)


def test_sharded_transformers_repo_on_the_hub(offline_cache, tmp_path):
    """Big Hub checkpoints (ViT-bigG) are split into shards + an index: every shard is resolved."""
    transformers = pytest.importorskip("transformers")
    from clipforge.checkpoints.hf import save_hf

    model = seeded_model("tiny-vit")
    save_hf(model, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = {p.name: p for p in (tmp_path / "sharded").iterdir()}
    assert "model.safetensors.index.json" in files and len(files) > 3
    populate(offline_cache, "test-org/big-clip", files)
    assert_same_weights(model, create_model(pretrained="hf-hub:test-org/big-clip"))

    shard = sorted(n for n in files if n.startswith("model-"))[-1]
    (offline_cache / "models--test-org--big-clip" / "snapshots" / REVISION / shard).unlink()
    with pytest.raises(DownloadError, match=shard):
        create_model(pretrained="hf-hub:test-org/big-clip")


def test_missing_from_cache_offline_names_the_path(offline_cache):
    with pytest.raises(DownloadError) as err:
        create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    message = str(err.value)
    assert str(offline_cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in message
    assert "snapshots" in message and "open_clip_model.safetensors" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(DownloadError, match="models--nobody--nothing"):
        create_model(pretrained="hf-hub:nobody/nothing")


def test_unreachable_hub_fails_fast_with_cache_path(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, but no network: a refused connection, not half a minute of retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(hub.hub_files, "_probe_cache", {})
    with pytest.raises(DownloadError, match="not reachable") as err:
        hub.hub_file("org/name", "open_clip_model.safetensors", cache_dir=tmp_path / "cache")
    assert str(tmp_path / "cache" / "models--org--name") in str(err.value)
