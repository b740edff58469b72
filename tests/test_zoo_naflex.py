"""open_clip main's SigLIP 2 NaFlex models in the zoo: names, facts, weights from the Hub cache.

Oracles: open_clip main's own model configs and pretrained entries (``tests/oracles/
open_clip_main_naflex.json``, written by ``tools/gen_main_architectures.py`` from a clone; open_clip
3.3, installed, has no NaFlex names), timm's ``naflexvit_*_siglip`` models, open_clip 3.3 building
open_clip main's config (its factory builds any timm trunk: that model's state dict is the layout
of the Hub files), and transformers' ``Siglip2VisionModel`` / ``Siglip2ImageProcessor`` (what the
``google/siglip2-*-naflex`` releases run) on the same weights.

The Hub repository ``timm/ViT-B-16-SigLIP2-naflex`` is written into a scratch cache in the Hub's
layout with random weights of the real shapes (375M parameters, 1.5 GB, removed when the module
ends); ViT-SO400M's architecture is checked on the meta device only.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import go_offline, populate, run_cli, scratch_dir
from PIL import Image
from realdata import photos

import clipforge
from clipforge.checkpoints import hub
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.checkpoints.pretrained import pretrained_entries
from clipforge.checkpoints.signatures import image_tower_hash
from clipforge.model.build import build_model
from clipforge.model.registry import IMAGE_TOWER_HASHES
from clipforge.naflex_transforms import NaFlexTransform, naflex_collate

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from test_zoo_timm import fill_, materialize  # noqa: E402

TOL = 1e-5
ORACLE = json.loads((Path(__file__).parent / "oracles/open_clip_main_naflex.json").read_text())
NAMES = ("ViT-B-16-SigLIP2-naflex", "ViT-SO400M-16-SigLIP2-naflex")
TIMM = {"ViT-B-16-SigLIP2-naflex": "naflexvit_base_patch16_siglip",
        "ViT-SO400M-16-SigLIP2-naflex": "naflexvit_so400m_patch16_siglip"}  # fmt: skip
REPO = "timm/ViT-B-16-SigLIP2-naflex"
#: (width, height) fractions of real photos: wide, tall, square, very wide, very tall.
ASPECTS = ((1.0, 0.45), (0.4, 1.0), (0.62, 0.62), (1.0, 0.2), (0.15, 0.9))


def _main_cfg(name: str) -> dict:
    return copy.deepcopy(ORACLE["model_configs"][name])


def open_clip_model(name: str, device: str = "meta") -> torch.nn.Module:
    """open_clip 3.3 building open_clip main's config (without ``image_seq_len``, a field 3.3 lacks:
    it only sets the default eval patch budget), on the meta device."""
    from open_clip.factory import _MODEL_CONFIGS

    cfg = _main_cfg(name)
    cfg["vision_cfg"].pop("image_seq_len", None)
    key = f"{name}-main-test"
    _MODEL_CONFIGS[key] = cfg
    try:
        with torch.device(device):
            return open_clip.create_model(key, device=device)
    finally:
        del _MODEL_CONFIGS[key]


@functools.cache
def _images() -> tuple[Image.Image, ...]:
    """Real photos (8x box-reduced) cropped to five aspect ratios."""
    found = sorted(photos(), key=os.path.getsize)[:3]
    out = []
    for i, (fw, fh) in enumerate(ASPECTS):
        with Image.open(found[i % len(found)]) as im:
            small = im.reduce(8).convert("RGB")
        w, h = small.size
        out.append(small.crop((0, 0, max(1, int(w * fw)), max(1, int(h * fh)))))
    return tuple(out)


# --- architectures ----------------------------------------------------------------------------------
def test_every_plain_naflex_clip_of_main_is_registered():
    """open_clip main's NaFlex image-text configs with CLIP or SigLIP text towers, all four."""
    assert list(ORACLE["model_configs"]) == [*NAMES, "naflex_ViT-B-16", "naflex_ViT-B-32"]
    assert all(n in clipforge.list_models() for n in ORACLE["model_configs"])


@pytest.mark.parametrize("name", list(ORACLE["model_configs"]))
def test_architecture_is_open_clip_mains_config(name):
    """The registered config is open_clip main's, read by clipforge's open_clip reader; the image
    trunk is timm's model with main's ``timm_model_kwargs`` (same parameters, patch size, position
    grid, pooling); the whole model has the keys and shapes of open_clip building main's config
    (the Hub files' layout; open_clip 3.3 cannot pass timm_model_kwargs, so not for B-32)."""
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip

    cfg = clipforge.get_model_config(name)
    main = _main_cfg(name)
    mv = main["vision_cfg"]
    assert cfg == config_from_open_clip(main, name)
    assert (cfg.vision.timm_model_name, cfg.vision.image_size, cfg.embed_dim) == (
        mv["timm_model_name"], mv["image_size"], main["embed_dim"])  # fmt: skip
    with torch.device("meta"):
        ours = build_model(cfg)
        trunk = timm.create_model(mv["timm_model_name"], num_classes=0, **mv.get("timm_model_kwargs", {}))
    got = ours.visual.trunk
    assert type(got).__name__ == "NaFlexVit" and type(got) is type(trunk)
    shapes = [{k: tuple(t.shape) for k, t in m.state_dict().items()} for m in (got, trunk)]
    assert shapes[0] == shapes[1]
    facts = [(tuple(m.embeds.patch_size), tuple(m.embeds.pos_embed.shape), len(m.blocks), m.embed_dim,
              m.blocks[0].attn.num_heads, m.embeds.pos_embed_interp_mode, m.global_pool) for m in (got, trunk)]  # fmt: skip
    assert facts[0] == facts[1]
    assert facts[0][0] == (cfg.vision.patch_size,) * 2
    assert IMAGE_TOWER_HASHES[name] == image_tower_hash(ours.state_dict())
    if "timm_model_kwargs" not in mv:
        theirs = open_clip_model(name).state_dict()
        mine = clipforge_to_open_clip(ours.state_dict(), custom_text=cfg.custom_text)
        assert {k: tuple(t.shape) for k, t in mine.items()} == {k: tuple(t.shape) for k, t in theirs.items()}


def test_siglip2_naflex_facts():
    """What the two SigLIP 2 NaFlex configs say (open_clip main's test checks 384 and 576 too)."""
    for name, trunk in TIMM.items():
        cfg = clipforge.get_model_config(name)
        v = cfg.vision
        assert (v.timm_model_name, v.image_size, v.timm_pool, v.timm_proj) == (trunk, 384, "map", "none")
        assert (cfg.text.context_length, cfg.text.vocab_size, cfg.init_logit_bias) == (64, 256000, -10)
        assert ORACLE["model_configs"][name]["vision_cfg"]["image_seq_len"] == 576


def test_models_command_lists_the_architectures(capsys):
    assert run_cli(["models", "--filter", "SigLIP2-naflex"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    assert [r[0] for r in rows] == list(NAMES)
    assert all("timm:" + TIMM[r[0]] in " ".join(r) and "384" in r for r in rows)


# --- named weights ----------------------------------------------------------------------------------
def test_named_weights_are_open_clip_mains():
    """Each (model, tag) of open_clip main's list with its Hub repository and files as open_clip
    reads ``hf_hub``, SigLIP's preprocessing (open_clip 3.3's ``_slpcfg``, the helper main uses) and
    the NaFlex patch budget of the model config."""
    entries = pretrained_entries("SigLIP2-naflex")
    assert [(e.model, e.tag) for e in entries] == [(m, t) for m in NAMES for t in ORACLE["pretrained"][m]]
    slp = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP2", "webli")  # a _slpcfg entry of 3.3
    for e in entries:
        main = ORACLE["pretrained"][e.model][e.tag]
        assert main["helper"] == "_slpcfg"
        assert (e.hf_hub + "/", e.filenames) == (
            main["hf_hub"],
            ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
        )
        assert (e.mean, e.std, e.interpolation, e.resize_mode) == (
            tuple(slp["mean"]), tuple(slp["std"]), slp["interpolation"], slp["resize_mode"])  # fmt: skip
        vision = ORACLE["model_configs"][e.model]["vision_cfg"]
        assert (e.image_size, e.naflex_max_patches, e.naflex_patch_size) == (
            vision["image_size"],
            vision["image_seq_len"],
            16,
        )
        pre = e.preprocess_cfg(384)
        assert (pre.naflex_max_patches, pre.naflex_patch_size, pre.mean) == (576, 16, (0.5,) * 3)
        assert e.license == "apache-2.0" and not e.quick_gelu


# --- preprocessing: open_clip main's timm transforms ----------------------------------------------------
@functools.cache
def _jpeg_crops() -> tuple[Image.Image, ...]:
    """Real JPEG photos (detailed, unlike the smallest PNG wallpapers; 8x box-reduced) at the five
    aspect ratios of ``ASPECTS``."""
    found = sorted((p for p in photos() if p.suffix == ".jpg"), key=os.path.getsize)[:3]
    out = []
    for i, (fw, fh) in enumerate(ASPECTS):
        with Image.open(found[i % len(found)]) as im:
            small = im.reduce(8).convert("RGB")
        w, h = small.size
        out.append(small.crop((0, 0, max(1, int(w * fw)), max(1, int(h * fh)))))
    return tuple(out)


def _open_clip_main_eval(images, pretrained: dict, size: int, most: int) -> dict:
    """open_clip main's NaFlex eval batch: ``naflex_eval_transform_v2`` (a factory over timm's
    ``create_transform`` with the tag's input size, mean, std and interpolation), called with the
    model's ``image_seq_len`` and patch size, then ``collate_naflex_tuples`` (timm's NaFlexCollator);
    grid shapes read back from the patch coordinates."""
    from timm.data import create_transform
    from timm.data.naflex_dataset import NaFlexCollator

    transform = create_transform(
        input_size=(3, size, size), mean=pretrained["mean"], std=pretrained["std"],
        interpolation=pretrained["interpolation"], is_training=False, naflex=True, patchify=True,
        max_seq_len=most, patch_size=16,
    )  # fmt: skip
    batch, _ = NaFlexCollator(max_seq_len=most)([(transform(im), 0) for im in images])
    coords = batch["patch_coord"].masked_fill(~batch["patch_valid"][..., None], -1)
    batch["spatial_shapes"] = coords.amax(dim=1) + 1
    return batch


def _assert_same_batch(ours: dict, theirs: dict) -> None:
    assert torch.equal(ours["spatial_shapes"], theirs["spatial_shapes"].to(ours["spatial_shapes"].dtype))
    assert torch.equal(ours["patch_mask"].bool(), theirs["patch_valid"])
    assert ours["patches"].shape == theirs["patches"].shape
    assert (ours["patches"] - theirs["patches"]).abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_tag_preprocessing_is_open_clip_mains_timm_transform(name):
    """The tag's eval transform on JPEG photos of five aspect ratios: open_clip main's own (timm's
    ResizeToSequence with PIL bicubic, ToTensor, Normalize, Patchify; same grid, patch order and
    mask), to 1e-6. Siglip2ImageProcessor's bilinear resize stays reachable
    (``naflex_resize="siglip2"``) and gives other pixels on the same grid, so the check can fail."""
    import dataclasses

    from clipforge.checkpoints.pretrained import resolve_pretrained
    from clipforge.transforms import image_transform

    images = list(_jpeg_crops())
    pre = resolve_pretrained(name, "webli").preprocess_cfg(384)
    assert (pre.naflex_resize, pre.interpolation) == ("timm", "bicubic")
    slp = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP2", "webli")  # main's _slpcfg facts
    theirs = _open_clip_main_eval(
        images, slp, 384, ORACLE["model_configs"][name]["vision_cfg"]["image_seq_len"]
    )
    ours = naflex_collate([image_transform(pre)(im) for im in images], 576)
    assert len({tuple(s) for s in ours["spatial_shapes"].tolist()}) == len(images)
    _assert_same_batch(ours, theirs)
    siglip2 = dataclasses.replace(pre, naflex_resize="siglip2")
    other = naflex_collate([image_transform(siglip2)(im) for im in images], 576)
    assert torch.equal(other["spatial_shapes"], ours["spatial_shapes"])
    gap = (other["patches"] - ours["patches"]).abs()
    print(f"\n{name}: siglip2 vs timm rule on photos, max {gap.max():.4f}, mean {gap.mean():.5f}")
    assert gap.max().item() > 0.05


def test_open_clip_hub_config_gets_the_timm_rule_and_clipforge_files_keep_theirs(tmp_path):
    """An ``open_clip_config.json`` open_clip wrote (main's model_cfg with a NaFlexVit tower, SigLIP's
    preprocess_cfg: what ``hf-hub:timm/ViT-*-SigLIP2-naflex`` holds) reads as timm's NaFlex rule; one
    clipforge wrote before the rule was stored (its own ``naflex_max_patches``, no ``naflex_resize``)
    keeps the Siglip2 resize it preprocessed with then."""
    from clipforge.checkpoints.load import _read_open_clip_json
    from clipforge.transforms import PreprocessConfig

    slp = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP2", "webli")
    facts = {k: slp[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    for preprocess, rule in (
        (facts, "timm"),
        ({**facts, "naflex_max_patches": 100, "naflex_patch_size": 16}, "siglip2"),
    ):
        path = tmp_path / f"{rule}.json"
        path.write_text(
            json.dumps({"model_cfg": _main_cfg("ViT-B-16-SigLIP2-naflex"), "preprocess_cfg": preprocess})
        )
        _, pre = _read_open_clip_json(path)
        cfg = PreprocessConfig.from_dict(pre)
        assert (cfg.naflex_resize, cfg.naflex_max_patches) == (rule, 576 if rule == "timm" else 100)


def test_models_pretrained_command_lists_them(capsys):
    assert run_cli(["models", "--pretrained", "--filter", "naflex"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:] if line.strip()]
    assert rows == [[m, "webli", f"timm/{m}", "apache-2.0", "384"] for m in NAMES]
    assert clipforge.list_pretrained("ViT-B-16-SigLIP2-naflex") == [("ViT-B-16-SigLIP2-naflex", "webli")]


# --- weights from the Hub cache ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """(open_clip's model with random weights, the cache, the snapshot): ``timm/ViT-B-16-SigLIP2-naflex``
    as open_clip's Hub repos hold it (open_clip_config.json with main's model_cfg and SigLIP's
    preprocess_cfg, open_clip_model.safetensors in open_clip's layout), downloads off."""
    from clipforge.checkpoints.io import save_safetensors

    oc = materialize(open_clip_model("ViT-B-16-SigLIP2-naflex"))
    fill_(oc, seed=11)
    oc.eval()
    slp = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP2", "webli")
    config = {"model_cfg": _main_cfg("ViT-B-16-SigLIP2-naflex"),
              "preprocess_cfg": {k: slp[k] for k in ("mean", "std", "interpolation", "resize_mode")}}  # fmt: skip
    with scratch_dir(tmp_path_factory, "naflex-hub") as root, pytest.MonkeyPatch.context() as mp:
        save_safetensors(oc.state_dict(), root / "open_clip_model.safetensors")
        (root / "open_clip_config.json").write_text(json.dumps(config))
        cache = go_offline(mp, root / "cache")
        snapshot = populate(
            cache, REPO, {n: root / n for n in ("open_clip_config.json", "open_clip_model.safetensors")}
        )
        (root / "open_clip_model.safetensors").unlink()
        yield oc, cache, snapshot


@pytest.fixture(scope="module")
def loaded(hub_repo):
    """``create_model_and_transforms('ViT-B-16-SigLIP2-naflex', pretrained='webli')`` from the cache."""
    model, _, val = clipforge.create_model_and_transforms("ViT-B-16-SigLIP2-naflex", pretrained="webli")
    return model.eval(), val


def _hf_vision(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' Siglip2VisionModel with google/siglip2-base-patch16-naflex's vision shapes,
    loaded with ``model``'s image weights (NaFlexVit's Linear patch embedding and 16x16 grid are
    Siglip2's own layout; clipforge's SigLIP 2 converter maps the rest)."""
    from clipforge.checkpoints.hf_siglip import clipforge_to_hf_siglip

    sd = {k: v for k, v in model.state_dict().items() if k.startswith("visual.trunk.")}
    proj = sd.pop("visual.trunk.embeds.proj.weight")
    sd["visual.trunk.patch_embed.proj.weight"] = proj.reshape(proj.shape[0], 16, 16, 3).permute(0, 3, 1, 2)
    sd["visual.trunk.patch_embed.proj.bias"] = sd.pop("visual.trunk.embeds.proj.bias")
    sd["visual.trunk.pos_embed"] = sd.pop("visual.trunk.embeds.pos_embed").reshape(1, 256, -1)
    hf_sd = {k.removeprefix("vision_model."): v for k, v in clipforge_to_hf_siglip(sd, "siglip2").items()}
    config = transformers.Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, patch_size=16, num_patches=256)  # fmt: skip
    hf = transformers.Siglip2VisionModel(config).eval()
    missing, unexpected = getattr(hf, "vision_model", hf).load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.slow  # a 1.5 GB Hub file, full-size forwards
def test_tag_resolves_offline_to_open_clips_weights(hub_repo, loaded):
    oc, _, snapshot = hub_repo
    model, val = loaded
    assert hub.pretrained_file("ViT-B-16-SigLIP2-naflex", "webli") == snapshot / "open_clip_model.safetensors"
    from clipforge.checkpoints.open_clip import clipforge_to_open_clip

    mine = clipforge_to_open_clip(model.state_dict(), custom_text=True)
    theirs = oc.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    pre = model.preprocess_cfg
    assert (pre.naflex_max_patches, pre.naflex_patch_size, pre.mean, pre.std) == (
        576,
        16,
        (0.5,) * 3,
        (0.5,) * 3,
    )
    assert isinstance(val, NaFlexTransform) and (val.patch_size, val.max_num_patches) == (16, 576)


@pytest.mark.slow  # a 1.5 GB Hub file, full-size forwards
def test_preprocessing_is_open_clip_mains_and_siglip2s_on_request(hub_repo, loaded):
    """The loaded tag's eval transform is open_clip main's (timm's) at its budget of 576 patches;
    ``image_naflex_resize="siglip2"`` gives Siglip2ImageProcessor's patches, mask and grid shapes."""
    _, val = loaded
    images = list(_jpeg_crops())
    slp = open_clip.get_pretrained_cfg("ViT-B-16-SigLIP2", "webli")
    _assert_same_batch(
        naflex_collate([val(im) for im in images], 576), _open_clip_main_eval(images, slp, 384, 576)
    )
    model = clipforge.create_model(
        "ViT-B-16-SigLIP2-naflex", pretrained="webli", image_naflex_resize="siglip2"
    )
    assert model.preprocess_cfg.naflex_resize == "siglip2"
    siglip2 = clipforge.image_transform(model.preprocess_cfg)
    ref = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=576)(
        images=images, return_tensors="pt"
    )
    batch = naflex_collate([siglip2(im) for im in images], 576)
    assert len({tuple(s) for s in batch["spatial_shapes"].tolist()}) == len(images)
    assert torch.equal(batch["spatial_shapes"], ref["spatial_shapes"].to(batch["spatial_shapes"].dtype))
    assert torch.equal(batch["patch_mask"], ref["pixel_attention_mask"].to(batch["patch_mask"].dtype))
    assert (batch["patches"] - ref["pixel_values"]).abs().max().item() < 1e-6


@pytest.mark.slow  # a 1.5 GB Hub file, full-size forwards
def test_features_equal_open_clip_and_transformers(hub_repo, loaded):
    """NaFlex batches of five aspect ratios (64 patches each at most, to keep three full-size
    forwards short): the features equal open_clip's model (timm's NaFlexVit given the patch
    coordinates) and transformers' Siglip2VisionModel on the same weights and inputs."""
    oc, _, _ = hub_repo
    model, _ = loaded
    most = 64
    ref_in = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=most)(
        images=list(_images()), return_tensors="pt"
    )
    batch = NaFlexTransform(16, most).batch(list(_images()))
    cols = batch["spatial_shapes"][:, 1:]
    index = torch.arange(most)[None]
    valid = batch["patch_mask"].bool()
    coord = torch.stack([(index // cols) * valid, (index % cols) * valid], dim=-1)
    with torch.no_grad():
        mine = model.encode_image(batch)
        theirs = oc.visual({"patches": batch["patches"], "patch_coord": coord, "patch_valid": valid})
        hf = _hf_vision(model)(**ref_in).pooler_output
    diffs = ((mine - theirs).abs().max().item(), (mine - hf).abs().max().item())
    print(f"\nViT-B-16-SigLIP2-naflex features: vs open_clip {diffs[0]:.2e}, vs transformers {diffs[1]:.2e}")
    assert mine.shape == (len(ASPECTS), 768) and hf.abs().max().item() > 0.1
    assert (mine[0] - mine[1]).abs().max().item() > 1e-3
    assert max(diffs) < TOL


@pytest.mark.slow  # a 1.5 GB Hub file, full-size forwards
def test_fixed_size_tensor_is_the_square_naflex_image(loaded):
    """A fixed-size tensor (here 192 px: 12x12 patches, the 16x16 table resized) gives the features
    of the same pixels as a NaFlex patch dict: open_clip's tower takes both."""
    model, _ = loaded
    square = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(3))
    patches = square.reshape(1, 3, 12, 16, 12, 16).permute(0, 2, 4, 3, 5, 1).reshape(1, 144, 768)
    mask = torch.ones(1, 144, dtype=torch.int32)
    with torch.no_grad():
        fixed = model.encode_image(square)
        naflex = model.encode_image(
            {"patches": patches, "patch_mask": mask, "spatial_shapes": torch.tensor([[12, 12]])}
        )
    assert fixed.abs().max().item() > 0.1 and (fixed - naflex).abs().max().item() < TOL


@pytest.mark.slow  # a 1.5 GB Hub file, full-size forwards
def test_hub_spec_resolves_with_the_repos_naflex_budget(hub_repo, loaded):
    """``hf-hub:timm/ViT-B-16-SigLIP2-naflex`` (no tag): the repo's open_clip_config.json gives the
    architecture and, from main's ``image_seq_len``, the same NaFlex preprocessing as the tag."""
    model, _ = loaded
    by_spec = clipforge.create_model(f"hf-hub:{REPO}").eval()
    assert by_spec.config == model.config
    assert by_spec.preprocess_cfg == model.preprocess_cfg
    a, b = by_spec.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_open_clip_main_fields_clipforge_lacks_are_refused_by_name():
    """main's ModernText tower / variable-length text would otherwise be read as a CLIP text tower."""
    from clipforge.errors import CheckpointError

    base = _main_cfg("naflex_ViT-B-16")
    for field, value in (("text_arch", "modern"), ("variable_text", True)):
        cfg = copy.deepcopy(base)
        cfg["text_cfg"][field] = value
        with pytest.raises(
            CheckpointError, match=f"moderntext.json: text_cfg.{field}={value!r} is not supported"
        ):
            config_from_open_clip(cfg, "moderntext.json")
    assert config_from_open_clip({**base, "text_cfg": {**base["text_cfg"], "text_arch": "clip"}}) == (
        clipforge.get_model_config("naflex_ViT-B-16")
    )
