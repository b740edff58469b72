"""TrainConfig in sections, and the pieces of a run that no longer take the whole run.

- the nested frozen sections read flat and nested files alike and write the flat form unchanged;
- ``build_loss`` rejects an option its loss does not take (no silent signature filter), while the
  CLI's defaults never trip it;
- checkpointing saves and restores any mapping of stateful objects, RNG last;
- the logger meters throughput per logged window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import yaml

from clipforge.errors import CheckpointError, ConfigError
from clipforge.objectives.registry import LOSS_NAMES
from clipforge.train import checkpointing
from clipforge.train.config import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    add_arguments,
    config_from_args,
    flatten,
    nest,
)
from clipforge.train.distributed import DistInfo
from clipforge.train.logger import RunLogger
from clipforge.train.task import build_loss


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# --- sections -----------------------------------------------------------------------------------
def test_flat_keys_land_in_their_sections() -> None:
    cfg = TrainConfig.from_flat(data="x.csv", val_data="v.csv", lr=0.01, loss="siglip", keep_last=2, seed=7)
    assert (cfg.data.train, cfg.data.val, cfg.optim.lr) == ("x.csv", "v.csv", 0.01)
    assert (cfg.objective.loss, cfg.checkpoints.keep_last, cfg.runtime.seed) == ("siglip", 2, 7)
    assert cfg.flat()["data"] == "x.csv" and cfg.flat()["lr"] == 0.01
    assert cfg == TrainConfig(
        data=DataConfig(train="x.csv", val="v.csv"),
        optim=OptimConfig(lr=0.01),
        objective=dataclasses.replace(TrainConfig().objective, loss="siglip"),
        checkpoints=dataclasses.replace(TrainConfig().checkpoints, keep_last=2),
        runtime=dataclasses.replace(TrainConfig().runtime, seed=7),
    )


def test_a_built_config_is_frozen_and_replace_derives_a_new_one() -> None:
    cfg = TrainConfig.from_flat(data="x.csv")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = "tiny-vit"  # type: ignore[misc]
    changed = cfg.replace(lr=0.25, max_steps=3)
    assert (changed.optim.lr, changed.optim.max_steps, cfg.optim.lr) == (0.25, 3, 5e-4)
    with pytest.raises(ConfigError, match="key 'lr' must be > 0"):
        cfg.replace(lr=-1.0)


def test_a_flat_value_in_a_section_slot_says_what_to_use() -> None:
    with pytest.raises(TypeError, match=r"TrainConfig\(data=...\) takes a DataConfig.*from_flat"):
        TrainConfig(data="x.csv")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown key 'batchsize' \\(did you mean 'batch_size'\\?\\)"):
        TrainConfig.from_flat(batchsize=3)


def test_the_flat_file_form_is_unchanged() -> None:
    """Saved run configs and checkpoints keep the flat keys in the order they always had."""
    saved = TrainConfig.from_flat(data="x.csv").to_dict()
    assert list(saved)[:10] == [
        "data", "val_data", "model", "pretrained", "output_dir",
        "epochs", "max_steps", "steps_per_epoch", "batch_size", "accum_steps",
    ]  # fmt: skip
    assert list(saved)[-5:] == ["caption_key", "image_key", "csv_separator", "data_root", "confine_paths"]
    assert len(saved) == 85 - 8  # clip takes 2 of the 10 loss options (85: weight_decay_groups, naflex added)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_nested_and_flat_files_read_the_same(tmp_path, suffix) -> None:
    cfg = TrainConfig.from_flat(data="x.csv", lr=0.002, loss="chunked", chunk_size=64, lock_text=True)
    nested = cfg.save(tmp_path / f"nested{suffix}", nested=True)
    flat = cfg.save(tmp_path / f"flat{suffix}")
    text = nested.read_text()
    document = yaml.safe_load(text) if suffix == ".yaml" else json.loads(text)
    assert document["data"]["train"] == "x.csv" and document["optim"]["lr"] == 0.002
    assert document["objective"]["chunk_size"] == 64 and document["surgery"]["lock_text"] is True
    assert TrainConfig.load(nested) == TrainConfig.load(flat) == cfg
    assert TrainConfig.load(nested, lr=0.5).optim.lr == 0.5  # flat overrides (flags) win


def test_a_mixed_file_and_its_errors_name_the_key_and_the_file(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data: x.csv\noptim:\n  lr: 0.01\n  warmup-steps: 3\nseed: 4\n")
    cfg = TrainConfig.load(path)
    assert (cfg.data.train, cfg.optim.lr, cfg.optim.warmup_steps, cfg.runtime.seed) == ("x.csv", 0.01, 3, 4)
    cases = {
        "optim:\n  batch_size: 8\n": r"run.yaml: unknown key 'optim.batch_size' \(it belongs in 'data'\)",
        "optim:\n  lrr: 0.1\n": r"run.yaml: unknown key 'optim.lrr' \(did you mean 'lr'\?\)",
        "lr: 0.1\noptim:\n  lr: 0.2\n": r"run.yaml: key 'lr' is given twice",
        "optim: 3\n": r"run.yaml: section 'optim' must be a mapping",
        "data:\n  train: x.csv\n  lr: 1\n": r"run.yaml: unknown key 'data.lr' \(it belongs in 'optim'\)",
        "optim:\n  lr: fast\n": r"run.yaml: key 'lr' expects a number",
    }
    for content, needle in cases.items():
        path.write_text(content)
        with pytest.raises(ConfigError, match=needle):
            TrainConfig.load(path)


def test_nest_and_flatten_are_inverse() -> None:
    flat = TrainConfig.from_flat(data="x.csv", ema_decay=0.9).to_dict()
    assert flatten(nest(flat)) == flat
    assert nest(flat)["optim"]["ema_decay"] == 0.9 and nest(flat)["data"]["train"] == "x.csv"


# --- build_loss ---------------------------------------------------------------------------------
def test_build_loss_rejects_an_option_its_loss_does_not_take() -> None:
    """Reverting to an ``inspect.signature`` filter would drop ``local_loss`` silently: this fails then."""
    with pytest.raises(ConfigError, match=r"--local-loss is not an option of --loss siglip"):
        build_loss("siglip", {"local_loss": True})
    with pytest.raises(ConfigError, match=r"--margin is not an option of --loss clip.*'triplet'"):
        build_loss("clip", {"margin": 0.3})
    assert build_loss("triplet", {"margin": 0.3}).margin == pytest.approx(0.3)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_cli_defaults_never_trip_the_loss_options_check(loss) -> None:
    """Only options the user gave reach the loss: a bare ``--loss NAME`` builds with its defaults."""
    cfg = parse(["--loss", loss])
    assert cfg.loss_options() == {}
    assert build_loss(loss, cfg.loss_options()) is not None


# --- checkpointing over a mapping ---------------------------------------------------------------
class Box:
    """A stateful object that records the order it was restored in."""

    order: list[str] = []

    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        Box.order.append(self.name)
        self.value = state["value"]


def test_checkpointing_saves_and_restores_any_mapping_of_stateful_objects(tmp_path) -> None:
    states = {"model": Box("model", 1), "rng": Box("rng", 2), "data": Box("data", 3), "ema": None}
    path = checkpointing.save_training_checkpoint(
        states, info=DistInfo(), directory=tmp_path, step=4, keep_last=2, config={"lr": 0.1}
    )
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["format_version", "model", "rng", "data", "ema", "config"]
    assert saved["rng"] == [{"value": 2}] and saved["data"] == [{"value": 3}]  # one per rank
    assert (saved["model"], saved["ema"]) == ({"value": 1}, None)
    fresh = {"model": Box("model", 0), "rng": Box("rng", 0), "data": Box("data", 0), "ema": None}
    Box.order = []
    found = checkpointing.resume_training(
        fresh, resume="latest", directory=tmp_path, info=DistInfo(), config={"lr": 0.1}
    )
    assert found == path and [b.value for b in fresh.values() if b] == [1, 2, 3]
    assert Box.order == ["model", "data", "rng"]  # the RNG last: the others may draw numbers
    with pytest.raises(CheckpointError, match="no 'scheduler' entry"):
        checkpointing.resume_training(
            {"scheduler": Box("scheduler", 0)},
            resume=str(path),
            directory=tmp_path,
            info=DistInfo(),
            config={},
        )


# --- throughput in the logger -------------------------------------------------------------------
def test_logger_meters_samples_per_second_between_logged_lines(tmp_path, monkeypatch) -> None:
    clock = iter([100.0, 102.0, 104.0, 108.0])
    monkeypatch.setattr("clipforge.train.logger.time.perf_counter", lambda: next(clock))
    rlog = RunLogger(tmp_path, progress=False, total_steps=3, log_every=2, initial_samples=10)  # t=100
    rlog.step(1, 30, {"loss": 1.0, "lr": 0.1}, epoch=0)  # t=102: not a logged step
    rlog.step(2, 50, {"loss": 0.5, "lr": 0.1}, epoch=0)  # t=104: (50 - 10) / 4 s
    rlog.step(3, 58, {"loss": 0.4, "lr": 0.1}, epoch=0)  # t=108: the last step, (58 - 50) / 4 s
    rlog.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["samples_per_s"]) for r in lines] == [(2, 10.0), (3, 2.0)]


# --- shape of the package -----------------------------------------------------------------------
def test_no_function_in_train_is_over_60_lines() -> None:
    import ast
    from pathlib import Path

    import clipforge.train

    long = []
    for path in sorted(Path(clipforge.train.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert long == []


def test_checkpointing_and_outputs_do_not_take_the_run() -> None:
    """They take what they save or measure; only the trainer knows its ``Run``."""
    import ast
    import inspect

    from clipforge.train import outputs

    for module in (checkpointing, outputs):
        tree = ast.parse(inspect.getsource(module))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        annotations = {
            ast.unparse(a.annotation) for a in ast.walk(tree) if isinstance(a, ast.arg) and a.annotation
        }
        assert "Run" not in imported and "Run" not in annotations
