"""Losses: plain/chunked InfoNCE and SigLIP against brute-force references, and DDP equivalence.

The DDP test runs this file as a script in two gloo processes (``--ddp-worker``), so the worker
code sits next to the single-process reference it is compared with.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_gloo_ranks
from torch import Tensor, nn

from clipforge.errors import ClipforgeError
from clipforge.losses import ChunkedClipLoss, ClipLoss, SigLipLoss, chunked_clip_loss, gather_features

# --------------------------------------------------------------------------------------------- #
# Brute-force references (explicit loops, float64)
# --------------------------------------------------------------------------------------------- #


def _ref_infonce(image: Tensor, text: Tensor, scale: Tensor, rows: range | None = None) -> Tensor:
    """Symmetric InfoNCE by loops; ``rows`` = the local rows (labels = their global index)."""
    b = image.shape[0]
    rows = rows if rows is not None else range(b)
    img_terms, txt_terms = [], []
    for i in rows:
        logits_i = torch.stack([scale * image[i] @ text[j] for j in range(b)])
        img_terms.append(-(logits_i[i] - torch.logsumexp(logits_i, 0)))
        logits_t = torch.stack([scale * text[i] @ image[j] for j in range(b)])
        txt_terms.append(-(logits_t[i] - torch.logsumexp(logits_t, 0)))
    return (torch.stack(img_terms).mean() + torch.stack(txt_terms).mean()) / 2


def _ref_siglip(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    total = image.new_zeros(())
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if i == j else -1.0
            logit = scale * image[i] @ text[j] + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / image.shape[0]


def _features(b: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    # Make matching pairs more similar, as in training, so the loss is not trivially log(B).
    text = F.normalize(text + 0.5 * image, dim=-1)
    return image.requires_grad_(), text.requires_grad_()


def _grads(loss: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


# --------------------------------------------------------------------------------------------- #
# Single-process numerics
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_clip_loss_matches_bruteforce(batch: int) -> None:
    image, text = _features(batch, 8, seed=batch, dtype=torch.float64)
    scale = torch.tensor(13.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ours = ClipLoss()(image, text, scale, bias)  # a constant bias must not change InfoNCE
    ref = _ref_infonce(image, text, scale)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for a, b in zip(_grads(ours, image, text, scale), _grads(ref, image, text, scale)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # Also the textbook formulation with F.cross_entropy on the full logits.
    logits = scale * image @ text.T
    labels = torch.arange(batch)
    ce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(ours, ce, atol=1e-10, rtol=0)
    if batch > 1:
        assert ours.item() > 0.0


@pytest.mark.parametrize(("batch", "chunk"), [(64, 16), (50, 16), (7, 32), (33, 1), (16, 16)])
@pytest.mark.parametrize("scale_value", [14.285, 100.0])
def test_chunked_equals_plain_value_and_grads(batch: int, chunk: int, scale_value: float) -> None:
    image, text = _features(batch, 24, seed=batch + chunk)
    scale = torch.tensor(scale_value, requires_grad=True)
    plain = ClipLoss()(image, text, scale)
    chunked = ChunkedClipLoss(chunk_size=chunk)(image, text, scale)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)
    names = ("image", "text", "logit_scale")
    for name, a, b in zip(names, _grads(chunked, image, text, scale), _grads(plain, image, text, scale)):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_chunked_wide_logit_range_matches_plain() -> None:
    """Logits spanning [-100, 100] (scale 100, 2-d features) exercise the exp() floor."""
    g = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(30, 2, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(30, 2, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    plain = ClipLoss()(image, text, scale)
    chunked = ChunkedClipLoss(chunk_size=8)(image, text, scale)
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-6)
    for a, b in zip(_grads(chunked, image, text, scale), _grads(plain, image, text, scale)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


def test_chunked_through_learned_log_scale_and_upstream_grad() -> None:
    """Gradient reaches a log-space parameter (scale = p.exp()) and respects a non-unit dL."""
    image, text = _features(20, 16, seed=3)
    log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    loss_p = 3.0 * ClipLoss()(image, text, log_scale.exp())
    loss_c = 3.0 * ChunkedClipLoss(chunk_size=6)(image, text, log_scale.exp())
    grads_p = _grads(loss_p, image, text, log_scale)
    grads_c = _grads(loss_c, image, text, log_scale)
    for a, b in zip(grads_c, grads_p):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert grads_c[2].abs().item() > 1e-4  # the scale gradient is not trivially zero


def test_chunked_gradcheck_float64() -> None:
    image, text = _features(9, 5, seed=11, dtype=torch.float64)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda i, t, s: chunked_clip_loss(i, t, s, chunk_size=4), (image, text, scale)
    )
    # The local-rows form (used with local_loss) too, with a label offset.
    assert torch.autograd.gradcheck(
        lambda i, t, s: chunked_clip_loss(i, t, s, chunk_size=4, local_rows=(i[3:6], t[3:6]), offset=3),
        (image, text, scale),
    )


def test_chunked_local_rows_matches_bruteforce() -> None:
    image, text = _features(10, 6, seed=5, dtype=torch.float64)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    rows = range(5, 10)
    ours = chunked_clip_loss(image, text, scale, chunk_size=3, local_rows=(image[5:], text[5:]), offset=5)
    ref = _ref_infonce(image, text, scale, rows=rows)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for a, b in zip(_grads(ours, image, text, scale), _grads(ref, image, text, scale)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_chunked_bfloat16_close_to_float32() -> None:
    image, text = _features(40, 32, seed=9)
    scale = torch.tensor(20.0)
    ref = ClipLoss()(image.detach(), text.detach(), scale)
    low = ChunkedClipLoss(chunk_size=16)(image.detach().bfloat16(), text.detach().bfloat16(), scale)
    assert low.dtype == torch.bfloat16
    assert abs(low.float().item() - ref.item()) < 0.1


@pytest.mark.parametrize("batch", [1, 6])
def test_siglip_matches_bruteforce(batch: int) -> None:
    image, text = _features(batch, 8, seed=40 + batch, dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    ours = SigLipLoss()(image, text, scale, bias)
    ref = _ref_siglip(image, text, scale, bias)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    for a, b in zip(_grads(ours, image, text, scale, bias), _grads(ref, image, text, scale, bias)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_float_scale_and_errors() -> None:
    image, text = _features(4, 8, seed=1)
    assert torch.isclose(ClipLoss()(image, text, 10.0), ChunkedClipLoss(chunk_size=3)(image, text, 10.0))
    with pytest.raises(ClipforgeError, match="equal shapes"):
        ClipLoss()(image, text[:3], 10.0)
    with pytest.raises(ClipforgeError, match="chunk_size"):
        ChunkedClipLoss(chunk_size=0)
    with pytest.raises(ClipforgeError, match="not initialised"):
        ClipLoss(world_size=2, rank=0)(image, text, 10.0)
    same = gather_features(image, text)
    assert same[0] is image and same[1] is text


# --------------------------------------------------------------------------------------------- #
# DDP equivalence: 2 gloo processes x batch 8 == 1 process x batch 16
# --------------------------------------------------------------------------------------------- #

GLOBAL_BATCH = 16
DDP_KINDS = ["clip", "clip_local", "chunked", "chunked_local", "siglip", "clip_nograd"]


class _ToyCLIP(nn.Module):
    """Two linear "encoders" + learned temperature and bias: enough to check parameter gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.image_proj = nn.Linear(12, 6)
        self.text_proj = nn.Linear(10, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, x_img: Tensor, x_txt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        image = F.normalize(self.image_proj(x_img), dim=-1)
        text = F.normalize(self.text_proj(x_txt), dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias


def _toy_inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, 12, generator=g), torch.randn(GLOBAL_BATCH, 10, generator=g)


def _make_loss(kind: str, rank: int, world_size: int) -> nn.Module:
    dist_args = {"rank": rank, "world_size": world_size}
    if kind == "clip":
        return ClipLoss(**dist_args)
    if kind == "clip_local":
        return ClipLoss(local_loss=True, **dist_args)
    if kind == "clip_nograd":
        return ClipLoss(gather_with_grad=False, **dist_args)
    if kind == "chunked":
        return ChunkedClipLoss(chunk_size=5, **dist_args)  # 16 rows: not a multiple of 5
    if kind == "chunked_local":
        return ChunkedClipLoss(chunk_size=5, local_loss=True, **dist_args)
    if kind == "siglip":
        return SigLipLoss(**dist_args)
    raise ValueError(kind)


def _param_grads(model: nn.Module) -> dict[str, Tensor]:
    return {name.removeprefix("module."): p.grad.detach().clone() for name, p in model.named_parameters()}


def _reference(kind: str) -> tuple[float, dict[str, Tensor]]:
    model = _ToyCLIP()
    loss = _make_loss(kind, rank=0, world_size=1)(*model(*_toy_inputs()))
    loss.backward()
    return loss.item(), _param_grads(model)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x_img, x_txt = _toy_inputs()
        local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        results = {}
        for kind in DDP_KINDS:
            model = DDP(_ToyCLIP())
            loss = _make_loss(kind, rank, world_size)(*model(x_img[local], x_txt[local]))
            loss.backward()  # DDP averages parameter gradients over the ranks here
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[kind] = ((mean_loss / world_size).item(), _param_grads(model))
        torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    return run_gloo_ranks(Path(__file__).resolve(), tmp, 2, args=["--ddp-worker"], timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("kind", DDP_KINDS)
def test_ddp_two_ranks_equal_one_process(kind: str, ddp_results: list[dict]) -> None:
    ref_loss, ref_grads = _reference(kind)
    for rank, results in enumerate(ddp_results):
        loss, grads = results[kind]
        assert loss == pytest.approx(ref_loss, abs=1e-5), f"rank {rank}"
        for name, ref in ref_grads.items():
            expected = ref
            if kind == "clip_nograd" and name not in ("logit_scale", "logit_bias"):
                # Documented: gathering without gradient leaves encoder grads 1/world_size too small.
                expected = ref / 2
            assert grads[name].abs().max() > 0 or ref.abs().max() == 0
            torch.testing.assert_close(
                grads[name],
                expected,
                atol=1e-5,
                rtol=0,
                msg=lambda m, n=name, r=rank: f"{kind} rank {r} {n}: {m}",
            )


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--ddp-worker":
        _ddp_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        sys.exit(f"usage: {sys.argv[0]} --ddp-worker RANK WORLD_SIZE INIT_FILE OUT_FILE")
