"""Run configs written before the objective registry keep working with ``--config`` and ``--resume``.

Until 3f1f61e the loss options were plain fields (``chunk_size: 1024``, ``local_loss: false``,
``gather_with_grad: true``) that every saved ``run_config.yaml`` carried, whatever its loss; now
each loss declares its options and an option it lacks is an error. ``OLD_RUN_CONFIG`` is what
``TrainConfig.save`` wrote then (``yaml.safe_dump(asdict(cfg), sort_keys=False)`` of 3f1f61e's
defaults, every key in its order), with the run's own values filled in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from clipforge.errors import ConfigError
from clipforge.train.config import TrainConfig

OLD_RUN_CONFIG = """\
data: {data}
val_data: null
model: tiny-vit
pretrained: null
output_dir: {output_dir}
epochs: 1
max_steps: {max_steps}
steps_per_epoch: null
batch_size: 4
accum_steps: 1
workers: 0
lr: 0.001
weight_decay: 0.2
beta1: 0.9
beta2: 0.98
eps: 1.0e-06
schedule: cosine
warmup_steps: 0
cooldown_steps: 0
cooldown_power: 1.0
min_lr: 0.0
grad_clip_norm: null
precision: fp32
loss: {loss}
chunk_size: {chunk_size}
local_loss: {local_loss}
gather_with_grad: true
max_logit_scale: 100.0
ema_decay: null
lock_image: false
lock_image_unlocked_groups: 0
lock_image_freeze_bn_stats: false
lock_text: false
lock_text_unlocked_layers: 0
lora_rank: 0
lora_alpha: 16.0
lora_dropout: 0.0
lora_targets:
- in_proj
- out_proj
- c_fc
- c_proj
patch_dropout: null
image_alpha: null
grad_checkpointing: false
compile: false
device: cpu
distributed: auto
threads: 1
seed: 0
deterministic: false
max_bad_steps: 5
save_every_steps: 1
save_every_epochs: 1
keep_last: 3
resume: null
log_every: 10
progress: false
tensorboard: false
eval_every_epochs: 0
zeroshot_templates: simple
caption_key: null
image_key: null
csv_separator: null
data_root: null
confine_paths: false
"""

DATA = "synthetic:shapes?n=16&image_size=32"


def old_run_config(
    path: Path, loss: str = "clip", chunk_size: int = 1024, local_loss: bool = False, **kw
) -> Path:
    """An old-style ``run_config.yaml``; ``kw`` fills ``data``, ``output_dir``, ``max_steps``."""
    values = {"data": DATA, "output_dir": str(path.parent / "out"), "max_steps": 2, **kw}
    text = OLD_RUN_CONFIG.format(
        loss=loss, chunk_size=chunk_size, local_loss=str(local_loss).lower(), **values
    )
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "loss, options",
    [
        ("clip", {"local_loss": False, "gather_with_grad": True}),
        ("siglip", {"gather_with_grad": True}),
        ("chunked", {"chunk_size": 1024, "local_loss": False, "gather_with_grad": True}),
    ],
)
def test_old_run_config_reads_for_each_old_loss(tmp_path, caplog, loss, options) -> None:
    """The old defaults of options the loss lacks are 'not given' (debug log); the rest are kept."""
    with caplog.at_level(logging.DEBUG, logger="clipforge.train.config"):
        cfg = TrainConfig.load(old_run_config(tmp_path / "run_config.yaml", loss))
    assert cfg.objective.loss == loss and cfg.loss_options() == options
    dropped = sorted(
        r.getMessage().split("=")[0] for r in caplog.records if "read as not given" in r.getMessage()
    )
    assert dropped == sorted({"chunk_size", "local_loss", "gather_with_grad"} - set(options))
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "read as not given" in r.getMessage())


@pytest.mark.parametrize(
    "loss, chunk_size, local_loss, needle",
    [
        ("clip", 256, False, r"run_config.yaml: --chunk-size is not an option of --loss clip"),
        ("siglip", 1024, True, r"run_config.yaml: --local-loss is not an option of --loss siglip"),
    ],
)
def test_old_run_config_with_a_changed_value_is_still_an_error(
    tmp_path, loss, chunk_size, local_loss, needle
):
    """A value other than the old default was asked for: dropping it silently is what issue 16 forbids."""
    path = old_run_config(tmp_path / "run_config.yaml", loss, chunk_size=chunk_size, local_loss=local_loss)
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.load(path)


def test_old_defaults_as_flags_and_python_are_not_given() -> None:
    """The same rule for flags and the Python API (both build a TrainConfig)."""
    from test_objectives_train import parse

    assert parse(["--loss", "siglip", "--chunk-size", "1024", "--no-local-loss"]).loss_options() == {}
    assert TrainConfig.from_flat(loss="clip", chunk_size=1024).objective.chunk_size is None
    assert TrainConfig.from_flat(loss="chunked", chunk_size=1024).loss_options() == {"chunk_size": 1024}
    with pytest.raises(ConfigError, match="--chunk-size is not an option of --loss clip"):
        parse(["--loss", "clip", "--chunk-size", "512"])


@pytest.mark.parametrize(
    "loss, kept",
    [
        ("clip", {"local_loss", "gather_with_grad"}),
        ("siglip", {"siglip_exchange", "gather_with_grad"}),
        ("multipos", {"positives", "chunk_size", "local_loss", "gather_with_grad"}),
    ],
)
def test_new_run_config_saves_only_the_chosen_loss_options(tmp_path, loss, kept) -> None:
    from clipforge.objectives.registry import LOSS_OPTIONS

    cfg = TrainConfig.from_flat(data=DATA, loss=loss).validate()
    saved = yaml.safe_load(cfg.save(tmp_path / "run_config.yaml").read_text())
    assert {k for k in saved if k in LOSS_OPTIONS} == kept and all(saved[k] is None for k in kept)
    assert TrainConfig.load(tmp_path / "run_config.yaml") == cfg
    switched = TrainConfig.load(tmp_path / "run_config.yaml", loss="triplet")  # no stale options left
    assert switched.objective.loss == "triplet"


@pytest.mark.slow
def test_old_run_config_trains_and_resumes_through_the_cli(tmp_path, capsys, caplog) -> None:
    """``clipforge train --config old.yaml`` trains and writes a new-style run config; a checkpoint
    whose stored config is the old one resumes with ``--config old.yaml --resume latest``."""
    from clipforge.cli import main
    from clipforge.train.state import list_checkpoints, load_checkpoint_state

    old = old_run_config(tmp_path / "old_run_config.yaml", "clip")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(old)]) == 0
        out = tmp_path / "out"
        written = yaml.safe_load((out / "run_config.yaml").read_text())
        assert "chunk_size" not in written  # clip's options only, as the file gave them
        assert (written["local_loss"], written["gather_with_grad"]) == (False, True)
        last = list_checkpoints(out / "checkpoints")[-1]
        state = load_checkpoint_state(last)
        state["config"] = yaml.safe_load(old.read_text())  # as the old trainer stored it
        torch.save(state, last)
        capsys.readouterr()
        with caplog.at_level(logging.INFO, logger="clipforge.train.checkpointing"):
            assert main(["train", "--config", str(old), "--resume", "latest", "--max-steps", "4"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "model saved to" in capsys.readouterr().out
    assert f"resumed from {last} at step 2" in caplog.text
    assert "resuming with changed ['max_steps']" in caplog.text  # only what the command line changed
    assert load_checkpoint_state(list_checkpoints(out / "checkpoints")[-1])["train_state"]["step"] == 4
