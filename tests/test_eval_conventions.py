"""Metrics stored under another tool's name compute what that tool computes, ties included.

Oracles: CLIP_benchmark's own metric functions (``recall_at_k``/``batchify``, ``accuracy``, its
``evaluate`` functions with a stub model) and open_clip_train's ``get_clip_metrics``, run on the
same features. Features are small integers (optionally normalised), so duplicates give exactly
tied float32 scores however a matrix product is blocked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb_cls
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from open_clip_train.train import get_clip_metrics
from sklearn.metrics import balanced_accuracy_score

from clipforge.eval.retrieval import retrieval_metrics
from clipforge.eval.zero_shot import accuracy_metrics, evaluate_zero_shot

KS = (1, 2, 5, 10)


@pytest.fixture(autouse=True)
def _cb_float_on_numpy2(monkeypatch):
    """CLIP_benchmark 1.6.2's ``accuracy`` ends with ``float(<1-element 1-D array>)``, which
    NumPy >= 2.4 refuses. A module-level ``float`` that takes ``.item()`` first keeps its whole
    computation as it is and only repairs that final conversion."""
    import builtins

    import numpy as np

    monkeypatch.setattr(cb_cls, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)


def _tied_features(n_img: int, caps: int, seed: int, ties: bool = True):
    """Images with exact duplicates (every third image copies its neighbour) and captions that
    duplicate each other (a caption is its image's features, so duplicate images give duplicate
    captions); every third caption is replaced by noise so recall is not saturated."""
    gen = torch.Generator().manual_seed(seed)
    if not ties:
        img = F.normalize(torch.randn(n_img, 8, generator=gen), dim=-1)
        t2i = torch.arange(n_img).repeat_interleave(caps)
        txt = F.normalize(img[t2i] + 0.8 * torch.randn(len(t2i), 8, generator=gen), dim=-1)
        return img, txt, t2i
    img = torch.randint(-2, 3, (n_img, 6), generator=gen).float()
    img[1::3] = img[0::3][: len(img[1::3])]
    t2i = torch.arange(n_img).repeat_interleave(caps)
    txt = img[t2i].clone()
    txt[::3] = torch.randint(-2, 3, txt[::3].shape, generator=gen).float()
    return img, txt, t2i


def _cb_retrieval(img, txt, t2i, k):
    """CLIP_benchmark's two recall@k numbers, from its own helpers on its text-major matrix."""
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(txt)), t2i] = True
    image_r = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean()
    text_r = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean()
    return image_r.item(), text_r.item()


def _pessimistic_hand(img, txt, t2i, k):
    """Pessimistic recall@k by loops: a tie with a negative counts against the query."""
    s = (txt.double() @ img.double().T).tolist()
    t_hits = [
        1 + sum(1 for i in range(len(img)) if i != t2i[t] and s[t][i] >= s[t][t2i[t]]) <= k
        for t in range(len(txt))
    ]
    i_hits = []
    for i in range(len(img)):
        caps = [t for t in range(len(txt)) if t2i[t] == i]
        best = max(s[t][i] for t in caps)
        i_hits.append(1 + sum(1 for t in range(len(txt)) if t2i[t] != i and s[t][i] >= best) <= k)
    return sum(t_hits) / len(t_hits), sum(i_hits) / len(i_hits)


# 200 candidates: topk(k<=3) takes libstdc++'s partial_sort path (k * 64 <= N); the others
# nth_element; both tie choices are exercised.
@pytest.mark.parametrize("n_img,caps", [(40, 1), (70, 2), (200, 1)])
def test_retrieval_recall_equals_clip_benchmark_on_ties(n_img, caps):
    img, txt, t2i = _tied_features(n_img, caps, seed=n_img)
    m = retrieval_metrics(img, txt, t2i, ks=KS, block_size=17)
    differs = 0
    for k in KS:
        image_r, text_r = _cb_retrieval(img, txt, t2i, k)
        assert m[f"image_retrieval_recall@{k}"] == image_r, k
        assert m[f"text_retrieval_recall@{k}"] == text_r, k
        hand_image, hand_text = _pessimistic_hand(img, txt, t2i.tolist(), k)
        assert m[f"image_retrieval_pessimistic_recall@{k}"] == pytest.approx(hand_image, abs=1e-12)
        assert m[f"text_retrieval_pessimistic_recall@{k}"] == pytest.approx(hand_text, abs=1e-12)
        differs += m[f"image_retrieval_pessimistic_recall@{k}"] != pytest.approx(image_r, abs=1e-6)
        ties = m[f"image_retrieval_boundary_ties@{k}"]
        # the optimistic/pessimistic gap is exactly the queries a tie decides
        assert m[f"image_retrieval_pessimistic_recall@{k}"] * len(txt) + ties >= image_r * len(txt) - 1e-3
    assert differs > 0  # the tied data does separate the two conventions
    assert m["image_retrieval_tied_queries"] > 0 and m["text_retrieval_tied_queries"] > 0
    assert m["image_retrieval_boundary_ties@1"] > 0


def test_retrieval_without_ties_all_conventions_agree():
    img, txt, t2i = _tied_features(60, 2, seed=4, ties=False)
    m = retrieval_metrics(img, txt, t2i, ks=KS)
    for k in KS:
        image_r, text_r = _cb_retrieval(img, txt, t2i, k)
        assert m[f"image_retrieval_recall@{k}"] == image_r
        assert m[f"text_retrieval_recall@{k}"] == text_r
        assert m[f"image_retrieval_pessimistic_recall@{k}"] == pytest.approx(image_r, abs=1e-6)
        assert m[f"image_retrieval_boundary_ties@{k}"] == 0
    assert m["image_retrieval_tied_queries"] == m["text_retrieval_tied_queries"] == 0
    assert 0 < m["image_retrieval_recall@1"] < 1


@pytest.mark.parametrize("scale", [1.0, 14.285714])
@pytest.mark.parametrize("ties", [True, False])
def test_open_clip_names_equal_get_clip_metrics(scale, ties):
    img, txt, _ = _tied_features(90, 1, seed=7, ties=ties)
    m = retrieval_metrics(img, txt, torch.arange(90), logit_scale=scale, block_size=13)
    ref = get_clip_metrics(img, txt, torch.tensor(scale))
    assert set(ref) <= set(m)
    for key, value in ref.items():
        assert m[key] == float(value), key
    if ties:  # open_clip's argsort order differs from the pessimistic convention here
        assert m["text_to_image_mean_rank"] < m["image_retrieval_mean_rank"]


def test_open_clip_names_only_for_one_caption_per_image():
    img, txt, t2i = _tied_features(20, 2, seed=1)
    assert "image_to_text_R@1" not in retrieval_metrics(img, txt, t2i)


def _cb_classification(logits, target):
    """CLIP_benchmark's evaluate() reductions on given logits."""
    if logits.shape[1] >= 5:
        acc1, acc5 = cb_cls.accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,) = cb_cls.accuracy(logits, target, topk=(1,))
        acc5 = float("nan")
    return acc1, acc5, balanced_accuracy_score(target, logits.argmax(axis=1))


@pytest.mark.parametrize("n_classes", [3, 12, 400])
def test_zero_shot_accuracy_equals_clip_benchmark_on_ties(n_classes):
    gen = torch.Generator().manual_seed(n_classes)
    logits = torch.randint(0, 3, (300, n_classes), generator=gen).float()  # ties everywhere
    target = torch.randint(0, n_classes, (300,), generator=gen)
    m = accuracy_metrics(logits, target)
    acc1, acc5, balanced = _cb_classification(logits, target)
    assert m["acc1"] == acc1
    if n_classes >= 5:
        assert m["acc5"] == acc5
    assert m["mean_per_class_recall"] == pytest.approx(balanced, abs=1e-12)
    # pessimistic: the label must beat or be the only one at its score among the top k
    own = logits.gather(1, target[:, None])
    pess_rank = (logits >= own).sum(dim=1)
    for k in (1, 5):
        hand = sum(1 for r in pess_rank.tolist() if r <= k) / len(target)
        assert m[f"acc{k}_pessimistic"] == pytest.approx(hand, abs=1e-12)
    assert m["acc1_pessimistic"] < m["acc1"]
    assert m["acc1_boundary_ties"] > 0


class _StubModel(torch.nn.Module):
    """Images are their own features; a "token" row is the prompt's feature vector."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


def test_zero_shot_evaluate_equals_clip_benchmark_evaluate_with_tied_classes():
    gen = torch.Generator().manual_seed(3)
    names = [f"c{i}" for i in range(8)]
    proto = torch.randint(-2, 3, (8, 6), generator=gen).float()
    proto[5] = proto[2]  # two classes with the same prompt features: tied logits
    proto[7] = proto[0]
    feat = {f"a {n}.": proto[i] for i, n in enumerate(names)}
    feat |= {f"the {n}": proto[i] for i, n in enumerate(names)}

    def tokenizer(texts):
        return torch.stack([feat[t] for t in texts])

    target = torch.randint(0, 8, (64,), generator=gen)
    images = proto[target] + 0.5 * torch.randint(-1, 2, (64, 6), generator=gen).float()
    ds = torch.utils.data.TensorDataset(images, target)
    ds.classes = names
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    model = _StubModel()
    ref = cb_cls.evaluate(model, loader, tokenizer, names, ["a {c}.", "the {c}"], "cpu", amp=False)
    clf = cb_cls.zero_shot_classifier(model, tokenizer, names, ["a {c}.", "the {c}"], "cpu", amp=False)
    ours = evaluate_zero_shot(model, loader, clf, "cpu")
    assert ours["acc1"] == ref["acc1"] and ours["acc5"] == ref["acc5"]
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-12)
    assert ours["acc1_boundary_ties"] > 0


def test_retrieval_runner_equals_clip_benchmark_evaluate_with_duplicates():
    """clipforge's evaluate() and CLIP_benchmark's evaluate() with one stub model: duplicate
    images and captions, two captions per image."""
    from clipforge.eval.datasets import EvalDataset
    from clipforge.eval.runner import evaluate

    img, txt, t2i = _tied_features(30, 2, seed=5)
    captions = [[f"t{j}" for j in (t2i == i).nonzero().flatten().tolist()] for i in range(30)]
    feat = {f"t{j}": txt[j] for j in range(len(txt))}

    def tokenizer(texts):
        return torch.stack([feat[t] for t in texts])

    model = _StubModel()
    ds = EvalDataset("dups", 30, lambda i: img[i], captions=captions)
    ours = evaluate(model, tokenizer, None, ds, task="retrieval", ks=(1, 5), batch_size=8)["metrics"]

    pairs = list(zip(img, captions))
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=8, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b])
    )
    ref = cb_ret.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
    for key, value in ref.items():
        assert ours[key] == value, key
    assert ours["image_retrieval_boundary_ties@1"] > 0
