"""Zero-shot and retrieval metrics against hand-computed answers and naive reference loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError
from clipforge.eval.retrieval import query_ranks, retrieval_metrics, topk_retrieve
from clipforge.eval.templates import (
    IMAGENET_TEMPLATES,
    SIMPLE_TEMPLATES,
    load_template_file,
    resolve_templates,
)
from clipforge.eval.zero_shot import accuracy_metrics, evaluate_zero_shot, zero_shot_classifier

# ----------------------------------------------------------------------------------------------
# naive references: loops over Python floats, written for obviousness, not speed


def naive_retrieval(img: torch.Tensor, txt: torch.Tensor, t2i: list[int], ks) -> dict:
    scores = (txt.double() @ img.double().T).tolist()  # [T, I]
    n_img, n_txt = img.shape[0], txt.shape[0]
    t_ranks = []
    for t in range(n_txt):
        pos = scores[t][t2i[t]]
        t_ranks.append(1 + sum(1 for i in range(n_img) if i != t2i[t] and scores[t][i] >= pos))
    i_ranks = []
    for i in range(n_img):
        caps = [t for t in range(n_txt) if t2i[t] == i]
        if not caps:
            continue
        best = max(scores[t][i] for t in caps)
        i_ranks.append(1 + sum(1 for t in range(n_txt) if t2i[t] != i and scores[t][i] >= best))
    out = {}
    for k in ks:
        out[f"image_retrieval_pessimistic_recall@{k}"] = sum(r <= k for r in t_ranks) / len(t_ranks)
        out[f"text_retrieval_pessimistic_recall@{k}"] = sum(r <= k for r in i_ranks) / len(i_ranks)
    out["image_retrieval_mean_rank"] = sum(t_ranks) / len(t_ranks)
    out["text_retrieval_mean_rank"] = sum(i_ranks) / len(i_ranks)
    out["image_retrieval_median_rank"] = sorted(t_ranks)[(len(t_ranks) - 1) // 2]
    out["text_retrieval_median_rank"] = sorted(i_ranks)[(len(i_ranks) - 1) // 2]
    return out


def naive_topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    hits = 0
    for row, y in zip(logits.tolist(), labels.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += y in order[:k]
    return hits / len(labels)


# ----------------------------------------------------------------------------------------------
# retrieval


def _hand_case():
    """Integer features, so every dot product (and every tie) is exact in float32."""
    e = torch.eye(3)
    images = torch.stack([e[0], e[1], e[1], e[2]])  # images 1 and 2 are duplicates -> ties
    texts = torch.stack([e[0], e[1], e[1], e[2], e[0]])
    t2i = torch.tensor([0, 1, 2, 0, 3])  # image 0 has two captions, one of them bad
    return images, texts, t2i


def test_retrieval_known_answer_with_ties_and_multi_caption():
    images, texts, t2i = _hand_case()
    m = retrieval_metrics(images, texts, t2i, ks=(1, 2, 5), return_ranks=True)
    # text->image ranks worked out by hand: ties with a negative count against the query
    assert m["image_retrieval_ranks"].tolist() == [1, 2, 2, 4, 4]
    assert m["text_retrieval_ranks"].tolist() == [2, 2, 2, 5]
    assert m["image_retrieval_pessimistic_recall@1"] == pytest.approx(0.2)
    assert m["image_retrieval_pessimistic_recall@2"] == pytest.approx(0.6)
    assert m["image_retrieval_pessimistic_recall@5"] == 1.0
    assert m["text_retrieval_pessimistic_recall@1"] == 0.0
    assert m["text_retrieval_pessimistic_recall@2"] == pytest.approx(0.75)
    assert m["text_retrieval_pessimistic_recall@5"] == 1.0
    assert m["image_retrieval_mean_rank"] == pytest.approx(2.6)
    assert m["image_retrieval_median_rank"] == 2
    assert m["text_retrieval_mean_rank"] == pytest.approx(2.75)
    assert m["text_retrieval_median_rank"] == 2
    ref = naive_retrieval(images, texts, t2i.tolist(), (1, 2, 5))
    for key, value in ref.items():
        assert m[key] == pytest.approx(value), key


def test_collapsed_model_gets_no_credit_for_ties_in_pessimistic_keys():
    images = torch.ones(6, 4) / 2
    texts = torch.ones(12, 4) / 2
    t2i = torch.arange(12) // 2
    m = retrieval_metrics(images, texts, t2i, ks=(1, 5))
    assert (
        m["image_retrieval_pessimistic_recall@1"] == 0.0 and m["text_retrieval_pessimistic_recall@1"] == 0.0
    )
    assert m["image_retrieval_pessimistic_recall@5"] == 0.0  # every text: 5 tied negatives -> rank 6
    assert m["image_retrieval_mean_rank"] == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_naive_reference_random(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img, dim = 37, 8
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (40,), generator=gen)])
    t2i = t2i[t2i != 5]  # image 5 has no caption: left out of text retrieval
    images = F.normalize(torch.randn(n_img, dim, generator=gen), dim=-1)
    # captions near their image so recall is neither 0 nor 1
    texts = F.normalize(images[t2i] + 0.9 * torch.randn(len(t2i), dim, generator=gen), dim=-1)
    ks = (1, 5, 10)
    m = retrieval_metrics(images, texts, t2i, ks=ks)
    ref = naive_retrieval(images, texts, t2i.tolist(), ks)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert 0.0 < m["image_retrieval_recall@1"] < 1.0


@pytest.mark.parametrize("block_size", [1, 3, 7, 16, 1000])
def test_blocked_equals_unblocked(block_size):
    gen = torch.Generator().manual_seed(3)
    # small-integer features: exact dot products, many exact ties, so blocking must not matter
    images = torch.randint(-2, 3, (29, 5), generator=gen).float()
    t2i = torch.randint(0, 29, (61,), generator=gen)
    texts = torch.randint(-2, 3, (61, 5), generator=gen).float()
    full = retrieval_metrics(images, texts, t2i, block_size=10_000, return_ranks=True)
    blocked = retrieval_metrics(images, texts, t2i, block_size=block_size, return_ranks=True)
    assert torch.equal(full["image_retrieval_ranks"], blocked["image_retrieval_ranks"])
    assert torch.equal(full["text_retrieval_ranks"], blocked["text_retrieval_ranks"])
    ref = naive_retrieval(images, texts, t2i.tolist(), (1, 5, 10))
    for key, value in ref.items():
        assert blocked[key] == pytest.approx(value), key


def test_query_ranks_without_positive_and_tied_positives():
    q = torch.eye(3)
    # query 0 -> candidate 0; query 1 has none; query 2 has two positives tied with a negative
    c = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    ranks = query_ranks(q, c, torch.tensor([0, 2, 2]), torch.tensor([0, 1, 2]), block_size=1)
    assert ranks.tolist() == [1, 5, 2]
    with pytest.raises(ValueError, match="sorted"):
        query_ranks(q, c, torch.tensor([2, 0]), torch.tensor([0, 1]))


def test_retrieval_rejects_bad_mapping():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="lie in"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


@pytest.mark.parametrize("block_size", [1, 4, 100])
def test_topk_retrieve_matches_sort(block_size):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(9, 6, generator=gen)
    c = torch.randn(23, 6, generator=gen)
    idx, val = topk_retrieve(q, c, k=5, block_size=block_size)
    ref_val, ref_idx = (q @ c.T).sort(dim=1, descending=True)
    assert torch.equal(idx, ref_idx[:, :5])
    assert torch.allclose(val, ref_val[:, :5], atol=1e-6)
    # ties go to the lower index
    idx, _ = topk_retrieve(torch.ones(1, 2), torch.ones(6, 2), k=3, block_size=block_size)
    assert idx.tolist() == [[0, 1, 2]]


# ----------------------------------------------------------------------------------------------
# zero-shot metrics


def test_accuracy_metrics_known_answer():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = torch.tensor(
        [[3.0, 1, 0], [1, 3, 2], [0, 2, 1], [0, 1, 2], [1, 0, 2], [2, 0, 1]]
    )  # preds 0,1,1,2,2,0 ; second choices 1,2,2,1,0,2
    m = accuracy_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(4 / 6)
    assert m["acc5"] == 1.0  # k clipped to 3 classes
    assert m["per_class_accuracy"] == pytest.approx([0.5, 1.0, 2 / 3])
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    m2 = accuracy_metrics(logits, labels, topk=(1, 2))
    assert m2["acc2"] == pytest.approx(naive_topk_accuracy(logits, labels, 2)) == pytest.approx(5 / 6)


def test_accuracy_metrics_absent_class_and_predictions():
    preds = torch.tensor([0, 0, 3, 3])
    labels = torch.tensor([0, 1, 3, 3])
    m = accuracy_metrics(preds, labels, num_classes=4)
    assert m["acc1"] == 0.75
    assert m["per_class_accuracy"] == [1.0, 0.0, None, 1.0]
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)  # class 2 has no samples: excluded
    assert "acc5" not in m


def test_accuracy_metrics_random_vs_naive():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=gen)
    labels = torch.randint(0, 12, (200,), generator=gen)
    m = accuracy_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(naive_topk_accuracy(logits, labels, 1))
    assert m["acc5"] == pytest.approx(naive_topk_accuracy(logits, labels, 5))
    per = []
    for c in range(12):
        idx = [i for i, y in enumerate(labels.tolist()) if y == c]
        per.append(sum(int(logits[i].argmax()) == c for i in idx) / len(idx))
    assert m["mean_per_class_recall"] == pytest.approx(sum(per) / 12)
    assert sum(map(sum, m["confusion_matrix"])) == 200


class FakeModel(torch.nn.Module):
    """encode_text: a fixed random embedding per token sequence; encode_image: identity."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(1000, dim)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))

    def encode_text(self, tokens, normalize=False):
        x = self.table(tokens).sum(1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images, normalize=False):
        return F.normalize(images, dim=-1) if normalize else images


def fake_tokenizer(texts):
    return torch.tensor(
        [[sum(map(ord, w)) * 7 % 1000 for w in (t.split() + ["<pad>"] * 8)[:8]] for t in texts]
    )


@pytest.mark.parametrize("batch_size", [1, 5, 1000])
def test_zero_shot_classifier_matches_per_class_loop(batch_size):
    model = FakeModel()
    classes = ["cat", "dog", "red car", "tree"]
    templates = ["a photo of a {}.", "a {} in the snow", "{}"]
    clf = zero_shot_classifier(model, fake_tokenizer, classes, templates, batch_size=batch_size)
    assert clf.shape == (6, 4)
    cols = []
    for c in classes:  # the classic one-class-at-a-time loop
        emb = F.normalize(model.encode_text(fake_tokenizer([t.format(c) for t in templates])), dim=-1)
        mean = emb.mean(0)
        cols.append(mean / mean.norm())
    assert torch.allclose(clf, torch.stack(cols, 1), atol=1e-6)
    assert torch.allclose(clf.norm(dim=0), torch.ones(4), atol=1e-6)


def test_zero_shot_classifier_encodes_identical_prompts_once():
    """ImageNet has two "crane"s: their prompts are encoded once, both columns still filled."""
    seen: list[torch.Tensor] = []

    class Counting(FakeModel):
        def encode_text(self, tokens, normalize=False):
            seen.append(tokens)
            return super().encode_text(tokens, normalize)

    model = Counting()
    classes = ["crane", "dog", "crane", "tree"]
    templates = ["a photo of a {}.", "{}", "a photo of a {}."]  # a repeated template too
    clf = zero_shot_classifier(model, fake_tokenizer, classes, templates, batch_size=2)
    assert sum(len(t) for t in seen) == 3 * 2  # 3 distinct classes x 2 distinct templates
    seen.clear()
    cols = []
    for c in classes:
        emb = F.normalize(model.encode_text(fake_tokenizer([t.format(c) for t in templates])), dim=-1)
        cols.append(emb.mean(0) / emb.mean(0).norm())
    assert torch.allclose(clf, torch.stack(cols, 1), atol=1e-6)
    assert torch.equal(clf[:, 0], clf[:, 2]) and not torch.allclose(clf[:, 0], clf[:, 1])


def test_evaluate_zero_shot_equals_accuracy_metrics():
    gen = torch.Generator().manual_seed(1)
    clf = F.normalize(torch.randn(6, 7, generator=gen), dim=0)
    feats = torch.randn(50, 6, generator=gen)
    labels = torch.randint(0, 7, (50,), generator=gen)
    loader = [(feats[i : i + 16], labels[i : i + 16]) for i in range(0, 50, 16)]
    m = evaluate_zero_shot(FakeModel(), loader, clf, "cpu")
    ref = accuracy_metrics(F.normalize(feats, dim=-1) @ clf, labels)
    assert m == ref
    assert m["num_samples"] == 50
    # a bf16 model gets bf16 images (no dtype mismatch), metrics still computed in float32
    half = evaluate_zero_shot(FakeModel().to(torch.bfloat16), loader, clf, "cpu")
    assert half["num_samples"] == 50 and abs(half["acc1"] - ref["acc1"]) <= 0.1


# ----------------------------------------------------------------------------------------------
# templates


def test_template_sets():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert set(SIMPLE_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert resolve_templates("simple") == list(SIMPLE_TEMPLATES)
    assert resolve_templates(["x {} y"]) == ["x {} y"]


def test_callable_templates_give_the_same_classifier():
    model = FakeModel()
    strings = zero_shot_classifier(model, fake_tokenizer, ["cat", "dog"], ["a {} here", "the {}"])
    lambdas = zero_shot_classifier(
        model, fake_tokenizer, ["cat", "dog"], [lambda c: f"a {c} here", lambda c: f"the {c}"]
    )
    assert torch.equal(strings, lambdas)


def test_template_validation_names_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\na photo of a {}.\n\n  a drawing of a {}  \n")
    assert load_template_file(good) == ["a photo of a {}.", "a drawing of a {}"]
    assert resolve_templates(str(good)) == ["a photo of a {}.", "a drawing of a {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ConfigError, match=r"bad\.txt:2"):
        load_template_file(bad)
    bad.write_text("a {} and a {}\n")
    with pytest.raises(ConfigError, match=r"bad\.txt:1.*exactly once"):
        resolve_templates(bad)
    with pytest.raises(ConfigError, match=r"templates\[1\]"):
        resolve_templates(["a {}", "no slot"])
    with pytest.raises(ConfigError, match="not a known set"):
        resolve_templates("imagenett")
