"""Checkpoint formats: safe reading, detection, conversion and the factory's ``pretrained=``.

open_clip is used only as an oracle (to write files in its layouts and to compute reference
features); every model here is tiny and randomly initialised.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import OC_TINY_TEXT as TINY_TEXT
from helpers import OC_TINY_VIT as TINY_VIT
from helpers import seeded_model

from clipforge.atomic import atomic_write, atomic_write_text
from clipforge.checkpoints.io import (
    load_safetensors,
    load_torchscript_state_dict,
    safe_torch_load,
    save_safetensors,
)
from clipforge.checkpoints.load import detect_format, load_checkpoint, load_state_dict_any
from clipforge.checkpoints.pretrained import list_pretrained, resolve_pretrained
from clipforge.errors import CheckpointError, ConfigError
from clipforge.factory import create_model, create_model_and_transforms, get_tokenizer

open_clip = pytest.importorskip("open_clip")

TINY_RN = dict(image_size=64, layers=[1, 1, 1, 1], width=16)


def open_clip_tiny(vision: dict, quick_gelu: bool = False, seed: int = 0) -> torch.nn.Module:
    """A random open_clip CLIP with the same shapes as clipforge's tiny registry entries."""
    from open_clip.model import CLIP as OpenClipCLIP

    torch.manual_seed(seed)
    return OpenClipCLIP(embed_dim=64, vision_cfg=vision, text_cfg=TINY_TEXT, quick_gelu=quick_gelu).eval()


def inputs(size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, size, size, generator=g)
    tokens = torch.randint(1, 49000, (3, 77), generator=g)
    tokens[:, 0] = 49406
    for row, eot in enumerate((5, 30, 76)):
        tokens[row, eot] = 49407
        tokens[row, eot + 1 :] = 0
    return images, tokens


def max_feature_diff(reference: torch.nn.Module, model: torch.nn.Module, size: int) -> float:
    images, tokens = inputs(size)
    with torch.no_grad():
        a = F.normalize(reference.encode_image(images), dim=-1) - model.encode_image(images, normalize=True)
        b = F.normalize(reference.encode_text(tokens), dim=-1) - model.encode_text(tokens, normalize=True)
    return max(a.abs().max().item(), b.abs().max().item())


def trace_openai_style(oc: torch.nn.Module, size: int, path: Path) -> Path:
    """A TorchScript archive shaped like OpenAI's releases (open_clip names + scalar buffers)."""
    for key, value in (("input_resolution", size), ("context_length", 77), ("vocab_size", 49408)):
        if hasattr(oc, key):
            delattr(oc, key)
        oc.register_buffer(key, torch.tensor(value))
    images, tokens = inputs(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            oc, {"encode_image": images, "encode_text": tokens}, check_trace=False
        )
        torch.jit.save(traced, str(path))
    return path


# --- io -------------------------------------------------------------------------------------------
def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("partial")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # temporary removed


def test_safetensors_round_trip_handles_shared_and_strided(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "b": base.t(), "c": base[0]}  # shared storage, non-contiguous
    save_safetensors(tensors, tmp_path / "w.safetensors", metadata={"k": "v"})
    loaded, meta = load_safetensors(tmp_path / "w.safetensors")
    assert meta["k"] == "v"
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)


def test_safe_torch_load_reads_plain_checkpoints(tmp_path):
    torch.save({"w": torch.ones(3), "step": 7}, tmp_path / "x.pt")
    out = safe_torch_load(tmp_path / "x.pt")
    assert out["step"] == 7 and torch.equal(out["w"], torch.ones(3))


@pytest.fixture(scope="module")
def openai_vit_archive(tmp_path_factory):
    oc = open_clip_tiny(TINY_VIT, quick_gelu=True)
    return oc, trace_openai_style(oc, 32, tmp_path_factory.mktemp("ts") / "ViT-tiny.pt")


def test_training_checkpoint_with_numpy_values_loads(tmp_path):
    """open_clip-style epoch files often hold numpy scalars (best metric): data, so accepted."""
    np = pytest.importorskip("numpy")
    torch.save(
        {
            "epoch": np.int64(3),
            "best": np.float64(0.25),
            "hist": np.arange(4),
            "state_dict": {"w": torch.ones(2)},
        },
        tmp_path / "epoch_3.pt",
    )
    out = safe_torch_load(tmp_path / "epoch_3.pt")
    assert (
        out["best"] == 0.25
        and list(out["hist"]) == [0, 1, 2, 3]
        and torch.equal(out["state_dict"]["w"], torch.ones(2))
    )


def test_torchscript_reader_matches_torch_jit(openai_vit_archive):
    _, path = openai_vit_archive
    ours = load_torchscript_state_dict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.jit.load(str(path)).state_dict()
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    assert safe_torch_load(path).keys() == ours.keys()  # routed to the TorchScript reader


# --- formats and parity with open_clip --------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", pytest.param("rn", marks=pytest.mark.slow)])
def test_openai_torchscript_archive_loads_with_quickgelu(tmp_path, openai_vit_archive, arch):
    if arch == "vit":
        (oc, path), size = openai_vit_archive, 32
    else:
        size = 64
        oc = open_clip_tiny(TINY_RN, quick_gelu=True)
        path = trace_openai_style(oc, size, tmp_path / "openai.pt")
    assert detect_format(path) == "openai"
    model = create_model(None, pretrained=path).eval()
    assert model.config.quick_gelu is True
    assert model.config.vision.image_size == size
    assert max_feature_diff(oc, model, size) < 1e-5


@pytest.fixture(scope="module")
def oc_vit():
    return open_clip_tiny(TINY_VIT)


@pytest.mark.parametrize(
    "wrap",
    ["plain", "module", "orig_mod", "state_dict", "model", "model_state", "safetensors"],
)
def test_open_clip_state_dict_variants(tmp_path, oc_vit, wrap):
    from clipforge.checkpoints.open_clip import open_clip_to_clipforge

    sd = oc_vit.state_dict()
    if wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_safetensors(sd, path)
    else:
        path = tmp_path / "w.pt"
        obj = {
            "plain": sd,
            "module": {f"module.{k}": v for k, v in sd.items()},
            "orig_mod": {f"_orig_mod.{k}": v for k, v in sd.items()},
            "state_dict": {
                "epoch": 3,
                "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {},
            },
            "model": {"model": sd, "step": 10},
            "model_state": {"model_state": sd, "rng": torch.zeros(3)},
        }[wrap]
        torch.save(obj, path)
    state_dict, fmt, extra = load_state_dict_any(path)
    assert fmt == "open_clip" and extra["config"] is None
    expected = open_clip_to_clipforge(sd)
    assert sorted(state_dict) == sorted(expected)
    assert all(torch.equal(state_dict[k], v) for k, v in expected.items())


def test_open_clip_vit_parity_named_and_inferred(tmp_path, oc_vit):
    torch.save({"state_dict": {f"module.{k}": v for k, v in oc_vit.state_dict().items()}}, tmp_path / "w.pt")
    model = create_model("tiny-vit", pretrained=tmp_path / "w.pt").eval()
    assert max_feature_diff(oc_vit, model, 32) < 1e-5
    inferred = create_model(None, pretrained=tmp_path / "w.pt").eval()  # architecture inferred from shapes
    assert inferred.config.vision.head_width == 32 and inferred.config.text.heads == 2
    assert inferred.config == model.config
    assert max_feature_diff(oc_vit, inferred, 32) < 1e-5


@pytest.mark.slow
def test_open_clip_rn_parity(tmp_path):
    oc = open_clip_tiny(TINY_RN)
    torch.save(oc.state_dict(), tmp_path / "rn.bin")
    model = create_model("tiny-rn", pretrained=tmp_path / "rn.bin").eval()
    assert max_feature_diff(oc, model, 64) < 1e-5


def test_load_checkpoint_into_existing_model(tmp_path, oc_vit):
    torch.save({"state_dict": oc_vit.state_dict()}, tmp_path / "epoch_1.pt")
    model = create_model("tiny-vit").eval()
    load_checkpoint(model, tmp_path / "epoch_1.pt")
    assert max_feature_diff(oc_vit, model, 32) < 1e-5


# --- clipforge format ------------------------------------------------------------------------------
def test_clipforge_dir_restores_model_preprocessing_and_tokenizer(tmp_path):
    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.transforms import PreprocessConfig

    model = seeded_model("tiny-vit", quick_gelu=True)
    custom = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_mode="squash")
    save_pretrained(
        model,
        tmp_path / "ck",
        tokenizer_cfg={"type": "clip_bpe", "context_length": 77, "clean": "whitespace"},
        preprocess_cfg=custom,
    )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["format_version"] == 1 and doc["model_config"]["quick_gelu"] is True
    assert detect_format(tmp_path / "ck") == "clipforge"

    loaded, _, val = create_model_and_transforms(pretrained=str(tmp_path / "ck"))
    loaded.eval()
    assert loaded.config == model.config
    assert tuple(loaded.preprocess_cfg.mean) == (0.5, 0.5, 0.5)
    assert loaded.preprocess_cfg.resize_mode == "squash"
    tok = get_tokenizer(loaded)
    assert tok.clean == "whitespace"
    assert get_tokenizer(str(tmp_path / "ck")).clean == "whitespace"
    assert max_feature_diff(model, loaded, 32) == 0.0
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


# --- conversion -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target,name",
    [
        ("clipforge", "out"),
        ("open_clip", "out.bin"),
        ("open_clip", "oc_dir"),
        ("hf", "hf_dir"),
        ("openai", "out.pt"),
    ],
)
def test_convert_round_trip_is_exact(tmp_path, target, name):
    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import convert_checkpoint

    model = seeded_model("tiny-vit")
    save_pretrained(model, tmp_path / "src")
    out = convert_checkpoint(tmp_path / "src", tmp_path / name, target)
    expected = {"clipforge": "clipforge", "open_clip": "open_clip", "hf": "hf", "openai": "openai"}[target]
    assert detect_format(out) == expected
    back = create_model(None, pretrained=out).eval()
    assert back.config.vision == model.config.vision and back.config.text == model.config.text
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    if target == "openai":  # OpenAI files imply QuickGELU; the weights are still identical
        assert back.config.quick_gelu is True


def test_convert_cli(tmp_path, capsys, oc_vit):
    from clipforge.cli import main

    torch.save(oc_vit.state_dict(), tmp_path / "oc.pt")
    assert (
        main(
            ["convert", str(tmp_path / "oc.pt"), str(tmp_path / "cf"), "--to", "clipforge", "--dtype", "fp16"]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    sd, fmt, _ = load_state_dict_any(tmp_path / "cf")
    assert fmt == "clipforge" and sd["visual.proj"].dtype == torch.float16
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x"), "--to", "hf"]) == 2


def test_hf_export_refuses_resnet(tmp_path):
    from clipforge.checkpoints.convert import save_as

    with pytest.raises(ConfigError, match="cannot represent"):
        save_as(create_model("tiny-rn"), tmp_path / "hf", "hf")
    assert not (tmp_path / "hf" / "config.json").exists()


# --- named pretrained tags ---------------------------------------------------------------------------
def test_pretrained_table_facts():
    entry = resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k")
    assert entry.hf_hub == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and not entry.quick_gelu
    openai = resolve_pretrained("ViT-B-32-quickgelu", "OpenAI")
    assert openai.quick_gelu and openai.hf_hub == "timm/vit_base_patch32_clip_224.openai"
    assert resolve_pretrained("ViT-L-14", "laion2b_s32b_b82k").mean == (0.5, 0.5, 0.5)
    assert resolve_pretrained("ViT-H-14", "dfn5b").resize_mode == "squash"
    pairs = set(list_pretrained())
    for pair in [
        ("RN50", "openai"),
        ("ViT-B-16", "datacomp_xl_s13b_b90k"),
        ("ViT-bigG-14", "laion2b_s39b_b160k"),
        ("ViT-g-14", "laion2b_s12b_b42k"),
        ("ViT-B-16", "dfn2b"),
        ("ViT-B-32", "commonpool_m_clip_s128m_b4k"),
    ]:
        assert pair in pairs
    from clipforge.model.registry import list_models

    assert {m.removesuffix("-quickgelu") for m, _ in pairs} <= set(list_models())  # registered architectures
    with pytest.raises(ConfigError, match="laion2b_s34b_b79k"):
        resolve_pretrained("ViT-B-32", "laion2b_s34b_b79")


def test_unknown_pretrained_string_is_a_clear_error():
    with pytest.raises(ConfigError, match="Known tags"):
        create_model("ViT-B-32", pretrained="laion5b")
    with pytest.raises(CheckpointError, match="no such file"):
        create_model("tiny-vit", pretrained="./does/not/exist.pt")


def test_models_pretrained_listing(capsys):
    from clipforge.cli import main

    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "laion2b_s34b_b79k" in out and "dfn5b" in out


def test_torchscript_with_extra_zip_entry_is_still_read(tmp_path, openai_vit_archive):
    """Archives written by other torch versions carry extra records; only data.pkl + data/ matter."""
    path = tmp_path / "a.pt"
    shutil.copy(openai_vit_archive[1], path)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("ViT-tiny/extra/notes.txt", "hello")
    assert "visual.conv1.weight" in load_torchscript_state_dict(path)
