"""Training faults (issue 7): NaN/Inf steps, disk full, SIGKILL while writing a checkpoint, a data
worker crashing, and a table with broken images. Nothing may be lost and every case says what
happened. (SIGTERM and SIGKILL mid-epoch with exact resume live in tests/test_resume.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_run

import clipforge.train.state as state
from clipforge.errors import CheckpointError
from clipforge.train.config import TrainConfig
from clipforge.train.task import ContrastiveTask
from clipforge.train.trainer import TrainingDivergedError, train

TINY = tiny_run(48, batch_size=8, epochs=1, lr=1e-3, seed=0)


#: every test here trains with threads=1: the thread count is restored after each
pytestmark = pytest.mark.usefixtures("keep_threads")


def poison_loss(
    monkeypatch, bad_calls: set[int] | None = None, from_call: int | None = None, kind: str = "nan"
):
    """Make the task's loss non-finite (or its gradients infinite) on chosen optimiser steps."""
    real = ContrastiveTask.loss
    calls = {"n": 0}

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def loss(self, f):
        calls["n"] += 1
        value = real(self, f)
        bad = (bad_calls and calls["n"] in bad_calls) or (from_call is not None and calls["n"] >= from_call)
        if not bad:
            return value
        return InfGrad.apply(value) if kind == "inf_grad" else value * float("nan")

    monkeypatch.setattr(ContrastiveTask, "loss", loss)


def all_finite(path: Path) -> bool:
    model = state.load_checkpoint_state(path)["model"]
    return all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


# --- NaN / Inf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nan", "inf_grad"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch, kind):
    poison_loss(monkeypatch, bad_calls={2, 4}, kind=kind)
    result = train(TrainConfig.from_flat(output_dir=str(tmp_path), max_bad_steps=2, **TINY))
    assert result.steps == 6 and result.skipped_steps == 2
    assert len(result.loss_history) == 4  # only good steps recorded
    assert all_finite(Path(result.last_checkpoint))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [2, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] == 2


def test_consecutive_non_finite_steps_abort_and_keep_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from clipforge.cli import main

    poison_loss(monkeypatch, from_call=4)
    cfg = TrainConfig.from_flat(output_dir=str(tmp_path), max_bad_steps=2, save_every_steps=2, **TINY)
    with pytest.raises(TrainingDivergedError) as err:
        train(cfg)
    message = str(err.value)
    assert "2 consecutive steps had NaN/Inf" in message and "step_00000002.pt" in message
    good = state.list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in good] == ["step_00000002.pt"]
    assert all_finite(good[0])
    assert not (tmp_path / "final").exists()
    # Through the CLI: exit code 2 and the message on stderr.
    code = main(
        [
            "train",
            "--output-dir",
            str(tmp_path / "cli"),
            "--max-bad-steps",
            "2",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"],
            "--no-progress",
        ]
    )
    assert code == 2
    assert "consecutive steps had NaN/Inf" in capsys.readouterr().err


# --- disk full ------------------------------------------------------------------------------------
def _enospc_after_some_bytes(payload, fh):
    fh.write(b"PK\x03\x04 partial checkpoint bytes")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = state.save_checkpoint({"model": {"w": torch.ones(3)}}, tmp_path, step=1)
    monkeypatch.setattr(state, "_dump", _enospc_after_some_bytes)
    with pytest.raises(CheckpointError, match="disk full") as err:
        state.save_checkpoint({"model": {"w": torch.zeros(3)}}, tmp_path, step=2)
    assert str(first) in str(err.value)
    assert state.list_checkpoints(tmp_path) == [first]
    assert not list(tmp_path.glob("*.tmp")), "the partial temp file must be removed"
    assert torch.equal(state.load_checkpoint_state(first)["model"]["w"], torch.ones(3))


def test_training_survives_disk_full_and_keeps_last_checkpoint(tmp_path, monkeypatch, caplog):
    real = state._dump
    saves = {"n": 0}

    def dump(payload, fh):
        saves["n"] += 1
        if saves["n"] >= 2:
            _enospc_after_some_bytes(payload, fh)
        real(payload, fh)

    monkeypatch.setattr(state, "_dump", dump)
    result = train(TrainConfig.from_flat(output_dir=str(tmp_path), save_every_steps=2, **TINY))
    assert result.steps == 6 and result.last_checkpoint is None
    assert [p.name for p in state.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    assert state.resolve_resume("latest", tmp_path / "checkpoints").name == "step_00000002.pt"
    assert all_finite(tmp_path / "checkpoints" / "step_00000002.pt")
    assert "disk full" in caplog.text
    assert (tmp_path / "final" / "model.safetensors").exists()


# --- SIGKILL while writing ------------------------------------------------------------------------
def test_sigkill_during_checkpoint_write_keeps_previous_loadable(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time, torch
        import clipforge.train.state as state
        state.save_checkpoint({{"model": {{"w": torch.ones(3)}}}}, {str(tmp_path)!r}, step=1)
        def slow(payload, fh):
            fh.write(b"PK\\x03\\x04 half a checkpoint")
            fh.flush()
            print("WRITING", flush=True)
            time.sleep(120)
        state._dump = slow
        state.save_checkpoint({{"model": {{"w": torch.zeros(3)}}}}, {str(tmp_path)!r}, step=2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".step_00000002.pt.*.tmp"))) == 1  # the torn write, under a temp name
    latest = state.resolve_resume("latest", tmp_path)
    assert latest.name == "step_00000001.pt"
    assert torch.equal(state.load_checkpoint_state(latest)["model"]["w"], torch.ones(3))
    state.save_checkpoint({"model": {"w": torch.full((3,), 3.0)}}, tmp_path, step=3)
    assert not list(tmp_path.glob("*.tmp")), "stale temp files from killed writers are cleaned up"


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = state.save_checkpoint({"model": {"w": torch.ones(1000)}}, tmp_path, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read training checkpoint"):
        state.load_checkpoint_state(path)


# --- data worker crash ----------------------------------------------------------------------------
class CrashOnce(torch.utils.data.Dataset):
    """Kills its worker process the first time item 5 is read (a marker file remembers)."""

    def __init__(self, marker: Path, crash: bool = True) -> None:
        from torchvision.transforms.functional import pil_to_tensor

        from clipforge.data.synthetic import SyntheticShapes

        self.base = SyntheticShapes(32, image_size=16)
        self.to_tensor = pil_to_tensor
        self.marker = marker
        self.crash = crash

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if (
            self.crash
            and i == 5
            and torch.utils.data.get_worker_info() is not None
            and not self.marker.exists()
        ):
            self.marker.touch()
            os._exit(1)
        image, _ = self.base[i]
        noise = torch.rand(3)  # random augmentation: must be identical after the restart
        return self.to_tensor(image).float() + noise[:, None, None], torch.tensor([i])


def test_data_worker_crash_restarts_at_the_same_position(tmp_path):
    from clipforge.data.loader import ResumableLoader

    def epoch(crash: bool):
        loader = ResumableLoader(CrashOnce(tmp_path / "marker", crash), batch_size=4, seed=1, num_workers=1)
        out = [torch.cat([i.flatten(), t.flatten().float()]) for i, t in loader]
        return out, loader

    clean, _ = epoch(crash=False)
    crashed, loader = epoch(crash=True)
    assert loader.worker_restarts == 1
    assert len(crashed) == len(clean) == 8
    for a, b in zip(crashed, clean):
        assert torch.equal(a, b)


# --- broken images in a table -----------------------------------------------------------------------
def test_csv_with_5_percent_broken_images_trains_to_the_end(tmp_path, capsys):
    from clipforge.cli import main
    from clipforge.data.synthetic import write_synthetic

    table = write_synthetic(tmp_path / "data", 64, image_size=32)
    images = sorted((tmp_path / "data" / "images").glob("*.png"))
    images[3].write_bytes(b"")  # zero-byte
    images[17].unlink()  # missing
    images[42].write_bytes(images[42].read_bytes()[:60])  # truncated
    images[50].write_text("not an image at all")  # 4 of 64 = 6%
    code = main(
        [
            "train",
            "--data",
            str(table),
            "--model",
            "tiny-vit",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--threads",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = summary["skipped_samples"]
    assert sum(skipped.values()) == 4, skipped  # every row is read once in an epoch of 64 / 8
    assert summary["steps"] == 8
    assert f"skipped {sum(skipped.values())} bad sample(s)" in out
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
