"""Trainer options that change what a step computes or what a run leaves behind: gradient clipping,
bf16 autocast on CPU, gradient checkpointing, locked text tower, torch.compile, periodic evaluation,
TensorBoard, the checkpoint schedule (every N steps + each epoch, keep last K) and the epoch cap."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from clipforge.train.config import TrainConfig
from clipforge.train.distributed import DistInfo
from clipforge.train.surgery import lock_towers
from clipforge.train.trainer import autocast_factory, build_run, train, train_step

DATA = "synthetic:shapes?n=16&image_size=32"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(data=DATA, model="tiny-vit", batch_size=8, progress=False, output_dir=str(tmp_path))
    return TrainConfig.from_flat(**{**base, **overrides})


def make_run(tmp_path, **overrides):
    return build_run(config(tmp_path, **overrides), DistInfo())


def first_batch(run):
    return next(iter(run.loader))


def global_grad_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_grad_clip_norm_bounds_what_the_optimizer_sees(tmp_path):
    run = make_run(tmp_path, grad_clip_norm=0.01)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    seen = []
    real_step = run.optimizer.step

    def step(*args, **kwargs):
        seen.append(global_grad_norm(params))
        return real_step(*args, **kwargs)

    run.optimizer.step = step
    metrics = train_step(run, *first_batch(run), contextlib.nullcontext)
    assert metrics["grad_norm"] > 0.1  # the logged norm is the one before clipping
    assert seen == [pytest.approx(0.01, rel=1e-3)]


def test_bf16_autocast_on_cpu_keeps_fp32_weights(tmp_path):
    run = make_run(tmp_path, precision="bf16")
    dtypes = []
    proj = run.model.visual.transformer.resblocks[0].attn.in_proj
    proj.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    metrics = train_step(run, *first_batch(run), autocast_factory(run.cfg, run.info.device))
    assert dtypes == [torch.bfloat16]
    assert math.isfinite(metrics["loss"]) and abs(metrics["loss"] - math.log(8)) < 1.0
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(tmp_path, monkeypatch):
    import clipforge.model.layers as layers

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    grads = []
    for enabled in (False, True):
        run = make_run(tmp_path, grad_checkpointing=enabled, seed=5)
        assert run.model.visual.transformer.grad_checkpointing is enabled
        assert run.model.text.transformer.grad_checkpointing is enabled
        images, tokens = first_batch(run)
        run.model.train()
        run.optimizer.zero_grad()
        run.task.forward_backward([(images, tokens)])
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters()})
    assert calls, "checkpointing was enabled but no block went through torch.utils.checkpoint"
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=0, msg=name)


def test_locked_text_tower_keeps_its_last_groups_trainable(tmp_path):
    run = make_run(tmp_path)
    model = run.model
    lock_towers(model, lock_text=True, text_unlocked_layers=2)
    last = len(model.text.transformer.resblocks) - 1
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith((f"transformer.resblocks.{last}.", "ln_final.", "text_projection")) for n in trainable
    ), sorted(trainable)
    assert "text_projection" in trainable and f"transformer.resblocks.{last}.attn.in_proj.weight" in trainable
    assert all(p.requires_grad for p in model.visual.parameters())


def test_compile_option_trains_through_the_compiled_module(tmp_path, monkeypatch):
    """``compile: true`` wraps the model with torch.compile (the eager backend here: inductor's C++
    build takes a minute on this machine); checkpoints keep the plain parameter names."""
    wrapped = []
    real = torch.compile

    def compile_eager(model, **kw):
        wrapped.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_eager)
    run = make_run(tmp_path, compile=True)
    assert wrapped and hasattr(run.task.model, "_orig_mod")
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    metrics = train_step(run, *first_batch(run), contextlib.nullcontext)
    assert math.isfinite(metrics["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in run.model.named_parameters())
    assert not any(k.startswith("_orig_mod") for k in run.model.state_dict())


@pytest.mark.slow
def test_periodic_eval_tensorboard_and_checkpoint_schedule(tmp_path):
    """2 epochs of 4 steps: eval after each epoch (not repeated at the end), TensorBoard events,
    checkpoints at step 3 and 6 (every 3) and epoch 1 (step 4), pruned to the last 2."""
    result = train(
        config(
            tmp_path,
            data="synthetic:shapes?n=32&image_size=32",
            val_data="synthetic:shapes?n=16&image_size=32&split=val",
            epochs=2,
            eval_every_epochs=1,
            tensorboard=True,
            save_every_steps=3,
            keep_last=2,
            log_every=1,
        )
    )
    assert (result.steps, result.epochs) == (8, 2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1), (8, 2)]
    assert 0.0 <= evals[-1]["image_retrieval_recall@1"] <= 1.0
    assert result.eval_metrics["image_retrieval_recall@1"] == evals[-1]["image_retrieval_recall@1"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000006.pt",
        "step_00000008.pt",
    ]


def test_max_steps_overrides_epochs(tmp_path):
    """16 samples / batch 8 = 2 steps per epoch; max_steps=3 runs into a second epoch."""
    result = train(config(tmp_path, epochs=1, max_steps=3, save_every_epochs=0))
    assert (result.steps, result.epochs) == (3, 1)
