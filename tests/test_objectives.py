"""The objective registry and the losses of clipforge.objectives against loop references.

References are written here with explicit Python loops in float64; every loss is checked for
value and gradients (features, temperature, bias), with odd batch sizes, duplicated ids and chunk
sizes that do and do not divide the batch, plus float64 gradcheck. The multi-rank equivalence
runs in tests/test_objectives_ddp.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.errors import ClipforgeError, ConfigError
from clipforge.losses import ChunkedClipLoss, ClipLoss, SigLipLoss
from clipforge.objectives import registry
from clipforge.objectives.combined import build_objective
from clipforge.objectives.distill import DistillKL
from clipforge.objectives.multipos import MultiPositiveLoss, multi_positive_loss
from clipforge.objectives.pairwise import ContrastiveBCELoss, NTXentLoss, TripletLoss
from clipforge.objectives.siglip import SigLip

F64 = torch.float64


def features(b: int, d: int, seed: int, dtype: torch.dtype = F64, extra: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=F64), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=F64) + 0.7 * image, dim=-1)
    out = [image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()]
    if extra:
        out.append(
            F.normalize(torch.randn(extra, d, generator=g, dtype=F64), dim=-1).to(dtype).requires_grad_()
        )
    return tuple(out)


def grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)


def assert_same(a: Tensor, b: Tensor, inputs: tuple[Tensor, ...], atol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    for ga, gb in zip(grads(a, *inputs), grads(b, *inputs)):
        ga = torch.zeros(()) if ga is None else ga
        gb = torch.zeros(()) if gb is None else gb
        torch.testing.assert_close(ga.to(F64).expand_as(gb) if ga.dim() == 0 else ga, gb, atol=atol, rtol=0)


IDS_9 = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])  # odd batch, groups of 1, 2 and 3


# --------------------------------------------------------------------------------------------- #
# references (loops)
# --------------------------------------------------------------------------------------------- #


def ref_multipos(image, text, scale, ids, variant, negatives=None, rows=None) -> Tensor:
    b = image.shape[0]
    rows = range(b) if rows is None else rows
    negatives = [] if negatives is None else list(negatives)
    terms = {"i": [], "t": []}
    for i in rows:
        for side, q, cols, extra in (("i", image, text, negatives), ("t", text, image, [])):
            logits = [scale * q[i] @ cols[j] for j in range(b)] + [scale * q[i] @ h for h in extra]
            lse = torch.logsumexp(torch.stack(logits), 0)
            pos = [logits[j] for j in range(b) if ids[j] == ids[i]]
            if variant == "mean":
                terms[side].append(lse - sum(pos) / len(pos))
            else:
                terms[side].append(lse - torch.logsumexp(torch.stack(pos), 0))
    return (torch.stack(terms["i"]).mean() + torch.stack(terms["t"]).mean()) / 2


def ref_siglip(image, text, scale, bias, ids) -> Tensor:
    total = image.new_zeros(())
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if ids[i] == ids[j] else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * image[i] @ text[j] + bias)))
    return total / image.shape[0]


def ref_triplet(image, text, ids, margin, mining) -> Tensor:
    b, out = image.shape[0], []
    for q, cols in ((image, text), (text, image)):
        per_anchor = []
        for a in range(b):
            sims = [q[a] @ cols[j] for j in range(b)]
            negs = [sims[j] for j in range(b) if ids[j] != ids[a]]
            terms = []
            for p in (j for j in range(b) if ids[j] == ids[a]):
                if not negs:
                    terms.append(sims[p] * 0)
                    continue
                if mining == "hardest":
                    s_neg = max(negs)
                else:
                    semi = [s for s in negs if s < sims[p]]
                    s_neg = max(semi) if semi else min(negs)
                terms.append(torch.relu(margin + s_neg - sims[p]))
            per_anchor.append(sum(terms) / len(terms))
        out.append(torch.stack(per_anchor).mean())
    return (out[0] + out[1]) / 2


def ref_ntxent(a, b, scale, ids) -> Tensor:
    items = list(a) + list(b)
    item_ids = list(ids) + list(ids)
    terms = []
    for i, q in enumerate(items):
        others = [k for k in range(len(items)) if k != i]
        lse = torch.logsumexp(torch.stack([scale * q @ items[k] for k in others]), 0)
        pos = [scale * q @ items[k] for k in others if item_ids[k] == item_ids[i]]
        terms.append(lse - sum(pos) / len(pos))
    return torch.stack(terms).mean()


def ref_bce(image, text, scale, bias, ids, pos_weight) -> Tensor:
    total, b = image.new_zeros(()), image.shape[0]
    for i in range(b):
        for j in range(b):
            p = torch.sigmoid(scale * image[i] @ text[j] + bias)
            total = total - (pos_weight * torch.log(p) if ids[i] == ids[j] else torch.log(1 - p))
    return total / b**2


def ref_kl(image, text, scale, t_image, t_text, t_scale) -> Tensor:
    out = []
    for s_q, s_c, t_q, t_c in ((image, text, t_image, t_text), (text, image, t_text, t_image)):
        rows = []
        for i in range(image.shape[0]):
            s = torch.stack([scale * s_q[i] @ s_c[j] for j in range(image.shape[0])])
            t = torch.stack([t_scale * t_q[i] @ t_c[j] for j in range(image.shape[0])])
            p = torch.softmax(t, 0)
            rows.append((p * (torch.log(p) - torch.log_softmax(s, 0))).sum())
        out.append(torch.stack(rows).mean())
    return (out[0] + out[1]) / 2


# --------------------------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------------------------- #


def test_registry_rejects_options_the_loss_does_not_take() -> None:
    with pytest.raises(ConfigError, match=r"--local-loss is not an option of --loss siglip.*'clip'"):
        registry.resolve_options("siglip", {"local_loss": True})
    with pytest.raises(ConfigError, match="--margin is not an option of --loss clip"):
        registry.build("clip", {"margin": 0.3})
    with pytest.raises(ConfigError, match="unknown loss"):
        registry.build("nope")
    assert registry.resolve_options("chunked", {"chunk_size": None})["chunk_size"] == 1024  # None = not given
    assert isinstance(registry.build("siglip"), SigLip)
    assert set(registry.LOSS_NAMES) == {
        "clip",
        "chunked",
        "multipos",
        "siglip",
        "triplet",
        "ntxent",
        "bce",
        "coca",
    }
    # coca reads the per-caption token losses of a CoCa forward (tests/test_coca_train.py)
    captions = {
        "caption_nll": torch.full((6,), 3.0, dtype=F64),
        "caption_tokens": torch.full((6,), 5.0, dtype=F64),
    }
    for name in registry.LOSS_NAMES:  # every loss builds with its defaults and runs
        image, text = features(6, 4, seed=1)
        extra = captions if name == "coca" else {}
        out = build_objective(name)(
            image, text, torch.tensor(5.0, dtype=F64), torch.tensor(-1.0, dtype=F64), **extra
        )
        assert out.dim() == 0 and torch.isfinite(out)


def test_option_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="positives"):
        registry.build("multipos", {"positives": "max"})
    with pytest.raises(ConfigError, match="mining"):
        registry.build("triplet", {"mining": "random"})
    with pytest.raises(ConfigError, match="siglip_exchange"):
        registry.build("siglip", {"siglip_exchange": "ring"})
    with pytest.raises(ConfigError, match="hard negatives need"):
        image, text, neg = features(4, 4, seed=2, extra=4)
        build_objective("clip")(image, text, 3.0, hard_negatives=neg)


# --------------------------------------------------------------------------------------------- #
# multi-positive InfoNCE
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_multipos_unique_ids_is_clip_loss_bit_for_bit(dtype) -> None:
    import open_clip.loss as oc

    image, text = features(13, 8, seed=3, dtype=dtype)
    scale = torch.tensor(14.285, dtype=dtype)
    ids = torch.arange(13) * 7  # unique, not arange
    for variant in ("mean", "lse"):
        ours = MultiPositiveLoss(positives=variant)(image, text, scale, ids=ids)
        assert torch.equal(ours, ClipLoss()(image, text, scale))
        assert torch.equal(ours, oc.ClipLoss()(image, text, scale))
        mine = grads(ours, image, text)
        for a, b in zip(mine, grads(ClipLoss()(image, text, scale), image, text)):
            assert torch.equal(a, b)
        # open_clip computes the text->image logits with a second matmul: gradients equal to rounding.
        for a, b in zip(mine, grads(oc.ClipLoss()(image, text, scale), image, text)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        chunked = MultiPositiveLoss(positives=variant, chunk_size=4)(image, text, scale, ids=ids)
        assert torch.equal(chunked, ChunkedClipLoss(chunk_size=4)(image, text, scale))
    # The general formula (not the delegation) gives InfoNCE too, to rounding.
    general = multi_positive_loss(image, text, scale, torch.arange(13), variant="lse")
    torch.testing.assert_close(
        general, ClipLoss()(image, text, scale), atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0
    )


@pytest.mark.parametrize("variant", ["mean", "lse"])
@pytest.mark.parametrize("chunk", [None, 3, 4, 9, 1])
def test_multipos_matches_reference(variant: str, chunk: int | None) -> None:
    image, text, neg = features(9, 6, seed=4, extra=5)
    scale = torch.tensor(9.0, dtype=F64, requires_grad=True)
    ours = multi_positive_loss(
        image, text, scale, IDS_9, variant=variant, hard_negatives=neg, chunk_size=chunk
    )
    ref = ref_multipos(image, text, scale, IDS_9, variant, negatives=neg)
    assert_same(ours, ref, (image, text, neg, scale))
    plain = multi_positive_loss(image, text, scale, IDS_9, variant=variant, chunk_size=chunk)
    assert_same(plain, ref_multipos(image, text, scale, IDS_9, variant), (image, text, scale))


@pytest.mark.parametrize("variant", ["mean", "lse"])
def test_multipos_local_rows_and_gradcheck(variant: str) -> None:
    image, text, neg = features(9, 5, seed=5, extra=3)
    scale = torch.tensor(6.0, dtype=F64, requires_grad=True)
    rows = slice(3, 6)
    for chunk in (None, 2):
        ours = multi_positive_loss(
            image, text, scale, IDS_9, variant=variant, hard_negatives=neg,
            local_rows=(image[rows], text[rows], IDS_9[rows]), chunk_size=chunk,
        )  # fmt: skip
        assert_same(
            ours,
            ref_multipos(image, text, scale, IDS_9, variant, negatives=neg, rows=range(3, 6)),
            (image, text, neg, scale),
        )

        def fn(i, t, n, s, c=chunk):
            return multi_positive_loss(i, t, s, IDS_9, variant=variant, hard_negatives=n, chunk_size=c)

        assert torch.autograd.gradcheck(fn, (image, text, neg, scale))


def test_multipos_module_hard_negative_placeholders_and_bias() -> None:
    image, text, neg = features(5, 4, seed=6, extra=10)  # 2 hard negatives per row
    valid = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    bias = torch.tensor(-2.0, dtype=F64, requires_grad=True)
    ours = MultiPositiveLoss()(image, text, 4.0, bias, hard_negatives=neg, hard_negatives_valid=valid)
    ref = ref_multipos(image, text, 4.0, torch.arange(5), "mean", negatives=neg[valid])
    assert_same(ours, ref, (image, text, neg))
    assert grads(ours, bias)[0] == 0  # shift-invariant, but in the graph
    assert float(grads(ours, neg)[0][~valid].abs().max()) == 0.0


def test_multipos_chunked_bfloat16_close_and_errors() -> None:
    image, text = features(20, 16, seed=7, dtype=torch.float32)
    ids = torch.arange(20) // 2
    ref = multi_positive_loss(image.detach(), text.detach(), 10.0, ids, variant="lse")
    low = multi_positive_loss(
        image.detach().bfloat16(), text.detach().bfloat16(), 10.0, ids, variant="lse", chunk_size=6
    )
    assert low.dtype == torch.bfloat16 and abs(low.float().item() - ref.item()) < 0.1
    with pytest.raises(ClipforgeError, match="no positive"):
        multi_positive_loss(image, text, 1.0, ids, local_rows=(image[:2], text[:2], torch.tensor([99, 98])))
    with pytest.raises(ClipforgeError, match=">= 0"):
        MultiPositiveLoss()(image, text, 1.0, ids=ids - 5)


# --------------------------------------------------------------------------------------------- #
# SigLIP, triplet, NT-Xent, BCE, distillation
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("exchange", ["neighbour", "gather"])
def test_siglip_with_ids_matches_reference(exchange: str) -> None:
    image, text = features(9, 6, seed=8)
    scale = torch.tensor(10.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-6.0, dtype=F64, requires_grad=True)
    loss = SigLip(exchange=exchange)
    assert_same(
        loss(image, text, scale, bias, ids=IDS_9),
        ref_siglip(image, text, scale, bias, IDS_9),
        (image, text, scale, bias),
    )
    unique = loss(image, text, scale, bias)
    assert_same(unique, SigLipLoss()(image, text, scale, bias), (image, text, scale, bias))
    assert torch.autograd.gradcheck(
        lambda i, t, s, b: loss(i, t, s, b, ids=IDS_9), (image, text, scale, bias)
    )


@pytest.mark.parametrize("mining", ["hardest", "semihard"])
@pytest.mark.parametrize("ids", [None, IDS_9])
def test_triplet_matches_reference(mining: str, ids) -> None:
    image, text = features(9, 6, seed=9)
    scale = torch.tensor(3.0, dtype=F64, requires_grad=True)
    ours = TripletLoss(margin=0.3, mining=mining)(image, text, scale, ids=ids)
    ref = ref_triplet(image, text, torch.arange(9) if ids is None else ids, 0.3, mining)
    assert ours.item() > 0
    assert_same(ours, ref, (image, text))
    assert grads(ours, scale)[0] == 0
    same = torch.zeros(9, dtype=torch.long)  # no negatives at all: zero loss, finite gradients
    assert TripletLoss()(image, text, scale, ids=same).item() == 0.0


@pytest.mark.parametrize("ids", [None, IDS_9])
def test_ntxent_matches_reference(ids) -> None:
    image, text = features(9, 6, seed=10)
    scale = torch.tensor(5.0, dtype=F64, requires_grad=True)
    loss = NTXentLoss()
    ours = loss(image, text, scale, ids=ids)
    assert_same(
        ours, ref_ntxent(image, text, scale, torch.arange(9) if ids is None else ids), (image, text, scale)
    )
    if ids is None:  # SimCLR's textbook form: 2B x 2B logits, diagonal masked, CE against the pair
        z = torch.cat([image, text])
        logits = (scale * z @ z.T).fill_diagonal_(-math.inf)
        labels = torch.cat([torch.arange(9, 18), torch.arange(9)])
        torch.testing.assert_close(ours, F.cross_entropy(logits, labels), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda i, t, s: loss(i, t, s, ids=ids), (image, text, scale))


@pytest.mark.parametrize("pos_weight", [1.0, 4.5])
def test_bce_matches_reference(pos_weight: float) -> None:
    image, text = features(7, 5, seed=11)
    scale = torch.tensor(8.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3])
    loss = ContrastiveBCELoss(pos_weight=pos_weight)
    ours = loss(image, text, scale, bias, ids=ids)
    assert_same(ours, ref_bce(image, text, scale, bias, ids, pos_weight), (image, text, scale, bias))
    assert torch.autograd.gradcheck(lambda i, t, s, b: loss(i, t, s, b, ids=ids), (image, text, scale, bias))


def test_distill_matches_reference_and_open_clip() -> None:
    import open_clip.loss as oc

    image, text = features(7, 6, seed=12)
    t_image, t_text = (x.detach() for x in features(7, 6, seed=13))
    scale = torch.tensor(12.0, dtype=F64, requires_grad=True)
    ours = DistillKL(teacher_scale=30.0)(image, text, scale, t_image, t_text)
    assert_same(ours, ref_kl(image, text, scale, t_image, t_text, 30.0), (image, text, scale))
    # open_clip's DistillClipLoss: cross-entropy to the teacher's softmax = our KL + the teacher's entropy.
    contrastive, theirs = oc.DistillClipLoss()(
        image, text, scale, t_image, t_text, torch.tensor(30.0, dtype=F64)
    )
    entropy = []
    for logits in (30.0 * t_image @ t_text.T, 30.0 * t_text @ t_image.T):
        p = logits.softmax(1)
        entropy.append(-(p * p.log()).sum(1).mean())
    torch.testing.assert_close(ours + sum(entropy) / 2, theirs, atol=1e-12, rtol=0)
    for a, b in zip(grads(ours, image, text, scale), grads(theirs, image, text, scale)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    objective = build_objective("clip", distill_weight=0.5, distill_scale=30.0)
    total = objective(image, text, scale, teacher_image=t_image, teacher_text=t_text)
    torch.testing.assert_close(total, contrastive + 0.5 * ours, atol=1e-12, rtol=0)
    assert set(objective.last_terms) == {"loss_main", "loss_distill"}


def test_image_ssl_term_is_ntxent_of_views() -> None:
    image, text, view = features(6, 5, seed=14, extra=6)
    objective = build_objective("clip", image_ssl="ntxent", image_ssl_weight=0.25, image_ssl_temperature=0.2)
    total = objective(image, text, 10.0, image_views=view)
    expected = ClipLoss()(image, text, 10.0) + 0.25 * ref_ntxent(image, view, 5.0, torch.arange(6))
    assert_same(total, expected, (image, text, view))
    with pytest.raises(ConfigError, match="second augmented view"):
        objective(image, text, 10.0)
