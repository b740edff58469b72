"""The ``clipforge`` command.

Each sub-command lives in ``clipforge.commands.<name>`` and exposes ``add_parser(subparsers)``;
the parser sets ``func`` to a thin wrapper over a public library function. Heavy imports happen
inside those functions so ``clipforge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from clipforge import commands
from clipforge.errors import ClipforgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP models: train, evaluate, search.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"clipforge.commands.{info.name}").add_parser(sub)
    return parser


#: Top-level modules that live in an extra (pyproject.toml), and that extra.
OPTIONAL_MODULES = {
    "matplotlib": "demo",
    "yaml": "train",
    "webdataset": "train",
    "tensorboard": "train",
    "peft": "train",
    "faiss": "search",
    "fastapi": "search",
    "pydantic": "search",  # FastAPI's, for the server's request models
    "uvicorn": "search",
    "multipart": "search",
    "transformers": "hf",
    "timm": "timm",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "open_clip": "dev",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except ClipforgeError as e:
        print(f"clipforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"clipforge {args.command}: error: this needs the optional package {e.name!r}; "
            f"install it with: pip install 'clipforge[{extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
