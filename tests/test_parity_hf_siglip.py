"""Hugging Face ``SiglipModel`` / ``Siglip2Model`` folders <-> clipforge (transformers is the oracle).

Random-weight folders (tiny and base-width image towers) are written with ``save_pretrained``
and read through clipforge's loader. The mapped weights must compute, inside the model under
test, exactly what transformers' ``get_image_features`` / ``get_text_features`` compute on real
photographs and token batches; ``convert --to hf`` must give back every tensor and config field.

Models under test, both loaded from the same mapped state dict: clipforge's own model
(``create_model(None, pretrained=folder)``), and open_clip's ``CustomTextCLIP`` with the config's
timm trunk (open_clip is a test-only oracle), which checks the mapping against the key layout
clipforge's SigLIP towers share with open_clip independently of those towers' code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import scratch_dir
from PIL import Image
from realdata import photos

from clipforge.checkpoints import hf_siglip
from clipforge.checkpoints.load import load_any
from clipforge.errors import CheckpointError, ConfigError
from clipforge.factory import convert_checkpoint

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

TOL = 1e-5
MODELS_UNDER_TEST = ("clipforge", "open_clip")
log = logging.getLogger(__name__)

_TINY_TEXT = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=100, max_position_embeddings=16)  # fmt: skip
_TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8
)
CASES = {
    # exact GELU in the image tower (timm's default), tanh GELU in the text tower
    "siglip-tiny": ("siglip", {**_TINY_VISION, "image_size": 32, "hidden_act": "gelu"}, _TINY_TEXT),
    # NaFlex patch Linear over a 4x4 position table, written in shards
    "siglip2-tiny": ("siglip2", {**_TINY_VISION, "num_patches": 16}, {**_TINY_TEXT, "hidden_act": "gelu"}),
    # SiglipVisionConfig's defaults (ViT-B/16 at 224, 12 layers); a 2-layer text tower of the same width
    "siglip-base": ("siglip", {}, dict(hidden_size=768, num_hidden_layers=2, vocab_size=1000)),
}


def _randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every bias / LayerNorm scale away from 0 / 1 so that no wrong mapping hides behind them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 and not name.startswith("logit"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("probe"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A small WordLevel tokenizer in HF's files (what the loader records and convert copies)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "</s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 64}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _hf_config(kind: str, vision: dict, text: dict):
    cls = transformers.Siglip2Config if kind == "siglip2" else transformers.SiglipConfig
    return cls(text_config=text, vision_config=vision)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """``(name, kind, HF model, folder)``: a random-weight folder as transformers writes it."""
    with scratch_dir(tmp_path_factory, request.param) as folder:  # siglip-base is ~400 MB
        yield _make_case(request.param, folder)


@pytest.fixture(scope="module")
def siglip2_tiny(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "siglip2-tiny") as folder:
        yield _make_case("siglip2-tiny", folder)


def _make_case(name: str, folder: Path) -> tuple:
    kind, vision, text = CASES[name]
    cls = transformers.Siglip2Model if kind == "siglip2" else transformers.SiglipModel
    model = _randomize_(cls(_hf_config(kind, vision, text)), seed=len(name))
    model.save_pretrained(folder, max_shard_size="100KB" if kind == "siglip2" else "2GB")
    if kind == "siglip":
        size = model.config.vision_config.image_size
        transformers.SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    else:
        transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(folder)
    _write_tokenizer(folder, model.config.text_config.vocab_size)
    return name, kind, model, folder


@functools.cache
def _loaded(folder: Path):
    """clipforge's reading of a folder (through the public loader), once per folder."""
    return load_any(folder)


# --- inputs ---------------------------------------------------------------------------------------
def _photos(n: int = 3, square: bool = False) -> list[Path]:
    """The smallest real photographs (RGBA PNGs among them; ``square``: the 4096x4096 WebPs)."""
    found = [p for p in photos() if not square or p.suffix == ".webp"]
    return sorted(found, key=os.path.getsize)[:n]


@functools.cache
def _decoded(square: bool = False) -> tuple[Image.Image, ...]:
    """The photos decoded once and shrunk 8x by PIL's exact box ``reduce`` (still real photos, in
    their own modes, RGBA included, at 455-512 pixels a side instead of 2400-4096)."""
    out = []
    for path in _photos(square=square):
        with Image.open(path) as im:
            out.append(im.reduce(8))
    return tuple(out)


def _images(pre: dict, square: bool = False) -> torch.Tensor:
    from clipforge.transforms import PreprocessConfig, image_transform

    transform = image_transform(PreprocessConfig.from_dict(pre), is_train=False)
    return torch.stack([transform(im) for im in _decoded(square)])


def _tokens(vocab: int, context: int) -> torch.Tensor:
    """Rows of random ids, one full-length and others padded with HF's pad id (1) to the context."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, context), generator=g)
    ids[1, context // 2 :] = 1
    ids[2, 3:] = 1
    return ids


def _hf_image_features(model, kind: str, images: torch.Tensor, patch: int) -> torch.Tensor:
    with torch.no_grad():
        if kind == "siglip":
            return model.get_image_features(pixel_values=images).pooler_output
        b, c, h, w = images.shape
        gh, gw = h // patch, w // patch  # Siglip2's processor flattens patches as (row, column, channel)
        patches = images.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, -1)
        mask = torch.ones(b, gh * gw, dtype=torch.long)
        shapes = torch.tensor([[gh, gw]] * b)
        return model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                        spatial_shapes=shapes).pooler_output  # fmt: skip


_HF_FEATURES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _hf_features(
    case: tuple, images: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' image and text features of a case's inputs, computed once per case."""
    name, kind, hf_model, _ = case
    if name not in _HF_FEATURES:
        with torch.no_grad():
            text = hf_model.get_text_features(input_ids=tokens).pooler_output
        _HF_FEATURES[name] = (
            _hf_image_features(hf_model, kind, images, hf_model.config.vision_config.patch_size),
            text,
        )
    return _HF_FEATURES[name]


# --- the model under test -------------------------------------------------------------------------
def open_clip_model(cfg, sd: dict) -> torch.nn.Module:
    """open_clip's CustomTextCLIP for ``cfg`` with clipforge's mapped weights (strict load).

    open_clip's TimmModel passes no extra kwargs to timm (open_clip configs have none), so its
    trunk is rebuilt with the ``timm_kwargs`` the clipforge config records.
    """
    v, t = cfg.vision, cfg.text
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                    layers=t.layers, mlp_ratio=t.mlp_ratio, no_causal_mask=t.no_causal_mask, proj_bias=t.proj_bias,
                    pool_type=t.pool_type, norm_kwargs={"eps": t.norm_eps},
                    act_kwargs={"approximate": t.act_approximate})  # fmt: skip
    vision_cfg = dict(timm_model_name=v.timm_model_name, timm_pool=v.timm_pool, timm_proj=v.timm_proj,
                      image_size=v.image_size)  # fmt: skip
    with torch.device("meta"):  # every weight comes from ``sd``: skip both libraries' random init
        model = open_clip.model.CustomTextCLIP(
            cfg.embed_dim, vision_cfg, text_cfg, init_logit_bias=cfg.init_logit_bias
        )
        model.visual.trunk = timm.create_model(v.timm_model_name, num_classes=0, global_pool=v.timm_pool,
                                               **v.timm_kwargs)  # fmt: skip
    oc_sd = {re.sub(r"\.attn\.in_proj\.(weight|bias)$", r".attn.in_proj_\1", k): x for k, x in sd.items()}
    model.load_state_dict(oc_sd, strict=True, assign=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return model.eval()


def model_under_test(which: str, folder: Path) -> torch.nn.Module:
    if which == "clipforge":
        from clipforge.factory import create_model

        return create_model(None, pretrained=folder).eval()
    loaded = _loaded(folder)
    return open_clip_model(loaded.config, loaded.state_dict)


# --- tests ----------------------------------------------------------------------------------------
def test_folder_loads_with_siglip_config_preprocessing_and_tokenizer(case):
    name, kind, hf_model, folder = case
    loaded = _loaded(folder)
    cfg, hv = loaded.config, hf_model.config.vision_config
    assert loaded.format == "hf" and cfg.custom_text and cfg.init_logit_bias == -10.0
    v, t = cfg.vision, cfg.text
    assert (v.timm_pool, v.timm_proj, t.pool_type, t.no_causal_mask, t.proj_bias) == (
        "map",
        "none",
        "last",
        True,
        True,
    )
    assert t.norm_eps == 1e-6 and t.context_length == hf_model.config.text_config.max_position_embeddings
    assert t.act_approximate == (
        "tanh" if hf_model.config.text_config.hidden_act == "gelu_pytorch_tanh" else "none"
    )
    if name == "siglip-base":  # the open_clip ViT-B-16-SigLIP trunk, with HF's tanh GELU as the only kwarg
        assert (v.timm_model_name, v.timm_kwargs) == (
            "vit_base_patch16_siglip_224",
            {"act_layer": "gelu_tanh"},
        )
    facts = hf_siglip.trunk_facts(hf_siglip.meta_trunk(v.timm_model_name, v.timm_kwargs))
    assert (
        facts["embed_dim"],
        facts["depth"],
        facts["num_heads"],
        facts["mlp_hidden"],
        facts["patch_size"],
    ) == (hv.hidden_size, hv.num_hidden_layers, hv.num_attention_heads, hv.intermediate_size, hv.patch_size)
    assert facts["act"] == hv.hidden_act
    expected_size = 4 * 8 if kind == "siglip2" else hv.image_size  # Siglip2: sqrt(num_patches) * patch
    assert v.image_size == expected_size and loaded.preprocess_cfg["image_size"] == expected_size
    pre = loaded.preprocess_cfg
    assert (pre["mean"], pre["std"], pre["do_center_crop"], pre["resize_size"]) == (
        (0.5,) * 3,
        (0.5,) * 3,
        False,
        [expected_size] * 2,
    )
    assert pre["interpolation"] == ("bilinear" if kind == "siglip2" else "bicubic")
    assert loaded.tokenizer_cfg == {"type": "hf", "name": str(folder), "context_length": t.context_length,
                                    "clean": "canonicalize"}  # fmt: skip
    assert (loaded.extra.get("architecture") == hf_siglip.SIGLIP2_LABEL) is (kind == "siglip2")


def test_preprocessing_equals_the_folders_image_processor_on_photos(case):
    """SiglipImageProcessor on photos of any aspect; Siglip2's (NaFlex keeps the aspect, which the
    fixed-size model cannot) on square photos, where its patch grid is the model's own."""
    name, kind, hf_model, folder = case
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pre = _loaded(folder).preprocess_cfg
    if kind == "siglip":
        want = processor(images=list(_decoded()), return_tensors="pt")["pixel_values"]
        got = _images(pre)
    else:
        out = processor(images=list(_decoded(square=True)), return_tensors="pt")
        assert out["spatial_shapes"].tolist() == [[4, 4]] * len(_decoded(square=True))
        want, patch = out["pixel_values"], hf_model.config.vision_config.patch_size
        got = _images(pre, square=True)
        b, c, h, w = got.shape
        got = (
            got.reshape(b, c, h // patch, patch, w // patch, patch)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(b, 16, -1)
        )
    diff = (want - got).abs().max().item()
    print(f"{name} preprocessing vs {type(processor).__name__}: max abs diff {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("which", MODELS_UNDER_TEST)
def test_features_equal_transformers(case, which):
    name, kind, hf_model, folder = case
    model = model_under_test(which, folder)
    loaded = _loaded(folder)
    images = _images(loaded.preprocess_cfg)
    tokens = _tokens(loaded.config.text.vocab_size, loaded.config.text.context_length)
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images), model.encode_text(tokens)
    hf_img, hf_txt = _hf_features(case, images, tokens)
    d_img, d_txt = (ours_img - hf_img).abs().max().item(), (ours_txt - hf_txt).abs().max().item()
    print(f"{name} ({which}) vs transformers: image {d_img:.3g}, text {d_txt:.3g}")
    assert min(hf_img.abs().max().item(), hf_txt.abs().max().item()) > 0.1  # a tolerance that means something
    assert d_img < TOL and d_txt < TOL
    # the logit scalars, reshaped from HF's [1]
    assert model.logit_bias.item() == hf_model.logit_bias.item()
    assert model.logit_scale.item() == hf_model.logit_scale.item()


def test_tokenizer_is_the_folders_own(case):
    """The recorded ``type: hf`` tokenizer gives the ids transformers' tokenizer of the folder gives
    (padded to the context), through the model and through the folder alone."""
    from clipforge.factory import get_tokenizer

    name, kind, hf_model, folder = case
    context = hf_model.config.text_config.max_position_embeddings
    texts = ["w5 w7 w9", "w3", " ".join(f"w{i}" for i in range(3, 3 + 2 * context))]  # the last is truncated
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    want = reference(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
    assert _loaded(folder).config.text.hf_tokenizer_name == str(folder)
    for tokenizer in (get_tokenizer(str(folder)), get_tokenizer(_loaded(folder).config)):
        assert torch.equal(tokenizer(texts), want["input_ids"])


def test_mapping_round_trip_is_bit_exact(case):
    """HF -> clipforge -> HF at the mapping level: every tensor and every config field."""
    name, kind, hf_model, folder = case
    loaded = _loaded(folder)
    back = hf_siglip.clipforge_to_hf_siglip(loaded.state_dict, kind)
    ref = hf_model.state_dict()
    assert sorted(back) == sorted(ref)
    assert all(back[k].shape == ref[k].shape and torch.equal(back[k], ref[k]) for k in ref)
    v = loaded.config.vision
    trunk = hf_siglip.meta_trunk(v.timm_model_name, v.timm_kwargs)
    document = hf_siglip.config_to_hf_siglip(loaded.config, trunk, kind)
    assert _config_fields(
        _hf_config(kind, document["vision_config"], document["text_config"])
    ) == _config_fields(hf_model.config)


def _config_fields(config) -> dict:
    fields = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "dtype"):
        fields.pop(key, None)
    return fields


def test_convert_to_hf_round_trip_is_bit_exact(case, tmp_path):
    """``convert --to hf`` of the loaded folder: transformers reads it back with every tensor and
    config field equal, the image processor and tokenizer files alongside."""
    name, kind, hf_model, folder = case
    out = convert_checkpoint(folder, tmp_path / "hf", "hf")
    cls = transformers.Siglip2Model if kind == "siglip2" else transformers.SiglipModel
    again = cls.from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(hf_model).__name__]
    ref, got = hf_model.state_dict(), again.state_dict()
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    auto = transformers.AutoConfig.from_pretrained
    assert _config_fields(auto(out)) == _config_fields(auto(folder))  # what each folder's config.json says
    assert again.config.architectures == [type(hf_model).__name__]
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / file).read_bytes() == (folder / file).read_bytes()
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    original = transformers.AutoImageProcessor.from_pretrained(folder)
    assert type(processor) is type(original) and processor.to_dict() == original.to_dict()


# --- refusals -------------------------------------------------------------------------------------
def _document(kind: str = "siglip", **vision) -> dict:
    config = _hf_config(kind, {**_TINY_VISION, **vision}, _TINY_TEXT).to_dict()
    config["architectures"] = ["Siglip2Model" if kind == "siglip2" else "SiglipModel"]
    return config


@pytest.mark.parametrize(
    "kind, vision, match",
    [
        ("siglip", {"vision_use_head": False}, "vision_use_head=false"),
        ("siglip", {"hidden_act": "relu"}, "hidden_act 'relu'"),
        ("siglip", {"layer_norm_eps": 1e-5}, "layer_norm_eps"),
        ("siglip", {"num_channels": 1}, "num_channels=1"),
        ("siglip2", {"num_patches": 15}, "num_patches=15 is not a square grid"),
    ],
)
def test_inexpressible_hf_configs_are_refused_by_name(kind, vision, match):
    with pytest.raises(CheckpointError, match=match):
        hf_siglip.config_from_hf_siglip(_document(kind, **vision), "config.json")


def test_detection_by_model_type_or_architectures():
    doc = _document("siglip2")
    assert hf_siglip.siglip_kind(doc) == "siglip2"
    doc.pop("model_type")
    assert hf_siglip.siglip_kind(doc) == "siglip2"  # architectures alone
    assert hf_siglip.siglip_kind({"model_type": "clip", "architectures": ["CLIPModel"]}) is None


def test_projection_size_must_equal_image_width():
    doc = _document()
    doc["text_config"]["projection_size"] = 16
    with pytest.raises(CheckpointError, match="projection_size 16 differs from the image width 32"):
        hf_siglip.config_from_hf_siglip(doc)


def test_a_clip_model_is_not_written_as_siglip(tmp_path):
    from clipforge.factory import create_model

    model = create_model("tiny-vit")
    assert not hf_siglip.is_siglip_config(model.config)
    with pytest.raises(ConfigError, match="needs a timm image trunk"):
        hf_siglip.save_hf_siglip(model, tmp_path / "out")


# --- clipforge-origin models ----------------------------------------------------------------------
def _clipforge_siglip():
    """A tiny SigLIP 2 as clipforge builds open_clip's ViT-B-16-SigLIP2 config (exact-GELU timm trunk,
    tanh-GELU text tower), random weights."""
    from clipforge.checkpoints.open_clip_config import config_from_open_clip
    from clipforge.factory import create_model

    cfg = config_from_open_clip(open_clip.get_model_config("ViT-B-16-SigLIP2"), "ViT-B-16-SigLIP2").replace(
        embed_dim=32,
        vision={"image_size": 32, "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 4, "patch_size": 8,
                                                  "img_size": 32, "mlp_ratio": 2.0}},
        text={"width": 32, "heads": 4, "layers": 2, "vocab_size": 100, "context_length": 16,
              "hf_tokenizer_name": None, "tokenizer_kwargs": {}},
    )  # fmt: skip
    return _randomize_(create_model(cfg), seed=7)


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_clipforge_siglip_written_as_hf_computes_the_same(kind, tmp_path):
    """A clipforge (open_clip-config) SigLIP written as a SiglipModel / Siglip2Model folder: transformers
    computes clipforge's features; reading the folder back gives every tensor and the architecture."""
    model = _clipforge_siglip()
    out = hf_siglip.save_hf_siglip(model, tmp_path / kind, kind=kind)
    cls = transformers.Siglip2Model if kind == "siglip2" else transformers.SiglipModel
    again = cls.from_pretrained(out).eval()
    assert (
        again.config.vision_config.hidden_act == "gelu"
        and again.config.text_config.hidden_act == "gelu_pytorch_tanh"
    )
    images = _images(_loaded(out).preprocess_cfg)
    tokens = _tokens(100, 16)
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images), model.encode_text(tokens)
        hf_txt = again.get_text_features(input_ids=tokens).pooler_output
    hf_img = _hf_image_features(again, kind, images, 8)
    d_img, d_txt = (ours_img - hf_img).abs().max().item(), (ours_txt - hf_txt).abs().max().item()
    print(f"clipforge SigLIP written as {cls.__name__}: image {d_img:.3g}, text {d_txt:.3g}")
    assert d_img < TOL and d_txt < TOL
    loaded, own = _loaded(out), model.state_dict()
    assert sorted(loaded.state_dict) == sorted(own) and all(
        torch.equal(loaded.state_dict[k], own[k]) for k in own
    )
    assert _timm_fields(loaded.config.vision) == _timm_fields(model.config.vision)
    assert loaded.config.text == model.config.text


def _timm_fields(v) -> dict:
    """What builds a timm tower (its ViT fields, patch_size/width/layers, are not read for one)."""
    names = ("image_size", "timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias", "timm_kwargs")
    return {n: getattr(v, n) for n in names}


def test_siglip2_survives_a_clipforge_folder_and_the_cli(siglip2_tiny, tmp_path):
    """Siglip2 -> clipforge folder -> ``clipforge convert --to hf``: still a Siglip2Model, bit-exact."""
    from clipforge.cli import main

    name, kind, hf_model, folder = siglip2_tiny
    middle = convert_checkpoint(folder, tmp_path / "cf", "clipforge")
    assert main(["convert", str(middle), str(tmp_path / "hf"), "--to", "hf"]) == 0
    again = type(hf_model).from_pretrained(tmp_path / "hf")
    assert again.config.architectures == [type(hf_model).__name__]
    for file in ("tokenizer.json", "tokenizer_config.json"):  # found through the clipforge folder's record
        assert (tmp_path / "hf" / file).read_bytes() == (folder / file).read_bytes()
    ref, got = hf_model.state_dict(), again.state_dict()
    assert sorted(ref) == sorted(got) and all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.parametrize(
    "kind, vision, name, kwargs",
    [  # the shapes of Google's Hub releases (google/siglip-so400m-patch14-384, siglip-large-patch16-256,
        # siglip2-so400m-patch16-naflex), which use tanh GELU where timm's name may not
        ("siglip", dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                        patch_size=14, image_size=384), "vit_so400m_patch14_siglip_384", {"act_layer": "gelu_tanh"}),
        ("siglip", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        patch_size=16, image_size=256), "vit_large_patch16_siglip_256", {"act_layer": "gelu_tanh"}),
        ("siglip2", dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
                         patch_size=16, num_patches=256), "vit_so400m_patch16_siglip_256", {}),
    ],
)  # fmt: skip
def test_released_shapes_map_to_open_clips_timm_names(kind, vision, name, kwargs):
    width = vision["hidden_size"]
    doc = {"model_type": kind, "vision_config": vision,
           "text_config": {"hidden_size": width, "num_attention_heads": 16, "projection_size": width}}  # fmt: skip
    v = hf_siglip.config_from_hf_siglip(doc).vision
    assert (v.timm_model_name, v.timm_kwargs, v.image_size) == (
        name,
        kwargs,
        256 if kind == "siglip2" else vision["image_size"],
    )
