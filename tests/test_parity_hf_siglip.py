"""Hugging Face ``SiglipModel`` / ``Siglip2Model`` folders <-> clipforge (transformers is the oracle).

Random-weight folders (tiny and base-width image towers) are written with ``save_pretrained``
and read through clipforge's loader. The mapped weights must compute, inside the model under
test, exactly what transformers' ``get_image_features`` / ``get_text_features`` compute on real
photographs and token batches; ``convert --to hf`` must give back every tensor and config field.

A Siglip2 folder (a ``Siglip2ImageProcessor``) is preprocessed as transformers does by default:
NaFlex, each photo at its own aspect ratio with at most the file's ``max_num_patches`` patches, a
padded batch of mixed patch grids. ``image_naflex=False`` (``--no-naflex``) keeps the fixed square
size, which must still give the numbers it gave before NaFlex became the default.

Models under test, both loaded from the same mapped state dict: clipforge's own model
(``create_model(None, pretrained=folder)``), and open_clip's ``CustomTextCLIP`` with the config's
timm trunk (open_clip is a test-only oracle), which checks the mapping against the key layout
clipforge's SigLIP towers share with open_clip independently of those towers' code.
"""

from __future__ import annotations

import contextlib
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
NAFLEX_MOST = 64
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
    # NaFlex patch Linear over a 4x4 position table, written in shards; its processor allows up to
    # NAFLEX_MOST patches (not the table's 16, so a writer deriving the number from the square size fails)
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
        transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=NAFLEX_MOST).save_pretrained(folder)
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


#: (width, height) fractions of the 455x300 photos: their own 3:2, tall, square, very wide
ASPECTS = ((1.0, 1.0), (0.35, 1.0), (0.66, 1.0), (1.0, 0.3))


@functools.cache
def _aspect_photos() -> tuple[Image.Image, ...]:
    """The decoded photos cropped to several aspect ratios, in their own modes (RGBA included)."""
    out = []
    for i, (fw, fh) in enumerate(ASPECTS):
        im = _decoded()[i % len(_decoded())]
        out.append(im.crop((0, 0, round(im.width * fw), round(im.height * fh))))
    return tuple(out)


def _rgb(images) -> list[Image.Image]:
    """What transformers' Siglip2ImageProcessor is fed: it converts no mode by default (an RGBA image
    fails in its normalisation), so RGB; the RGBA photos are opaque, so no alpha rule is involved."""
    assert all(im.mode != "RGBA" or im.getextrema()[3] == (255, 255) for im in images)
    return [im.convert("RGB") for im in images]


def _images(pre: dict, square: bool = False) -> torch.Tensor:
    from clipforge.transforms import PreprocessConfig, image_transform

    transform = image_transform(PreprocessConfig.from_dict(pre), is_train=False)
    return torch.stack([transform(im) for im in _decoded(square)])


def _naflex_batch(transform, images, length: int) -> dict:
    """clipforge's padded NaFlex batch of ``images`` (the collate ``clipforge eval``/``embed`` use)."""
    from clipforge.naflex_transforms import naflex_collate

    return naflex_collate([transform(im) for im in images], length)


def _processor_inputs(folder: Path, images) -> dict:
    """transformers' own preprocessing of ``images`` for the folder (its saved image processor)."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    return dict(processor(images=_rgb(images), return_tensors="pt"))


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


_HF_FEATURES: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _hf_features(
    case: tuple, images: torch.Tensor | dict, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' image and text features of a case's inputs (pixels at the fixed size, or the
    processor's NaFlex dict), computed once per case and input kind."""
    name, kind, hf_model, _ = case
    key = (name, "naflex" if isinstance(images, dict) else "fixed")
    if key not in _HF_FEATURES:
        with torch.no_grad():
            text = hf_model.get_text_features(input_ids=tokens).pooler_output
            if isinstance(images, dict):
                image = hf_model.get_image_features(**images).pooler_output
            else:
                image = _hf_image_features(hf_model, kind, images, hf_model.config.vision_config.patch_size)
        _HF_FEATURES[key] = (image, text)
    return _HF_FEATURES[key]


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


def model_under_test(which: str, folder: Path, **options) -> torch.nn.Module:
    if which == "clipforge":
        from clipforge.factory import create_model

        return create_model(None, pretrained=folder, **options).eval()
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
    # Siglip2: NaFlex at the file's numbers, as transformers preprocesses; Siglip: a fixed size
    naflex = (pre.get("naflex_max_patches"), pre.get("naflex_patch_size"))
    assert naflex == ((NAFLEX_MOST, 8) if kind == "siglip2" else (None, None))
    from clipforge.factory import create_model

    fixed = create_model(None, pretrained=folder, image_naflex=False).preprocess_cfg.to_dict()
    assert "naflex_max_patches" not in fixed  # the fixed-size option: the square fields underneath
    for fields in (pre, fixed):
        assert (
            tuple(fields["mean"]),
            tuple(fields["std"]),
            fields["do_center_crop"],
            list(fields["resize_size"]),
        ) == (
            (0.5,) * 3,
            (0.5,) * 3,
            False,
            [expected_size] * 2,
        )
        assert fields["interpolation"] == ("bilinear" if kind == "siglip2" else "bicubic")
    from clipforge.transforms import PreprocessConfig

    assert fixed == {
        k: v for k, v in PreprocessConfig.from_dict(pre).to_dict().items() if not k.startswith("naflex_")
    }
    assert loaded.tokenizer_cfg == {"type": "hf", "name": str(folder), "context_length": t.context_length,
                                    "clean": "canonicalize"}  # fmt: skip
    assert (loaded.extra.get("architecture") == hf_siglip.SIGLIP2_LABEL) is (kind == "siglip2")


def test_preprocessing_equals_the_folders_image_processor_on_photos(case):
    """The default transform of the folder equals its own image processor on real photos:
    SiglipImageProcessor (a fixed size) on photos of any aspect; Siglip2ImageProcessor (NaFlex)
    on photos of several aspect ratios, each at its own patch grid, padded to max_num_patches."""
    from clipforge.factory import create_model_and_transforms

    name, kind, hf_model, folder = case
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    if kind == "siglip":
        want = processor(images=list(_decoded()), return_tensors="pt")["pixel_values"]
        got = _images(_loaded(folder).preprocess_cfg)
    else:
        _, _, transform = create_model_and_transforms(None, folder)
        ref = _processor_inputs(folder, _aspect_photos())
        want = ref["pixel_values"]
        ours = _naflex_batch(transform, _aspect_photos(), want.shape[1])
        shapes = ours["spatial_shapes"].tolist()
        assert shapes == ref["spatial_shapes"].tolist() and len(set(map(tuple, shapes))) == len(ASPECTS)
        assert any(h != w for h, w in shapes) and want.shape[1] == NAFLEX_MOST
        assert torch.equal(ours["patch_mask"].long(), ref["pixel_attention_mask"].long())
        got = ours["patches"]
    diff = (want - got).abs().max().item()
    print(f"{name} preprocessing vs {type(processor).__name__}: max abs diff {diff:.3g}")
    assert diff < 1e-5


def _square_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Fixed-size pixels as Siglip2's flattened patches (row, column, channel)."""
    b, c, h, w = images.shape
    grid = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return grid.reshape(b, (h // patch) * (w // patch), -1)


def test_fixed_size_option_keeps_the_square_numbers(siglip2_tiny):
    """``image_naflex=False``: the square resize the folder loaded with before NaFlex was its
    default. On square photos it equals a Siglip2ImageProcessor whose budget is the model's own
    4x4 grid, and the features equal transformers' at that grid."""
    from clipforge.factory import create_model_and_transforms

    name, kind, hf_model, folder = siglip2_tiny
    model, _, transform = create_model_and_transforms(None, folder, image_naflex=False)
    pixels = torch.stack([transform(im) for im in _decoded(square=True)])
    assert pixels.shape[1:] == (3, 32, 32)
    ref = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)(
        images=_rgb(_decoded(square=True)), return_tensors="pt"
    )
    assert ref["spatial_shapes"].tolist() == [[4, 4]] * len(_decoded(square=True))
    diff = (ref["pixel_values"] - _square_patches(pixels, 8)).abs().max().item()
    with torch.no_grad():
        ours = model.eval().encode_image(pixels)
    d_img = (ours - _hf_image_features(hf_model, kind, pixels, 8)).abs().max().item()
    print(f"{name} --no-naflex: preprocessing max abs diff {diff:.3g}, image features {d_img:.3g}")
    assert diff < 1e-5 and d_img < TOL


@pytest.mark.parametrize("which", MODELS_UNDER_TEST)
def test_features_equal_transformers(case, which):
    """Each model on its default inputs. A Siglip2 folder's are NaFlex: clipforge's padded batch of
    photos of mixed aspect ratios against transformers' own processor output. (open_clip's model
    takes square pixels only: the fixed-size path, which still checks the weight mapping.)"""
    from clipforge.transforms import image_transform

    name, kind, hf_model, folder = case
    model = model_under_test(which, folder)
    loaded = _loaded(folder)
    tokens = _tokens(loaded.config.text.vocab_size, loaded.config.text.context_length)
    if kind == "siglip2" and which == "clipforge":
        hf_in = _processor_inputs(folder, _aspect_photos())
        images = _naflex_batch(image_transform(model.preprocess_cfg), _aspect_photos(), NAFLEX_MOST)
        assert images["spatial_shapes"].tolist() == hf_in["spatial_shapes"].tolist()
    else:
        fixed = {k: v for k, v in loaded.preprocess_cfg.items() if not k.startswith("naflex_")}
        hf_in = images = _images(fixed)
    with torch.no_grad():
        ours_img, ours_txt = model.encode_image(images), model.encode_text(tokens)
    hf_img, hf_txt = _hf_features(case, hf_in, tokens)
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
    config field equal, the image processor (a Siglip2 one with the file's max_num_patches, not
    the square grid's 16) and tokenizer files alongside; clipforge reads it back with the same
    preprocessing and, for the NaFlex folder, identical features."""
    from clipforge.factory import create_model_and_transforms

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
    assert _loaded(out).preprocess_cfg == _loaded(folder).preprocess_cfg
    if kind == "siglip2":
        assert (processor.max_num_patches, processor.patch_size) == (NAFLEX_MOST, 8)
        models = [create_model_and_transforms(None, f) for f in (folder, out)]
        assert [(t.max_num_patches, t.patch_size) for _, _, t in models] == [(NAFLEX_MOST, 8)] * 2
        with torch.no_grad():
            feats = [
                m.eval().encode_image(_naflex_batch(t, _aspect_photos(), NAFLEX_MOST)) for m, _, t in models
            ]
        assert torch.equal(feats[0], feats[1])


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
    # the model's own square input (a clipforge model built from a config preprocesses at a fixed size)
    images = _images(model.preprocess_cfg.to_dict())
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
    # a fixed-size model's Siglip2 processor allows the patches of its square size (4x4 of 8 px)
    most = loaded.preprocess_cfg.get("naflex_max_patches")
    assert most == (16 if kind == "siglip2" else None)


def test_naflex_clipforge_model_is_written_as_siglip2_with_its_patch_budget(tmp_path):
    """A clipforge SigLIP whose preprocessing is NaFlex: ``save_hf_siglip`` (``convert --to hf``)
    writes a Siglip2Model (the only transformers model taking NaFlex inputs) whose
    Siglip2ImageProcessor has the model's max_num_patches / patch_size; transformers' processor and
    model on that folder compute clipforge's features, and clipforge reads the same settings back."""
    import dataclasses

    from clipforge.factory import create_model_and_transforms

    model = _clipforge_siglip()
    model.preprocess_cfg = dataclasses.replace(
        model.preprocess_cfg, naflex_max_patches=36, naflex_patch_size=8
    )
    out = hf_siglip.save_hf_siglip(model, tmp_path / "naflex")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Siglip2Model"]
    processor = transformers.Siglip2ImageProcessor.from_pretrained(out)
    assert (processor.max_num_patches, processor.patch_size) == (36, 8)
    again, _, transform = create_model_and_transforms(None, out)
    assert (transform.max_num_patches, transform.patch_size) == (36, 8)
    hf_in = dict(processor(images=_rgb(_aspect_photos()), return_tensors="pt"))
    batch = _naflex_batch(transform, _aspect_photos(), 36)
    with torch.no_grad():
        hf_img = (
            transformers.Siglip2Model.from_pretrained(out).eval().get_image_features(**hf_in).pooler_output
        )
        ours, reread = model.eval().encode_image(batch), again.eval().encode_image(batch)
    d_img = (ours - hf_img).abs().max().item()
    print(f"NaFlex clipforge SigLIP written as Siglip2Model: image {d_img:.3g}")
    assert hf_img.abs().max().item() > 0.1 and d_img < TOL
    assert (reread - ours).abs().max().item() < TOL


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
    # the NaFlex budget survives the clipforge folder (stored with its preprocessing)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.to_dict() == transformers.AutoImageProcessor.from_pretrained(folder).to_dict()


def test_hf_hub_siglip2_repo_defaults_to_naflex(siglip2_tiny, offline_cache):
    """``hf-hub:`` repos in the Siglip2 format load as the folder does: NaFlex by default."""
    from helpers import populate

    from clipforge.factory import create_model, create_model_and_transforms

    name, kind, hf_model, folder = siglip2_tiny
    populate(offline_cache, "test-org/siglip2-naflex", folder)
    _, _, transform = create_model_and_transforms("hf-hub:test-org/siglip2-naflex")
    assert (transform.max_num_patches, transform.patch_size) == (NAFLEX_MOST, 8)
    fixed = create_model(pretrained="hf-hub:test-org/siglip2-naflex", image_naflex=False)
    assert fixed.preprocess_cfg.naflex_max_patches is None and fixed.preprocess_cfg.size == (32, 32)


def test_processor_patch_size_must_be_the_models(siglip2_tiny, tmp_path):
    """A Siglip2ImageProcessor cutting other patches than the model embeds is refused by name, and
    image_naflex=True on a fixed-size model says where NaFlex comes from."""
    import shutil

    from clipforge.factory import create_model

    name, kind, hf_model, folder = siglip2_tiny
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    document = json.loads((bad / "preprocessor_config.json").read_text())
    document.pop("patch_size")  # transformers' default, 16, is not the model's 8
    (bad / "preprocessor_config.json").write_text(json.dumps(document))
    with pytest.raises(
        CheckpointError, match=r"preprocessor_config.json: patch_size=16 \(the default\) differs"
    ):
        load_any(bad)
    with pytest.raises(ConfigError, match="image_naflex=True: these weights' preprocessing is fixed-size"):
        create_model("tiny-siglip2", image_naflex=True)


def _save_photos(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"{i}.png" for i in range(len(_aspect_photos()))]
    for im, path in zip(_aspect_photos(), paths):
        im.convert("RGB").save(path)
    return paths


def test_cli_on_a_siglip2_folder_defaults_to_naflex(siglip2_tiny, tmp_path, capsys):
    """``clipforge embed --pretrained FOLDER`` stores NaFlex features (each photo at its aspect
    ratio), ``--no-naflex`` the fixed-size ones; an index of the former answers image queries with
    NaFlex; ``clipforge export`` refuses the image graph of the NaFlex default and writes the
    square graph with ``--no-naflex``."""
    import numpy as np
    from helpers import run_cli

    from clipforge.factory import create_model_and_transforms

    name, kind, hf_model, folder = siglip2_tiny
    paths = _save_photos(tmp_path / "photos")
    stored = {}
    for flags in ((), ("--no-naflex",)):
        out = tmp_path / f"emb{len(flags)}"
        assert run_cli(["embed", "--pretrained", str(folder), "--images", str(tmp_path / "photos"), "--out", str(out),
                        "--workers", "0", "--dtype", "float32", "--no-captions", "--batch-size", "3", *flags]) == 0  # fmt: skip
        stored[flags] = np.concatenate([np.load(p) for p in sorted(out.rglob("img_emb_*.npy"))])
    for flags, options in (((), {}), (("--no-naflex",), {"image_naflex": False})):
        model, _, transform = create_model_and_transforms(None, folder, **options)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            ims = [stack.enter_context(Image.open(p)) for p in sorted(paths)]
            items = [transform(im) for im in ims]
            batch = _naflex_batch(lambda x: x, items, NAFLEX_MOST) if not options else torch.stack(items)
            want = model.eval().encode_image(batch, normalize=True).numpy()
        assert stored[flags].shape == want.shape and float(np.abs(stored[flags] - want).max()) < 1e-5
    assert float(np.abs(stored[()] - stored[("--no-naflex",)]).max()) > 1e-3  # the flag matters
    # image queries of the index get the NaFlex preprocessing its rows were embedded with
    from clipforge.search.searcher import Searcher

    assert run_cli(["index", str(tmp_path / "emb0"), "--out", str(tmp_path / "idx")]) == 0
    with contextlib.ExitStack() as stack:
        queried = Searcher(tmp_path / "idx").encode_images(
            [stack.enter_context(Image.open(p)) for p in paths]
        )
    assert float(np.abs(queried - stored[()]).max()) < 1e-5
    capsys.readouterr()
    assert (
        run_cli(["export", "--pretrained", str(folder), "--out", str(tmp_path / "x"), "--towers", "image"])
        == 2
    )
    assert f"naflex_max_patches={NAFLEX_MOST}" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert run_cli(["export", "--pretrained", str(folder), "--out", str(tmp_path / "onnx"), "--towers", "image",
                    "--no-naflex"]) == 0  # fmt: skip
    assert "max abs diff vs PyTorch" in capsys.readouterr().out


def test_eval_cli_preprocesses_a_siglip2_folder_with_naflex_unless_told(siglip2_tiny, tmp_path, monkeypatch):
    """``clipforge eval --pretrained FOLDER`` runs with the folder's NaFlex transform (padded batches
    of mixed patch grids; Siglip2ImageProcessor's resize), ``--no-naflex`` with the fixed-size one,
    ``--naflex-resize timm`` with timm's resize on the same budget; all finish."""
    from helpers import run_cli

    import clipforge.factory
    from clipforge.naflex_transforms import NaFlexTransform

    name, kind, hf_model, folder = siglip2_tiny
    for i, cls in enumerate(("w5", "w7")):  # class names in the folder tokenizer's vocabulary
        (tmp_path / "classes" / cls).mkdir(parents=True)
        for j, im in enumerate(_aspect_photos()[2 * i : 2 * i + 2]):
            im.convert("RGB").save(tmp_path / "classes" / cls / f"{j}.png")
    used = []
    real = clipforge.factory.create_model_and_transforms

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        used.append(out[2])
        return out

    monkeypatch.setattr(clipforge.factory, "create_model_and_transforms", recording)
    for flags in ((), ("--no-naflex",), ("--naflex-resize", "timm")):
        assert run_cli(["eval", "--pretrained", str(folder), "--task", "zeroshot", "--data", str(tmp_path / "classes"),
                        "--templates", "simple", "--output", str(tmp_path / f"zs{len(flags)}.json"), "--device", "cpu",
                        "--no-progress", "--batch-size", "4", *flags]) == 0  # fmt: skip
    assert isinstance(used[0], NaFlexTransform) and (used[0].max_num_patches, used[0].patch_size) == (
        NAFLEX_MOST,
        8,
    )
    assert not isinstance(used[1], NaFlexTransform)
    assert (used[0].resize, used[2].resize, used[2].max_num_patches) == ("siglip2", "timm", NAFLEX_MOST)
    assert json.loads((tmp_path / "zs0.json").read_text())["details"]["classnames"] == ["w5", "w7"]


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
