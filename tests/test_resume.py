"""Exact resume: a run killed mid-epoch and resumed with ``--resume latest`` ends bit-identical.

The reference run trains in-process; the interrupted run is a real ``clipforge train``
subprocess killed with SIGKILL (or stopped with SIGTERM) after a checkpoint, then resumed in a
second subprocess. Patch dropout and random-crop augmentation are on, so the test also proves
that every RNG (model and data) is restored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train

pytestmark = pytest.mark.slow

BASE = dict(
    data="synthetic:shapes?n=64&image_size=32",
    model="tiny-vit",
    batch_size=8,
    epochs=2,
    lr=2e-3,
    warmup_steps=2,
    patch_dropout=0.25,
    save_every_steps=3,
    keep_last=2,
    seed=3,
    threads=1,
    log_every=1,
    progress=False,
)


def cli_args(cfg: dict, out: Path) -> list[str]:
    args = [sys.executable, "-m", "clipforge", "train", "--output-dir", str(out)]
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(
                f"training exited ({proc.returncode}) before {path.name} appeared:\n{out[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    try:
        result = train(TrainConfig(output_dir=str(out), **BASE))
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 16 and not result.interrupted
    return out


def test_sigterm_then_sigkill_then_resume_latest_is_exact(reference, tmp_path):
    """SIGTERM: checkpoint + exit 0. Resume via the CLI, SIGKILL it mid-epoch, resume again: the
    final weights equal the uninterrupted run's, bit for bit."""
    from clipforge.train.state import list_checkpoints, load_checkpoint_state

    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli_args(BASE, out), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(out / "checkpoints" / "step_00000003.pt", proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped cleanly at step" in output
    assert not (out / "final").exists()
    termed_at = load_checkpoint_state(list_checkpoints(out / "checkpoints")[-1])["train_state"]["step"]
    assert 3 <= termed_at < 16

    next_ckpt = out / "checkpoints" / f"step_{(termed_at // 3 + 1) * 3:08d}.pt"
    proc = subprocess.Popen(
        cli_args({**BASE, "resume": "latest"}, out),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(next_ckpt, proc)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "resumed from" in output
    assert not (out / "final").exists(), "the run finished before it could be killed"

    threads = torch.get_num_threads()
    try:
        result = train(TrainConfig(output_dir=str(out), resume="latest", **BASE))
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 16
    assert_identical(final_weights(out), final_weights(reference))
    # the metrics log reads as one run: every step once, in order
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 17))


class _Crash(Exception):
    pass


def _train_until_crash(cfg: TrainConfig, crash_at: int, monkeypatch) -> None:
    """Simulate a hard crash after ``crash_at`` steps: nothing after the last checkpoint survives."""
    import clipforge.train.trainer as trainer

    real_step = trainer.train_step

    def step(run, *a, **kw):
        if run.state.step == crash_at:
            raise _Crash
        return real_step(run, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", step)
        with pytest.raises(_Crash):
            train(cfg)


def test_resume_mid_epoch_on_shards_is_exact(tmp_path, monkeypatch):
    from clipforge.data.shards import write_shards
    from clipforge.data.synthetic import SyntheticShapes

    write_shards(SyntheticShapes(48, image_size=32, seed=4), tmp_path / "shards", max_count=10)
    cfg = dict(BASE, data=str(tmp_path / "shards"), epochs=2, save_every_steps=2, patch_dropout=0.0)
    threads = torch.get_num_threads()
    try:
        ref = train(TrainConfig(output_dir=str(tmp_path / "ref"), **cfg))
        assert ref.steps == 12
        _train_until_crash(
            TrainConfig(output_dir=str(tmp_path / "run"), **cfg), crash_at=5, monkeypatch=monkeypatch
        )
        resumed = train(TrainConfig(output_dir=str(tmp_path / "run"), resume="latest", **cfg))
    finally:
        torch.set_num_threads(threads)
    assert resumed.steps == 12
    assert_identical(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))
