"""``--loss coca`` with the rest of the trainer: LiT (locked image tower), exact resume, 2-rank gloo DDP.

- LiT: the whole image tower (attentional pooler included) keeps its initial weights bit for bit
  while the text tower and the captioning decoder train and the caption loss falls.
- Resume: a run that crashes after a checkpoint and resumes with ``resume="latest"`` logs the same
  loss, contrastive and caption terms at every step as the uninterrupted run, and ends with the
  same weights, with patch dropout on (so the RNG state is restored too).
- DDP: two gloo ranks (batch 8 each) produce the gradients one process gets from batch 16. The
  caption term is each rank's own token mean, as in open_clip; full-style shapes captions all have
  the same number of tokens, so the rank average equals the global mean (asserted on the data).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from forking import start_ranks
from helpers import tiny_run

import clipforge
import clipforge.train.trainer  # noqa: F401 - imported once, before forking the ranks
import clipforge.transforms  # noqa: F401
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train

pytestmark = pytest.mark.slow

BASE = tiny_run(
    32,
    model="tiny-coca",
    loss="coca",
    batch_size=8,
    lr=2e-3,
    warmup_steps=0,
    schedule="const",
    seed=3,
    workers=0,
)


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


def _train_records(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_lit_locks_the_whole_image_tower_while_the_decoder_learns(tmp_path, keep_threads):
    torch.manual_seed(BASE["seed"])
    initial = clipforge.create_model("tiny-coca").state_dict()
    result = train(TrainConfig.from_flat(output_dir=str(tmp_path), max_steps=6, lock_image=True, **BASE))
    assert result.steps == 6
    final = _weights(tmp_path)
    visual = [k for k in initial if k.startswith("visual.")]
    assert any(".attn_pool." in k for k in visual)  # the pooler that makes the caption tokens is locked too
    moved = [k for k in visual if not torch.equal(final[k], initial[k])]
    assert not moved, f"{len(moved)} image-tower tensors changed under LiT, e.g. {moved[:3]}"
    for prefix in ("text.", "text_decoder."):
        trained = [k for k in initial if k.startswith(prefix) and not torch.equal(final[k], initial[k])]
        assert len(trained) > 10, (prefix, len(trained))
    captions = [r["caption_loss"] for r in _train_records(tmp_path)]
    assert len(captions) == 6 and captions[-1] < captions[0] - 2.0, captions


class _Crash(Exception):
    pass


def test_resume_after_a_crash_repeats_the_loss_curve_exactly(tmp_path, monkeypatch, keep_threads):
    import clipforge.train.trainer as trainer

    cfg = dict(BASE, epochs=2, save_every_steps=2, patch_dropout=0.25)  # 8 steps
    ref = train(TrainConfig.from_flat(output_dir=str(tmp_path / "ref"), **cfg))
    assert ref.steps == 8

    real_step = trainer.train_step

    def crash_at_5(run, *a, **kw):
        if run.state.step == 5:
            raise _Crash  # a hard crash: nothing after the step-4 checkpoint survives
        return real_step(run, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", crash_at_5)
        with pytest.raises(_Crash):
            train(TrainConfig.from_flat(output_dir=str(tmp_path / "run"), **cfg))
    assert not (tmp_path / "run" / "final").exists()
    resumed = train(TrainConfig.from_flat(output_dir=str(tmp_path / "run"), resume="latest", **cfg))
    assert resumed.steps == 8
    want = {r["step"]: r for r in _train_records(tmp_path / "ref")}
    got = {r["step"]: r for r in _train_records(tmp_path / "run")}  # steps 5.. come from the resumed run
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "contrastive_loss", "caption_loss"):
            assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])
    ref_w, run_w = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert ref_w.keys() == run_w.keys()
    assert not [k for k in ref_w if not torch.equal(ref_w[k], run_w[k])]


def first_step_grads(cfg: TrainConfig, info) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Build the run exactly as ``train`` does and take the gradients of its first batch."""
    from clipforge.train.trainer import build_run, compute_gradients

    run = build_run(cfg, info)
    images, tokens = next(iter(run.loader))
    run.task.model.train()
    compute_gradients(run, images, tokens)
    grads = {n: _full(p.grad).detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
    return grads, images, tokens


def _full(t: torch.Tensor) -> torch.Tensor:
    """FSDP2 keeps each rank's shard of a gradient as a DTensor; compare whole tensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, port: int, out_dir: str, strategy: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from clipforge.train.distributed import setup_distributed

    info = setup_distributed("cpu")
    cfg = TrainConfig.from_flat(
        output_dir=os.path.join(out_dir, "run"), distributed=strategy, epochs=1, **BASE
    )
    grads, images, tokens = first_step_grads(cfg, info)
    result = train(cfg.replace(max_steps=2))  # the whole loop, with the caption terms logged
    torch.save({"grads": grads, "images": images, "tokens": tokens, "steps": result.steps},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_average_to_one_process_with_double_batch(tmp_path, strategy, keep_threads):
    assert not torch.distributed.is_initialized(), "a forked rank must not inherit a process group"
    ranks = start_ranks(_worker, tmp_path, strategy)  # from the clean forkserver, its preloads set
    from clipforge.train.distributed import DistInfo

    single, images, tokens = first_step_grads(
        TrainConfig.from_flat(output_dir=str(tmp_path / "single"), epochs=1, **{**BASE, "batch_size": 16}),
        DistInfo(),
    )
    a, b = ranks[0]["images"], ranks[1]["images"]
    assert a.shape[0] == b.shape[0] == 8 and not any(torch.equal(x, y) for x in a for y in b)
    assert all(any(torch.equal(x, y) for y in images) for x in torch.cat([a, b]))
    counts = [int((r["tokens"][:, 1:] != 0).sum()) for r in ranks]
    assert counts[0] == counts[1] == int((tokens[:, 1:] != 0).sum()) // 2  # rank means == the global mean
    assert set(single) == set(ranks[0]["grads"]) and any(k.startswith("text_decoder.") for k in single)
    for name, g in single.items():
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], atol=1e-6, rtol=0)
        torch.testing.assert_close(ranks[0]["grads"][name], g, atol=1e-5, rtol=0, msg=name)
    assert [r["steps"] for r in ranks] == [2, 2]
    records = _train_records(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all(r["caption_loss"] > 0 for r in records)
