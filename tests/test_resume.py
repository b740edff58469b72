"""Exact resume: a run killed mid-epoch and resumed with ``--resume latest`` ends bit-identical.

The reference run trains in-process; the interrupted run is ``clipforge train``'s ``main()`` in a
child process stopped with SIGTERM after a checkpoint, resumed in a second child that is killed
with SIGKILL, and finished in-process. The children are forked from a clean forkserver with the
heavy imports already done (``tests/forking.py``), which saves the ~5 s of CPU a fresh
interpreter spends importing torch and torchvision; they are still separate processes that receive real signals and share
nothing with the run but the checkpoint files. Patch dropout and random-crop augmentation are
on, so the test also proves that every RNG (model and data) is restored.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from forking import context
from helpers import threads_kept, tiny_run
from safetensors.torch import load_file

import clipforge.transforms  # noqa: F401 - torchvision: imported once, before forking
from clipforge.cli import main
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train

pytestmark = pytest.mark.slow

BASE = tiny_run(
    64,
    batch_size=8,
    epochs=2,
    lr=2e-3,
    warmup_steps=2,
    patch_dropout=0.25,
    save_every_steps=3,
    keep_last=2,
    seed=3,
)


def cli_args(cfg: dict, out: Path) -> list[str]:
    args = ["train", "--output-dir", str(out)]
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def _cli_child(args: list[str], log: str) -> None:
    """``clipforge <args>`` with stdout, stderr and logging going to ``log``; exits with its code."""
    out = open(log, "w", buffering=1)  # noqa: SIM115 - the process ends with os._exit
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    sys.stdout = sys.stderr = out
    logging.getLogger().handlers.clear()  # pytest's capture handlers: let the CLI configure its own
    code = 1
    try:
        code = main(args)
    finally:
        out.flush()
        os._exit(code)


class CliRun:
    """A forked ``clipforge`` process (see the module doc) with its output in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.proc = context().Process(target=_cli_child, args=(args, str(log)))
        self.proc.start()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait(self, timeout: float) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            raise AssertionError(f"the run did not exit within {timeout}s:\n{self.output()[-3000:]}")
        return self.proc.exitcode


def wait_for(path: Path, run: CliRun, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not run.proc.is_alive():
            raise AssertionError(
                f"training exited ({run.proc.exitcode}) before {path.name} appeared:\n{run.output()[-3000:]}"
            )
        if time.monotonic() > deadline:
            run.proc.kill()
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
    with threads_kept():
        result = train(TrainConfig.from_flat(output_dir=str(out), **BASE))
    assert result.steps == 16 and not result.interrupted
    return out


def test_sigterm_then_sigkill_then_resume_latest_is_exact(reference, tmp_path, keep_threads):
    """SIGTERM: checkpoint + exit 0. Resume via the CLI, SIGKILL it mid-epoch, resume again: the
    final weights equal the uninterrupted run's, bit for bit."""
    from clipforge.train.state import list_checkpoints, load_checkpoint_state

    out = tmp_path / "run"
    run = CliRun(cli_args(BASE, out), tmp_path / "first.log")
    wait_for(out / "checkpoints" / "step_00000003.pt", run)
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.wait(120) == 0, run.output()[-3000:]
    assert "stopped cleanly at step" in run.output()
    assert not (out / "final").exists()
    termed_at = load_checkpoint_state(list_checkpoints(out / "checkpoints")[-1])["train_state"]["step"]
    assert 3 <= termed_at < 16

    next_ckpt = out / "checkpoints" / f"step_{(termed_at // 3 + 1) * 3:08d}.pt"
    run = CliRun(cli_args({**BASE, "resume": "latest"}, out), tmp_path / "second.log")
    wait_for(next_ckpt, run)
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.wait(30) == -signal.SIGKILL
    assert "resumed from" in run.output()
    assert not (out / "final").exists(), "the run finished before it could be killed"

    result = train(TrainConfig.from_flat(output_dir=str(out), resume="latest", **BASE))
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


def test_resume_mid_epoch_on_shards_is_exact(tmp_path, monkeypatch, keep_threads):
    from clipforge.data.shards import write_shards
    from clipforge.data.synthetic import SyntheticShapes

    write_shards(SyntheticShapes(48, image_size=32, seed=4), tmp_path / "shards", max_count=10)
    cfg = dict(BASE, data=str(tmp_path / "shards"), epochs=2, save_every_steps=2, patch_dropout=0.0)
    ref = train(TrainConfig.from_flat(output_dir=str(tmp_path / "ref"), **cfg))
    assert ref.steps == 12
    _train_until_crash(
        TrainConfig.from_flat(output_dir=str(tmp_path / "run"), **cfg),
        crash_at=5,
        monkeypatch=monkeypatch,
    )
    resumed = train(TrainConfig.from_flat(output_dir=str(tmp_path / "run"), resume="latest", **cfg))
    assert resumed.steps == 12
    assert_identical(final_weights(tmp_path / "run"), final_weights(tmp_path / "ref"))
