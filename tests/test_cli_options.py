"""``--model``/``--pretrained``/``--device`` defined once for every command, one ``resolve_device``,
and the library never reaching up into the CLI."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.cli import build_parser
from clipforge.commands._model_options import DEVICE_HELP, PRETRAINED_HELP
from clipforge.device import resolve_device
from clipforge.errors import ConfigError

SRC = Path(clipforge.__file__).parent


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_every_device_flag_defaults_to_auto():
    with_device = {}
    for name, parser in _subcommands().items():
        action = _option(parser, "--device")
        if action is not None:
            with_device[name] = action.default
    assert {"bench", "caption", "embed", "eval", "search", "serve", "train"} <= set(with_device)
    # train's flags default to "not given" so a --config file can set them; its config says auto
    assert with_device.pop("train") == argparse.SUPPRESS
    assert set(with_device.values()) == {"auto"}, with_device
    for name in ("bench", "caption", "embed", "eval", "search", "serve"):
        assert _option(_subcommands()[name], "--device").help.startswith(DEVICE_HELP)
    # the spellings users type keep working
    args = build_parser().parse_args(["search", "IDX", "a dog", "--device", "cpu"])
    assert args.device == "cpu"


def test_pretrained_flag_has_one_help():
    commands = _subcommands()
    for name in ("bench", "cache", "caption", "embed", "eval", "export"):
        action = _option(commands[name], "--pretrained")
        assert action.default is None and action.help.startswith(PRETRAINED_HELP), name
    assert "preprocessing convention" in _option(commands["cache"], "--pretrained").help
    # `models --pretrained` is a different thing (a listing switch) and stays one
    assert _option(commands["models"], "--pretrained").const is True


def test_resolve_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None, local_rank=3) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device 'banana'"):
        resolve_device("banana")


def test_resolve_device_with_gpus_and_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda:0", local_rank=2) == torch.device("cuda", 0)  # an explicit index wins
    assert resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_one_resolve_device_for_bench_and_training():
    from clipforge import bench
    from clipforge.train import distributed

    assert bench.resolve_device is resolve_device and distributed.resolve_device is resolve_device


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_never_imports_the_cli():
    offenders = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("commands/") or rel in ("cli.py", "__main__.py"):
            continue
        bad = sorted(
            n
            for n in _imports(path)
            if n.startswith(("clipforge.commands", "clipforge.cli")) or n == "clipforge.cli"
        )
        if bad:
            offenders[rel] = bad
    assert offenders == {}


def test_column_renderer_aligns_strips_and_rules():
    from clipforge.text_table import format_columns

    text = format_columns(("name", "n", "note"), [("a", "1", ""), ("bbb", "22", "x")], right=(1,), rule=True)
    assert text.splitlines() == ["name   n  note", "----  --  ----", "a      1", "bbb   22  x"]
    assert format_columns(("a", "b"), []) == "a  b"


def test_models_table_is_a_library_function():
    from clipforge.model_table import format_models, models_table

    rows = models_table("tiny-vit")
    assert [r["name"] for r in rows][:1] == ["tiny-vit"] and rows[0]["embed_dim"] > 0
    header, first = format_models(rows).splitlines()[:2]
    assert header.split()[:3] == ["model", "image", "params"] and first.split()[0] == "tiny-vit"
