"""The new objectives end to end under the real launcher: ``python -m torch.distributed.run
--nproc-per-node 2 -m clipforge train`` on CPU/gloo, as a user runs them.

- ``--loss multipos --captions-per-image 2`` on a table whose rows have two captions: the sampler
  keeps each image's two captions together on one rank;
- ``--loss siglip --siglip-exchange neighbour``: text chunks passed around the ring of ranks.

Each run's epoch has half the steps one process would take, which holds only if both ranks
joined one group and split the data, and each ends with a final model that loads.

The rendezvous is ``torchrun --standalone``'s (a c10d store in the launcher, one node), with its
port picked by ``tests/ports.py`` instead of ``localhost:0``: ``--standalone`` always binds an
ephemeral port, which a parallel test's gloo ranks can be handed first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from ports import free_port

pytestmark = pytest.mark.slow

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "bar", "dot", "frame")
N_IMAGES, BATCH = 16, 4  # per rank


def draw(colour: tuple[int, int, int], shape: str) -> Image.Image:
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    box = {"square": (6, 6, 26, 26), "bar": (2, 12, 30, 20), "dot": (12, 12, 20, 20), "frame": (0, 0, 32, 32)}
    image.paste(colour, box[shape])
    if shape == "frame":
        image.paste((255, 255, 255), (5, 5, 27, 27))
    return image


def two_caption_table(folder: Path) -> Path:
    """16 images (4 colours x 4 shapes), each with two captions in a JSON list cell."""
    rows = []
    for name, rgb in COLOURS.items():
        for shape in SHAPES:
            path = folder / f"{name}-{shape}.png"
            draw(rgb, shape).save(path)
            rows.append({"image": path.name, "caption": [f"a {name} {shape}", f"{shape} in {name}"]})
    table = folder / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table


def launch(out: Path, data: Path, *train_args: str) -> subprocess.Popen:
    """``torchrun``, two ranks, one node, c10d rendezvous on a port below the ephemeral range."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", out.name,
           "-m", "clipforge", "train", "--data", str(data), "--batch-size", str(BATCH), "--epochs", "1",
           "--threads", "1", "--no-progress", "--log-every", "1", "--save-every-epochs", "0",
           "--device", "cpu", "--output-dir", str(out), *train_args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def check_run(proc: subprocess.Popen, out: Path, steps: int) -> list[float]:
    """The run ended well after ``steps`` optimiser steps, logged by rank 0 only; returns its losses."""
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["epochs"], summary["interrupted"]) == (steps, 1, False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # one line per step: rank 0 alone
    losses = [r["loss"] for r in train]
    assert all(math.isfinite(x) for x in losses)
    return losses


def test_torchrun_multipos_and_siglip_neighbour(tmp_path):
    from clipforge.factory import create_model

    data = two_caption_table(tmp_path)
    multipos = launch(tmp_path / "multipos", data, "--model", "tiny-vit", "--loss", "multipos",
                      "--captions-per-image", "2")  # fmt: skip
    siglip = launch(tmp_path / "siglip", data, "--model", "tiny-vit-siglip", "--loss", "siglip",
                    "--siglip-exchange", "neighbour")  # fmt: skip
    # One process would take 16 images x 2 captions / 4 = 8 steps (multipos) and 16 / 4 = 4 (siglip).
    check_run(multipos, tmp_path / "multipos", steps=N_IMAGES * 2 // (2 * BATCH))
    check_run(siglip, tmp_path / "siglip", steps=N_IMAGES // (2 * BATCH))

    configs = {}
    for run, has_bias in (("multipos", False), ("siglip", True)):
        model = create_model(pretrained=str(tmp_path / run / "final"))
        assert (getattr(model, "logit_bias", None) is not None) == has_bias, run
        configs[run] = yaml.safe_load((tmp_path / run / "run_config.yaml").read_text())
        assert configs[run]["loss"] == run
    assert "siglip_exchange" not in configs["multipos"]  # each run config has its loss's options only
    assert configs["siglip"]["siglip_exchange"] == "neighbour"
    assert configs["multipos"]["captions_per_image"] == 2
