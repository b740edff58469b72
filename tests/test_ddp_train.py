"""DDP and FSDP2 through the trainer: two gloo processes on CPU (batch 8 each) produce the gradients
of one process with batch 16 (full feature gathering), see different data, and run the whole loop
(checkpoints and final model from rank 0 only, then a resume).

The two ranks are forked from a clean forkserver that has the heavy imports done (see
``tests/forking.py``), which saves a fresh interpreter's ~5 s of CPU per rank; each sets one
intra-op thread before touching torch.
"""

from __future__ import annotations

import os

import pytest
import torch
from forking import start_ranks
from helpers import threads_kept, tiny_run

import clipforge.train.trainer  # noqa: F401 - imported once, before forking the ranks
import clipforge.transforms  # noqa: F401
from clipforge.train.config import TrainConfig

pytestmark = pytest.mark.slow

BASE = tiny_run(32, epochs=1, lr=1e-3, seed=7)


def first_step_grads(cfg: TrainConfig, info) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Build the run exactly as ``train`` does and take the gradients of its first batch."""
    from clipforge.train.trainer import build_run, compute_gradients

    run = build_run(cfg, info)
    images, tokens = next(iter(run.loader))
    run.task.model.train()
    compute_gradients(run, images, tokens)
    grads = {n: _full(p.grad).detach().clone() for n, p in run.model.named_parameters()}
    return grads, images


def _full(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 keeps each rank's shard of a gradient as a DTensor; compare whole tensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, port: int, out_dir: str, strategy: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from clipforge.train.distributed import setup_distributed
    from clipforge.train.trainer import train

    info = setup_distributed("cpu")
    cfg = TrainConfig.from_flat(
        output_dir=os.path.join(out_dir, "run"), batch_size=8, distributed=strategy, **BASE
    )
    grads, images = first_step_grads(cfg, info)
    torch.save({"grads": grads, "images": images}, os.path.join(out_dir, f"rank{rank}.pt"))
    result = train(cfg.replace(max_steps=2, save_every_steps=1, grad_clip_norm=1.0))  # the whole loop
    resumed = train(cfg.replace(max_steps=3, save_every_steps=1, grad_clip_norm=1.0, resume="latest"))
    torch.save(
        {"steps": [result.steps, resumed.steps], "final": result.final_model_dir},
        os.path.join(out_dir, f"train{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process_with_double_batch(tmp_path, strategy):
    assert not torch.distributed.is_initialized(), "a forked rank must not inherit a process group"
    ranks = start_ranks(_worker, tmp_path, strategy)  # from the clean forkserver, its preloads set

    from clipforge.train.distributed import DistInfo

    with threads_kept(1):
        single, images = first_step_grads(
            TrainConfig.from_flat(output_dir=str(tmp_path / "single"), batch_size=16, **BASE), DistInfo()
        )

    # every rank sees different samples, together exactly the single process's batch
    a, b = ranks[0]["images"], ranks[1]["images"]
    assert a.shape[0] == b.shape[0] == 8
    assert not any(torch.equal(x, y) for x in a for y in b)
    union = torch.cat([a, b])
    assert all(any(torch.equal(x, y) for y in images) for x in union)
    # DDP averaged the gradients: identical on both ranks, equal to the batch-16 gradients
    for name, g in single.items():
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], atol=1e-6, rtol=0)
        torch.testing.assert_close(ranks[0]["grads"][name], g, atol=1e-5, rtol=0, msg=name)
    # the full loop ran on both ranks; rank 0 alone wrote checkpoints and the final model
    done = [torch.load(tmp_path / f"train{r}.pt", weights_only=True) for r in range(2)]
    assert [d["steps"] for d in done] == [[2, 3], [2, 3]]
    assert done[0]["final"] and done[1]["final"] is None
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000001.pt", "step_00000002.pt", "step_00000003.pt"]
    from clipforge.factory import create_model

    create_model(pretrained=str(tmp_path / "run" / "final"))


def test_torchrun_entry_point(tmp_path):
    """The README's command: ``torchrun --nproc-per-node 2 -m clipforge train`` (gloo on CPU).

    32 images, batch 4 per rank: the epoch is 4 steps only if both ranks joined one group and
    split the data (8 steps would mean each rank trained alone on everything).
    """
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "clipforge", "train", "--data", BASE["data"], "--model", "tiny-vit", "--batch-size", "4",
           "--epochs", "1", "--threads", "1", "--no-progress", "--log-every", "1", "--save-every-steps", "2",
           "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and not summary["interrupted"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s is not None]
    assert sorted(set(train_steps)) == [1, 2, 3, 4] and len(train_steps) == len(
        set(train_steps)
    )  # rank 0 only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    assert (out / "final" / "model.safetensors").exists()
