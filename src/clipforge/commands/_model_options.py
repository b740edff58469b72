"""``--model`` as every command takes it: a registered name, a model-config JSON file, or nothing
when ``--pretrained`` is a checkpoint that describes itself.

One definition, so the flag means the same thing to train, eval, embed, export, bench and
convert. (The leading underscore keeps :mod:`clipforge.cli` from treating this as a command.)
"""

from __future__ import annotations

import argparse

from clipforge.errors import ConfigError

MODEL_HELP = (
    "architecture: a registered name (see 'clipforge models'; '-quickgelu' names too) or a model-config "
    "JSON file (clipforge's config, or open_clip's with embed_dim/vision_cfg/text_cfg). Not needed when "
    "--pretrained is a checkpoint that carries its config (a clipforge folder such as RUN/final, an "
    "open_clip Hub folder, a Hugging Face folder)"
)


def add_model_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """Add ``--model`` with the shared help (``default`` only where a command has always had one)."""
    parser.add_argument("--model", default=default, metavar="NAME|FILE.json", help=MODEL_HELP)


def model_argument(args: argparse.Namespace, fallback: str | None = None) -> str | None:
    """``args.model``, or ``fallback`` when neither ``--model`` nor ``--pretrained`` was given.

    With ``--pretrained`` alone the model is rebuilt from the checkpoint (its stored config, or
    the architecture inferred from its weights), so None is a valid answer then.
    """
    if args.model or getattr(args, "pretrained", None):
        return args.model or None
    if fallback is not None:
        return fallback
    raise ConfigError(
        "give --model (a name or a model-config .json) or --pretrained "
        "(e.g. a trained run's final/ folder, which carries its config)"
    )
