"""The named-weights table against open_clip (test-only oracle): every pair, every fact, the
preprocessing each tag gives on real photos, and open_clip's Hub layouts resolved offline.

Nothing is downloaded: Hub repositories are written into a tmp ``HF_HUB_CACHE`` in the Hub's own
layout (``models--org--name/snapshots/<sha>/...`` + ``refs/main``) with tiny weights or, where
only resolution is checked, the real repository's config and placeholder files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import realdata
import torch
from helpers import populate
from PIL import Image

from clipforge.checkpoints import hub
from clipforge.checkpoints.io import save_safetensors
from clipforge.checkpoints.load import _read_open_clip_json
from clipforge.checkpoints.pretrained import (
    list_pretrained,
    pretrained_entries,
    resolve_pretrained,
)
from clipforge.checkpoints.pretrained_main import MAIN_ROWS
from clipforge.errors import DownloadError
from clipforge.model.config import CLIPConfig

open_clip = pytest.importorskip("open_clip")
from open_clip.pretrained import _get_safe_alternatives  # noqa: E402

#: open_clip pairs the table leaves out, with the reason. Empty: all 196 of open_clip 3.3 are in.
LEFT_OUT: dict[tuple[str, str], str] = {}
#: Pairs from open_clip's main branch, after 3.3 (SigLIP 2 NaFlex; checked in test_zoo_naflex.py).
MAIN_PAIRS = [(r["model"], r["tag"]) for r in MAIN_ROWS]
#: One tag per preprocessing convention the table uses (SigLIP squash, classic shortest+crop,
#: CLIPA bilinear squash ImageNet norm, MobileCLIP bilinear 0/1, PE bilinear squash, Inception).
CONVENTION_TAGS = (
    ("ViT-B-16-SigLIP", "webli"),
    ("ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-L-14-CLIPA", "datacomp1b"),
    ("MobileCLIP-S1", "datacompdr"),
    ("PE-Core-B-16", "meta"),
    ("ViT-L-14", "laion2b_s32b_b82k"),
    ("ViT-H-14", "dfn5b"),
)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Real images, decoded once: a full-size RGB photo (3840x2400-class, landscape), a portrait
    crop of an RGBA photo (alpha dropped after the resize, as open_clip does) and two RGBA icons
    (square, smaller than the input size: upscaled)."""
    photos = realdata.photos()
    jpg = next(p for p in photos if p.suffix == ".jpg")
    png = next(p for p in photos if p.suffix == ".png")
    out = []
    with Image.open(jpg) as im:
        out.append(im.convert("RGB"))
    with Image.open(png) as im:
        out.append(im.crop((300, 100, 1200, 1701)))  # 900x1601 portrait, RGBA
    for path in realdata.icons("96x96")[:2]:
        with Image.open(path) as im:
            out.append(im.copy())
    return out


def _open_clip_files(hf_hub: str) -> tuple[str, tuple[str, ...]]:
    """(repo, files tried in order) exactly as open_clip's download_pretrained reads hf_hub."""
    repo, filename = os.path.split(hf_hub)
    name = filename or "open_clip_pytorch_model.bin"
    return repo, (*_get_safe_alternatives(name), name)


def _open_clip_transform(cfg: dict, size: int):
    """open_clip's own eval transform for a tag: its factory's PreprocessCfg path."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = PreprocessCfg(
        size=size,
        mean=cfg["mean"],
        std=cfg["std"],
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )
    return image_transform_v2(pp, is_train=False)


def _max_diff(a, b, images) -> float:
    return max(float((a(im) - b(im)).abs().max()) for im in images)


# --- the table ---------------------------------------------------------------------------------------
def test_table_covers_every_open_clip_pair_with_the_same_facts():
    pairs = open_clip.list_pretrained()
    covered = []
    for model, tag in pairs:
        if (model, tag) in LEFT_OUT:
            continue
        oc = open_clip.get_pretrained_cfg(model, tag)
        entry = resolve_pretrained(model, tag)
        repo, files = _open_clip_files(oc["hf_hub"])
        got = (entry.hf_hub, entry.filenames, entry.quick_gelu, entry.mean, entry.std)
        assert got == (repo, files, bool(oc.get("quick_gelu", False)), tuple(oc["mean"]), tuple(oc["std"])), (
            model,
            tag,
        )
        assert (entry.interpolation, entry.resize_mode) == (oc["interpolation"], oc["resize_mode"]), (
            model,
            tag,
        )
        size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
        assert (entry.image_size or 224) == size, (model, tag)
        covered.append((model, tag))
    left_out = {p for p in pairs if p not in covered}
    assert left_out == set(LEFT_OUT), sorted(left_out)
    print(f"\ncoverage: {len(covered)} of {len(pairs)} open_clip pairs")
    assert len(covered) == len(pairs) == 196


def test_listing_is_open_clips_list():
    """Same pairs (each once), ``<model>-quickgelu`` aliases for exactly open_clip's tags; the
    default listing is the part whose architecture is registered."""
    from clipforge.model.registry import list_models

    everything = list_pretrained(include_unregistered=True)
    assert len(everything) == len(set(everything))
    assert set(everything) == set(open_clip.list_pretrained()) | set(MAIN_PAIRS)
    registered = set(list_models())
    buildable = {(m, t) for m, t in open_clip.list_pretrained() if m.removesuffix("-quickgelu") in registered}
    assert set(list_pretrained()) == buildable | set(MAIN_PAIRS)
    from clipforge.model.registry import get_model_config

    for entry in pretrained_entries():  # the registered architecture takes the tag's input size
        if entry.model in registered:
            assert get_model_config(entry.model).vision.image_size == (entry.image_size or 224), entry.model
    assert set(list_pretrained("ViT-B-16-quickgelu", include_unregistered=True)) == {
        ("ViT-B-16-quickgelu", t) for t in open_clip.list_pretrained_tags_by_model("ViT-B-16-quickgelu")
    }
    # open_clip's tag normalisation: case and '-' for '_'
    assert resolve_pretrained("ViT-B-32", "LAION2B-S34B-B79K").tag == "laion2b_s34b_b79k"
    base = [(m, t) for m, t in open_clip.list_pretrained() if not m.endswith("-quickgelu")]
    assert [(e.model, e.tag) for e in pretrained_entries()] == sorted(base, key=everything.index) + MAIN_PAIRS
    assert sum("siglip" in m.lower() for m, _ in base) == 30
    assert len(pretrained_entries("siglip")) == 30 + len(MAIN_PAIRS) == 32


def test_table_constants_and_licences():
    from clipforge.checkpoints import pretrained_table
    from clipforge.transforms import OPENAI_MEAN, OPENAI_STD

    assert (pretrained_table.OPENAI_MEAN, pretrained_table.OPENAI_STD) == (
        tuple(OPENAI_MEAN),
        tuple(OPENAI_STD),
    )
    licences = {e.license for e in pretrained_entries()}
    assert licences <= {"", "mit", "apache-2.0", "cc-by-nc-4.0", "apple-amlr"}, licences
    assert resolve_pretrained("ViT-B-32", "openai").license == "mit"
    assert resolve_pretrained("ViT-SO400M-14-SigLIP-384", "webli").license == "apache-2.0"
    assert resolve_pretrained("ViT-L-14", "metaclip_fullcc").license == "cc-by-nc-4.0"
    unknown = sorted((e.model, e.tag) for e in pretrained_entries() if not e.license)
    assert unknown == [
        ("nllb-clip-base", "v1"),
        ("nllb-clip-large", "v1"),
        ("nllb-clip-large-siglip", "mrl"),
        ("nllb-clip-large-siglip", "v1"),
    ]


def test_models_pretrained_command_lists_repo_and_licence():
    from clipforge.commands.models import format_pretrained, pretrained_rows

    rows = pretrained_rows("SO400M-14-SigLIP-3")
    assert [(r["model"], r["hf_hub"], r["license"]) for r in rows] == [
        ("ViT-SO400M-14-SigLIP-378", "timm/ViT-SO400M-14-SigLIP-384", "apache-2.0"),
        ("ViT-SO400M-14-SigLIP-384", "timm/ViT-SO400M-14-SigLIP-384", "apache-2.0"),
    ]
    text = format_pretrained(pretrained_rows())
    lines = text.splitlines()
    assert lines[0].split() == ["model", "tag", "hub", "repository", "license", "quickgelu", "size"]
    assert len(lines) == 1 + 169 + len(MAIN_PAIRS)
    assert any(line.split()[:5] == ["ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", "mit", "yes"]
               for line in lines)  # fmt: skip


# --- preprocessing ------------------------------------------------------------------------------------
def test_every_convention_equals_open_clips_transform_on_real_images(images):
    """Each tag's PreprocessConfig (what create_model attaches) vs open_clip's image_transform_v2
    for the same tag: bit-identical tensors on photos of several aspect ratios and RGBA icons."""
    for model, tag in CONVENTION_TAGS:
        entry = resolve_pretrained(model, tag)
        size = entry.image_size or 224
        ours = entry.preprocess_cfg(size)
        from clipforge.transforms import image_transform

        diff = _max_diff(
            image_transform(ours),
            _open_clip_transform(open_clip.get_pretrained_cfg(model, tag), size),
            images,
        )
        assert diff == 0.0, (model, tag, diff)


def test_longest_resize_mode_equals_open_clip(images):
    """'longest' (fit inside, pad) is not used by any tag but is a PreprocessConfig mode: same
    numbers as open_clip's, bicubic and bilinear."""
    from clipforge.transforms import PreprocessConfig, image_transform

    for interpolation in ("bicubic", "bilinear"):
        ours = PreprocessConfig(
            image_size=224,
            resize_mode="longest",
            interpolation=interpolation,
            convention="open_clip",
            alpha="drop",
        )
        oc = open_clip.image_transform(
            224, is_train=False, resize_mode="longest", interpolation=interpolation
        )
        assert _max_diff(image_transform(ours), oc, images) == 0.0, interpolation


def _tiny_open_clip_weights(tmp_path: Path, image_size: int) -> tuple[torch.nn.Module, Path]:
    """A random tiny clipforge ViT at the tag's input size, saved in open_clip naming."""
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip
    from clipforge.model.build import build_model

    torch.manual_seed(0)
    cfg = CLIPConfig.from_dict(
        {
            "embed_dim": 32,
            "vision": {
                "image_size": image_size,
                "patch_size": 32,
                "width": 64,
                "layers": 1,
                "head_width": 32,
            },
            "text": {"width": 32, "heads": 2, "layers": 1},
        }  # fmt: skip
    )
    model = build_model(cfg).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_safetensors(clipforge_to_open_clip(model.state_dict()), path)
    return model, path


@pytest.mark.parametrize(
    ("model_name", "tag"), [("ViT-B-16-SigLIP", "webli"), ("ViT-B-32", "laion2b_s34b_b79k")]
)
def test_tag_through_create_model_gives_open_clips_preprocessing(
    model_name, tag, offline_cache, tmp_path, monkeypatch, images
):
    """The real path: create_model_and_transforms(name, tag) finds the tag's repository in the
    cache, loads the weights, attaches the tag's preprocessing; the val transform equals
    open_clip's for that tag on real images. The architecture is a tiny stand-in registered
    under the tag's name for the test (the weights' shapes are not what is checked here)."""
    from clipforge.factory import create_model_and_transforms
    from clipforge.model import registry

    entry = resolve_pretrained(model_name, tag)
    tiny, weights = _tiny_open_clip_weights(tmp_path, entry.image_size or 224)
    monkeypatch.setitem(registry._REGISTRY, model_name, tiny.config)
    snapshot = populate(offline_cache, entry.hf_hub, {"open_clip_model.safetensors": weights})
    model, _, val = create_model_and_transforms(model_name, pretrained=tag)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values()))
    oc_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    pre = model.preprocess_cfg
    assert (pre.mean, pre.std, pre.interpolation, pre.resize_mode) == (
        tuple(oc_cfg["mean"]), tuple(oc_cfg["std"]), oc_cfg["interpolation"], oc_cfg["resize_mode"]
    )  # fmt: skip
    assert hub.pretrained_file(model_name, tag) == snapshot / "open_clip_model.safetensors"
    assert _max_diff(val, _open_clip_transform(oc_cfg, pre.size[0]), images) == 0.0


# --- open_clip's Hub layouts ---------------------------------------------------------------------------
SO400M = "timm/ViT-SO400M-14-SigLIP-384"
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


def _so400m_config() -> dict:
    """The repository's open_clip_config.json as open_clip's save_config_for_hf writes it."""
    pp = open_clip.get_pretrained_cfg("ViT-SO400M-14-SigLIP-384", "webli")
    keys = ("mean", "std", "interpolation", "resize_mode")
    return {
        "model_cfg": open_clip.get_model_config("ViT-SO400M-14-SigLIP-384"),
        "preprocess_cfg": {k: pp[k] for k in keys},
    }


def test_siglip_hub_repo_resolves_offline_without_building(offline_cache):
    """hf-hub:timm/ViT-SO400M-14-SigLIP-384 from the cache: which files, which config, which
    preprocessing (the weights are placeholders: nothing is built)."""
    files = {"open_clip_config.json": json.dumps(_so400m_config()).encode(), "open_clip_model.safetensors": b"x",
             "open_clip_pytorch_model.bin": b"x", **{n: b"{}" for n in TOKENIZER}}  # fmt: skip
    snapshot = populate(offline_cache, SO400M, files)
    got = hub.resolve_hub_files(f"hf-hub:{SO400M}")
    assert got.config == snapshot / "open_clip_config.json"
    assert got.weights == snapshot / "open_clip_model.safetensors"  # safetensors preferred, as open_clip
    assert sorted(p.name for p in got.tokenizer) == sorted(TOKENIZER)
    assert hub.resolve_hub(f"hf-hub:{SO400M}") == snapshot
    config, pre = _read_open_clip_json(got.config)
    assert (
        config.vision.timm_model_name == "vit_so400m_patch14_siglip_384" and config.vision.image_size == 384
    )
    assert config.text.hf_tokenizer_name == "timm/ViT-B-16-SigLIP" and config.text.context_length == 64
    from clipforge.transforms import PreprocessConfig

    cfg = PreprocessConfig.from_dict(pre)
    tag = resolve_pretrained("ViT-SO400M-14-SigLIP-384", "webli")
    assert cfg == tag.preprocess_cfg(384)  # the repo and the tag agree
    assert (cfg.mean, cfg.std, cfg.resize_mode, cfg.interpolation) == (
        (0.5,) * 3,
        (0.5,) * 3,
        "squash",
        "bicubic",
    )
    # the 378 tag resolves to the same repository and file
    assert hub.pretrained_file("ViT-SO400M-14-SigLIP-378", "webli") == got.weights

    (snapshot / "open_clip_model.safetensors").unlink()  # a .bin-only repository
    assert hub.resolve_hub_files(f"hf-hub:{SO400M}").weights == snapshot / "open_clip_pytorch_model.bin"
    (snapshot / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(DownloadError, match="models--timm--ViT-SO400M-14-SigLIP-384/snapshots"):
        hub.resolve_hub_files(f"hf-hub:{SO400M}")


def test_vitamin_tag_names_its_own_file(offline_cache):
    """ViTamin's hf_hub names pytorch_model.bin; open_clip tries pytorch_model.safetensors first."""
    snapshot = populate(offline_cache, "jienengchen/ViTamin-S", {"pytorch_model.bin": b"x"})
    assert hub.pretrained_file("ViTamin-S", "datacomp1b") == snapshot / "pytorch_model.bin"
    populate(offline_cache, "jienengchen/ViTamin-S", {"pytorch_model.safetensors": b"x"})
    assert hub.pretrained_file("ViTamin-S", "datacomp1b") == snapshot / "pytorch_model.safetensors"
    with pytest.raises(DownloadError, match="models--jienengchen--ViTamin-B"):
        hub.pretrained_file("ViTamin-B", "datacomp1b")


def test_open_clip_hub_repo_loads_like_open_clip(offline_cache, tmp_path, monkeypatch, images):
    """A small architecture in open_clip's Hub layout (its save_config_for_hf, SigLIP-style
    preprocessing): clipforge and open_clip, both offline from the same cache, give the same
    transform output and the same features."""
    from open_clip.push_to_hf_hub import save_config_for_hf

    import clipforge

    model_cfg = {"embed_dim": 32, "init_logit_bias": -10,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip
    local = tmp_path / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(0)
    oc_model = open_clip.create_model(f"local-dir:{local}")
    oc_model.visual.preprocess_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
                                      "resize_mode": "squash"}  # fmt: skip
    oc_model.visual.image_mean, oc_model.visual.image_std = (0.5,) * 3, (0.5,) * 3
    save_config_for_hf(oc_model, tmp_path / "open_clip_config.json", model_cfg)
    save_safetensors(oc_model.state_dict(), tmp_path / "open_clip_model.safetensors")
    repo = "test-org/tiny-siglip-layout"
    populate(
        offline_cache,
        repo,
        {n: tmp_path / n for n in ("open_clip_config.json", "open_clip_model.safetensors")},
    )

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import otherwise
    oc, _, oc_val = open_clip.create_model_and_transforms(f"hf-hub:{repo}", cache_dir=str(offline_cache))
    cf, _, cf_val = clipforge.create_model_and_transforms(f"hf-hub:{repo}")
    oc.eval(), cf.eval()
    assert _max_diff(cf_val, oc_val, images) == 0.0
    batch = torch.stack([cf_val(im) for im in images])
    text = open_clip.tokenize(["a photo", "an icon of a folder"])
    with torch.no_grad():
        image_diff = float((cf.encode_image(batch) - oc.encode_image(batch)).abs().max())
        text_diff = float((cf.encode_text(text) - oc.encode_text(text)).abs().max())
    assert image_diff < 1e-5 and text_diff < 1e-5, (image_diff, text_diff)
    assert cf.logit_bias.item() == pytest.approx(oc.logit_bias.item())
    print(f"\nhub layout parity: image {image_diff:.2e}, text {text_diff:.2e}")


def test_online_resolution_fetches_the_tokenizer_files_the_repo_has(offline_cache, monkeypatch):
    """Online, the files beside the config that the repository lists are fetched into the same
    snapshot (one listing request, then only those files); absent ones are not asked for."""
    import huggingface_hub

    snapshot = populate(
        offline_cache, SO400M, {"open_clip_config.json": b"{}", "open_clip_model.safetensors": b"x"}
    )
    asked: list[str] = []

    def fake_download(repo_id, filename, **kwargs):  # what hf_hub_download does: file into the snapshot
        asked.append(filename)
        (snapshot / filename).write_bytes(b"{}")
        return str(snapshot / filename)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub.hub_files, "endpoint_reachable", lambda: True)
    monkeypatch.setattr(
        hub, "_repo_listing", lambda ref: {"open_clip_config.json", "tokenizer.json", "spiece.model"}
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    got = hub.resolve_hub_files(f"hf-hub:{SO400M}")
    assert sorted(asked) == ["spiece.model", "tokenizer.json"]
    assert sorted(p.name for p in got.tokenizer) == ["spiece.model", "tokenizer.json"]
    assert {p.parent for p in got.tokenizer} == {snapshot} == {got.folder}
