"""Oracle: the same random tiny model in open_clip and clipforge gives the same zero-shot classifier,
the same top-1, and the same retrieval Recall@K computed the way CLIP_benchmark computes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from clipforge.checkpoints.open_clip import clipforge_to_open_clip  # noqa: E402
from clipforge.data import synthetic  # noqa: E402
from clipforge.eval.datasets import EvalDataset  # noqa: E402
from clipforge.eval.runner import evaluate  # noqa: E402
from clipforge.eval.zero_shot import zero_shot_classifier  # noqa: E402
from clipforge.model.clip import CLIP  # noqa: E402
from clipforge.model.registry import get_model_config  # noqa: E402
from clipforge.tokenizer import Tokenizer  # noqa: E402

TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a {} shape."]


def _preprocess(size: int):
    import torchvision.transforms as T

    return T.Compose([T.Resize(size), T.ToTensor(), T.Normalize((0.48, 0.46, 0.41), (0.27, 0.26, 0.28))])


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    cfg = get_model_config("tiny-vit")
    ours = CLIP(cfg).eval()
    theirs = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=cfg.vision.layers,
            width=cfg.vision.width,
            head_width=cfg.vision.head_width,
            patch_size=cfg.vision.patch_size,
            image_size=cfg.vision.image_size,
            mlp_ratio=cfg.vision.mlp_ratio,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=cfg.text.context_length,
            vocab_size=cfg.text.vocab_size,
            width=cfg.text.width,
            heads=cfg.text.heads,
            layers=cfg.text.layers,
        ),
        quick_gelu=cfg.quick_gelu,
    ).eval()
    theirs.load_state_dict(clipforge_to_open_clip(ours.state_dict()), strict=True)
    return ours, theirs, cfg


def _cb_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """CLIP_benchmark / open_clip ``accuracy``: correct top-k count over samples."""
    pred = logits.topk(k, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return float(correct[:k].reshape(-1).float().sum()) / len(target)


def _cb_recall_hits(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> int:
    """CLIP_benchmark's ``recall_at_k`` (topk -> one-hot -> true positives / positives), then the
    paper-style hit (recall > 0); returns the number of hit queries."""
    n_rows, n_cols = scores.shape
    topk = torch.topk(scores, k, dim=1)[1]
    onehot = F.one_hot(topk, num_classes=n_cols)
    true_pos = (onehot * positive_pairs.view(n_rows, 1, n_cols)).sum(dim=(1, 2))
    recall = true_pos / positive_pairs.sum(dim=1)
    return int((recall > 0).sum())


@pytest.mark.slow
def test_zero_shot_matches_open_clip(models):
    ours, theirs, cfg = models
    classnames = synthetic.class_names("colour_shape")
    tok_theirs = open_clip.get_tokenizer("ViT-B-32")
    tok_ours = Tokenizer(cfg.text.context_length)
    clf_theirs = open_clip.build_zero_shot_classifier(theirs, tok_theirs, classnames, TEMPLATES, device="cpu")
    clf_ours = zero_shot_classifier(ours, tok_ours, classnames, TEMPLATES, batch_size=50)
    assert clf_ours.shape == clf_theirs.shape == (cfg.embed_dim, 36)
    assert torch.allclose(clf_ours, clf_theirs, atol=1e-5)

    preprocess = _preprocess(cfg.vision.image_size)
    raw = synthetic.SyntheticShapes(72, split="all", seed=5)
    labels = raw.labels("colour_shape")
    ds = EvalDataset("shapes", len(raw), raw.get_image, labels=labels, classnames=classnames)
    result = evaluate(ours, tok_ours, preprocess, ds, task="zeroshot", templates=TEMPLATES, batch_size=16)

    images = torch.stack([preprocess(raw.get_image(i)) for i in range(len(raw))])
    target = torch.tensor(labels)
    with torch.no_grad():
        logits = 100.0 * F.normalize(theirs.encode_image(images), dim=-1) @ clf_theirs
    preds = logits.argmax(1)
    assert len(set(preds.tolist())) > 1  # a non-degenerate comparison
    assert result["metrics"]["acc1"] == _cb_accuracy(logits, target, 1)
    assert result["metrics"]["acc5"] == _cb_accuracy(logits, target, 5)
    recalls = [float((preds[target == c] == c).float().mean()) for c in target.unique().tolist()]
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-6)
    assert result["task"] == "zeroshot_classification"


@pytest.mark.slow
def test_retrieval_matches_clip_benchmark(models):
    ours, theirs, cfg = models
    preprocess = _preprocess(cfg.vision.image_size)
    images, captions = synthetic.retrieval_set(48, split="val", seed=3)
    # two captions per image (COCO style); all distinct so no exact ties between texts
    multi = [[c, f"a picture of {c}"] for c in captions]
    multi[7] = multi[7][:1]  # and one image with a single caption
    ds = EvalDataset("shapes-retrieval", len(images), images.__getitem__, captions=multi)
    ks = (1, 5, 10)
    result = evaluate(ours, Tokenizer(cfg.text.context_length), preprocess, ds, task="retrieval", ks=ks)

    tok = open_clip.get_tokenizer("ViT-B-32")
    texts = [c for caps in multi for c in caps]
    text_image = [i for i, caps in enumerate(multi) for _ in caps]
    with torch.no_grad():
        img_emb = F.normalize(theirs.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        txt_emb = F.normalize(theirs.encode_text(tok(texts)), dim=-1)
    scores = txt_emb @ img_emb.t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_image] = True
    m = result["metrics"]
    for k in ks:
        image_hits = _cb_recall_hits(scores, positive, k)
        text_hits = _cb_recall_hits(scores.T, positive.T, k)
        assert round(m[f"image_retrieval_recall@{k}"] * len(texts)) == image_hits, k
        assert round(m[f"text_retrieval_recall@{k}"] * len(images)) == text_hits, k
        # CLIP_benchmark stores a float32 mean: ``(recall > 0).float().mean().item()``
        hits = torch.zeros(len(texts))
        hits[:image_hits] = 1
        assert m[f"image_retrieval_recall@{k}"] == hits.mean().item()
    assert 0 < m["image_retrieval_recall@10"] < 1  # random weights: informative, not saturated


def test_template_sets_match_the_published_ones():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    from clipforge.eval.templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES

    assert [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] == list(IMAGENET_TEMPLATES)
    assert [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES] == list(SIMPLE_TEMPLATES)
