"""CLIP-guided losses: exact formulas, gradients to pixels, text cache, cutouts, directional loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError
from clipforge.factory import create_model, get_tokenizer
from clipforge.guidance import (
    CLIPGuidance,
    cosine_distance,
    directional_distance,
    resize_like_eval,
    spherical_distance,
)
from clipforge.transforms import PreprocessConfig

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny-vit").eval()  # 32 px input


@pytest.fixture(scope="module")
def tokenizer(model):
    return get_tokenizer(model)


def _images(batch: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _hand_features(model, tokenizer, guidance, images, texts):
    with torch.no_grad():
        img = F.normalize(model.encode_image(guidance.preprocess(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    return img, txt


# --- preprocessing -----------------------------------------------------------------------------
def test_preprocess_normalises_with_model_mean_std(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    x = _images(h=32, w=32)  # already the input size: no resampling, so the result is exact
    mean = torch.tensor(model.preprocess_cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.preprocess_cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(guidance.preprocess(x), (x - mean) / std, atol=1e-6)
    assert guidance.preprocess(_images(h=40, w=96)).shape == (2, 3, 32, 32)


def test_resize_geometry_follows_resize_mode():
    """Nearest resampling makes the geometry exact: crop, squash and pad are told apart."""
    x = torch.zeros(1, 3, 16, 32)
    x[..., :, 8:24] = 1.0  # a centred 16x16 white square on black
    cfg = dict(image_size=8, interpolation="nearest")
    shortest = resize_like_eval(x, PreprocessConfig(**cfg, resize_mode="shortest"))
    squash = resize_like_eval(x, PreprocessConfig(**cfg, resize_mode="squash"))
    longest = resize_like_eval(x, PreprocessConfig(**cfg, resize_mode="longest", fill_color=255))
    assert shortest.shape == squash.shape == longest.shape == (1, 3, 8, 8)
    assert torch.equal(shortest, torch.ones_like(shortest))  # centre crop = the square
    expected = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(squash[0, 0, 3], expected)  # whole width kept, squeezed
    assert torch.equal(longest[0, 0, :2], torch.ones(2, 8))  # padded rows carry the fill
    assert torch.equal(longest[0, 0, 2:6], expected.expand(4, 8))
    smooth = resize_like_eval(x, PreprocessConfig(image_size=8))  # bicubic + antialias, the default
    assert smooth.shape == (1, 3, 8, 8) and smooth[..., 2:6].min() > 0.99


# --- prompt losses -----------------------------------------------------------------------------
def test_clip_loss_equals_hand_computed(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    images, texts = _images(), ["a red square", "a blue circle"]
    img, txt = _hand_features(model, tokenizer, guidance, images, texts)
    cos = (img * txt).sum(-1)
    per_image = guidance.clip_loss(images, texts, reduction="none")
    assert torch.allclose(per_image, 1 - cos, atol=TOL)
    assert torch.allclose(guidance.clip_loss(images, texts), (1 - cos).mean(), atol=TOL)
    # One prompt broadcasts to the batch.
    single = guidance.clip_loss(images, "a red square", reduction="none")
    assert torch.allclose(single, 1 - img @ txt[0], atol=TOL)
    # Spherical: 2 * arcsin(|a - b| / 2)^2, which for unit vectors is angle^2 / 2.
    sph = guidance.clip_loss(images, texts, kind="spherical", reduction="none")
    assert torch.allclose(sph, 2 * ((img - txt).norm(dim=-1) / 2).arcsin() ** 2, atol=TOL)
    assert torch.allclose(sph, cos.clamp(-1, 1).acos() ** 2 / 2, atol=1e-4)


def test_distance_helpers_on_known_vectors():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [5.0, 0.0]])
    assert torch.allclose(cosine_distance(a, b), torch.tensor([1.0, 2.0, 0.0]))
    assert torch.allclose(spherical_distance(a, b), torch.tensor([math.pi**2 / 8, math.pi**2 / 2, 0.0]))


def test_gradients_reach_pixels_and_not_the_frozen_model(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    images = _images(h=57, w=45).requires_grad_(True)  # odd size: resize + crop on the path
    for kind in ("cosine", "spherical"):
        images.grad = None
        guidance.clip_loss(images, "a photo of a cat", kind=kind).backward()
        assert images.grad is not None and torch.isfinite(images.grad).all()
        assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_optimising_pixels_lowers_the_loss_for_the_target_caption(model, tokenizer):
    """Construct the answer: descend on the pixels for caption A; A must end up matching better than B."""
    guidance = CLIPGuidance(model, tokenizer)
    target, other = "a watercolor of a fox", "a diagram of an engine"
    logits = torch.zeros(1, 3, 48, 48).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.2)
    before = guidance.clip_loss(logits.sigmoid(), target).item()
    for _ in range(10):
        opt.zero_grad()
        guidance.clip_loss(logits.sigmoid(), target, kind="spherical").backward()
        opt.step()
    with torch.no_grad():
        after = guidance.clip_loss(logits.sigmoid(), target).item()
        wrong = guidance.clip_loss(logits.sigmoid(), other).item()
    assert after < before - 0.05
    assert after < wrong


def test_feature_prompt_gives_zero_loss(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    images = _images()
    with torch.no_grad():
        target = guidance.encode_images(images)
    assert guidance.clip_loss(images, target).abs().max() < 1e-6
    assert guidance.clip_loss(images, target, kind="spherical").abs().max() < 1e-5


def test_text_embeddings_are_cached_per_string(model, tokenizer, monkeypatch):
    guidance = CLIPGuidance(model, tokenizer)
    calls: list[int] = []
    original = model.encode_text

    def counting(tokens, normalize=False):
        calls.append(tokens.shape[0])
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(model, "encode_text", counting)
    images = _images()
    first = guidance.clip_loss(images, ["a dog", "a dog"])
    second = guidance.clip_loss(images, ["a dog", "a dog"])
    assert calls == [1]  # one forward, one row: duplicates are encoded once
    assert torch.equal(first, second)
    guidance.clip_loss(images, ["a dog", "a cat"])
    guidance.directional_loss(images, images.flip(0), "a dog", "a cat")
    assert calls == [1, 1]
    guidance.clear_cache()
    guidance.encode_texts("a dog")
    assert calls == [1, 1, 1]


# --- directional loss --------------------------------------------------------------------------
def test_directional_loss_equals_hand_computed(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    src, tgt = _images(seed=1), _images(seed=2)
    s_img, t_txt = _hand_features(model, tokenizer, guidance, src, ["a photo", "a sketch"])
    t_img, _ = _hand_features(model, tokenizer, guidance, tgt, ["a photo"])
    text_dir = t_txt[1] - t_txt[0]
    expected = 1 - F.cosine_similarity(t_img - s_img, text_dir.expand_as(s_img), dim=-1)
    got = guidance.directional_loss(src, tgt, "a photo", "a sketch", reduction="none")
    assert torch.allclose(got, expected, atol=TOL)
    assert torch.allclose(got, directional_distance(s_img, t_img, t_txt[:1], t_txt[1:]), atol=TOL)
    # Several templates per side (paired): the mean text direction.
    sources, targets = ["a photo of a dog", "a picture of a dog"], ["a sketch of a dog", "a drawing of a dog"]
    _, txt = _hand_features(model, tokenizer, guidance, src, sources + targets)
    mean_dir = (txt[2:] - txt[:2]).mean(0)
    expected = 1 - F.cosine_similarity(t_img - s_img, mean_dir.expand_as(s_img), dim=-1)
    got = guidance.directional_loss(src, tgt, sources, targets, reduction="none")
    assert torch.allclose(got, expected, atol=TOL)


def test_directional_loss_zero_when_directions_align(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer)
    src, tgt = _images(seed=1), _images(seed=2)
    with torch.no_grad():  # make "text" features identical to the images' features
        s_img, t_img = guidance.encode_images(src), guidance.encode_images(tgt)
    guidance._text_cache.update({"src": s_img[0], "tgt": t_img[0]})
    loss = guidance.directional_loss(src[:1], tgt[:1], "src", "tgt")
    assert loss.abs().item() < 1e-5
    reverse = guidance.directional_loss(src[:1], tgt[:1], "tgt", "src")
    assert reverse.item() == pytest.approx(2.0, abs=1e-5)  # opposite direction: 1 - (-1)
    # Pure-feature form: any positive rescaling of the text direction is still aligned.
    u, v = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    assert directional_distance(u, v, 3 * u, 3 * v).abs().max() < 1e-6


def test_directional_loss_gradients(model, tokenizer):
    guidance = CLIPGuidance(model, tokenizer, n_cuts=3, seed=0)
    src = _images(seed=1)
    tgt = _images(seed=2).requires_grad_(True)
    guidance.directional_loss(src, tgt, "a photo", "a pencil sketch").backward()
    assert tgt.grad is not None and tgt.grad.abs().sum() > 0


# --- cutouts -----------------------------------------------------------------------------------
def test_cutouts_are_seeded_and_shaped(model, tokenizer):
    images = _images(h=64, w=80)
    a = CLIPGuidance(model, tokenizer, n_cuts=4, seed=7)
    b = CLIPGuidance(model, tokenizer, n_cuts=4, seed=7)
    c = CLIPGuidance(model, tokenizer, n_cuts=4, seed=8)
    boxes = a.sample_boxes(64, 80)
    assert boxes == b.sample_boxes(64, 80) and boxes != c.sample_boxes(64, 80)
    assert all(32 <= s <= 64 and t + s <= 64 and x + s <= 80 for t, x, s in boxes)
    cuts = a.cutouts(images, boxes)
    assert cuts.shape == (4 * 2, 3, 32, 32)
    assert torch.equal(a.clip_loss(images, "a cat"), b.clip_loss(images, "a cat"))
    # Loss with cutouts = mean over the cuts of 1 - cos, computed by hand from the same boxes.
    boxes = a.sample_boxes(64, 80)
    with torch.no_grad():
        feats = a.encode_images(a.cutouts(images, boxes)).view(4, 2, -1)
        txt = a.encode_texts("a cat")
    expected = (1 - feats @ txt[0]).mean(0)
    got = b.clip_loss(images, "a cat", reduction="none")  # b draws the same boxes
    assert torch.allclose(got, expected, atol=TOL)


@pytest.mark.parametrize(
    "call",
    [
        lambda g, x: g.clip_loss(x, "a cat", kind="l2"),
        lambda g, x: g.clip_loss(x, ["a", "b", "c"]),
        lambda g, x: g.clip_loss(x, "a cat", reduction="max"),
        lambda g, x: g.clip_loss(x[0], "a cat"),
        lambda g, x: g.directional_loss(x, x[:1], "a", "b"),
        lambda g, x: g.directional_loss(x, x, ["a", "b"], "c"),
    ],
)
def test_bad_arguments_raise(model, tokenizer, call):
    with pytest.raises(ConfigError):
        call(CLIPGuidance(model, tokenizer), _images())
