"""Every objective that gathers, under 2 and 3 gloo ranks, gives one process's loss and gradients.

Global batch 12 with duplicated group ids that straddle rank boundaries, hard negatives with
placeholders, a second image view and teacher features; each rank holds its slice and the
parameter gradients are averaged over ranks, as DDP does. 3 ranks make the SigLIP ring a real ring (with 2 the left and right
neighbour are the same process). The workers run this file as a script.
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

from clipforge.objectives.combined import build_objective

pytestmark = pytest.mark.slow

B = 12
IDS = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 6])  # groups cross the 2- and 3-rank splits
KINDS = {
    "multipos_mean": ("multipos", {}),
    "multipos_lse_chunked_local": ("multipos", {"positives": "lse", "chunk_size": 5, "local_loss": True}),
    "multipos_hn_chunked": ("multipos", {"chunk_size": 4}),
    "multipos_hn_dense_local": ("multipos", {"local_loss": True}),
    "siglip_neighbour": ("siglip", {}),
    "siglip_gather": ("siglip", {"siglip_exchange": "gather"}),
    "triplet_semihard": ("triplet", {"mining": "semihard"}),
    "ntxent": ("ntxent", {}),
    "bce": ("bce", {"pos_weight": 3.0}),
    "clip_ssl_distill": ("clip", {}),
}


class ToyCLIP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.image_proj, self.text_proj = nn.Linear(12, 6), nn.Linear(10, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, x_img: Tensor, x_txt: Tensor) -> tuple[Tensor, ...]:
        return (
            F.normalize(self.image_proj(x_img), dim=-1),
            F.normalize(self.text_proj(x_txt), dim=-1),
            self.logit_scale.exp(),
            self.logit_bias,
        )


def inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "img": torch.randn(B, 12, generator=g),
        "txt": torch.randn(B, 10, generator=g),
        "view": torch.randn(B, 12, generator=g),
        "neg": torch.randn(2 * B, 10, generator=g),
        "valid": torch.rand(2 * B, generator=g) > 0.3,
        "t_img": F.normalize(torch.randn(B, 6, generator=g), dim=-1),
        "t_txt": F.normalize(torch.randn(B, 6, generator=g), dim=-1),
    }


def loss_of(kind: str, model: nn.Module, rows: slice, rank: int, world_size: int) -> Tensor:
    name, options = KINDS[kind]
    x = inputs()
    extra = (
        {"image_ssl": "ntxent", "distill_weight": 0.5, "distill_scale": 20.0}
        if kind == "clip_ssl_distill"
        else {}
    )
    objective = build_objective(name, options, rank=rank, world_size=world_size, **extra)
    image, text, scale, bias = model(x["img"][rows], x["txt"][rows])
    kw: dict[str, Tensor] = {"ids": IDS[rows]}
    if kind.startswith("multipos_hn"):
        neg_rows = slice(2 * rows.start, 2 * rows.stop)
        kw["hard_negatives"] = F.normalize(model.text_proj(x["neg"][neg_rows]), dim=-1)
        kw["hard_negatives_valid"] = x["valid"][neg_rows]
    if kind == "clip_ssl_distill":
        kw = {"ids": IDS[rows], "image_views": F.normalize(model.image_proj(x["view"][rows]), dim=-1)}
        kw.update(teacher_image=x["t_img"][rows], teacher_text=x["t_txt"][rows])
    return objective(image, text, scale, bias, **kw)


def grads_of(model: nn.Module) -> dict[str, Tensor]:
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()}


def worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        n = B // world_size
        results = {}
        for kind in KINDS:
            model = ToyCLIP()  # the hard negatives use a tower outside forward(): average as DDP does
            loss = loss_of(kind, model, slice(rank * n, (rank + 1) * n), rank, world_size)
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world_size
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[kind] = ((total / world_size).item(), grads_of(model))
        torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp: Path, world_size: int) -> list[dict]:
    return run_gloo_ranks(Path(__file__).resolve(), tmp, world_size, timeout=240)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_one_process(tmp_path: Path, world_size: int) -> None:
    ranks = run_ranks(tmp_path, world_size)
    for kind in KINDS:
        model = ToyCLIP()
        ref = loss_of(kind, model, slice(0, B), 0, 1)
        ref.backward()
        ref_grads = grads_of(model)
        for rank, results in enumerate(ranks):
            value, got = results[kind]
            assert value == pytest.approx(ref.item(), abs=1e-5), f"{kind} rank {rank}"
            for name, g in ref_grads.items():
                torch.testing.assert_close(
                    got[name], g, atol=1e-5, rtol=0, msg=lambda m, k=kind, n=name: f"{k} {n}: {m}"
                )


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
