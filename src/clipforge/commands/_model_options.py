"""``--model``, ``--pretrained`` and ``--device`` as every command takes them.

``--model``: a registered name, a model-config JSON file, or nothing when ``--pretrained`` is a
checkpoint that describes itself. ``--device``: one default for every command, ``auto`` (the GPU
when one is visible, else the CPU), resolved by :func:`clipforge.device.resolve_device`.

One definition each, so a flag means the same thing to eval, embed, export, bench, caption,
cache, search, serve and convert. (The leading underscore keeps :mod:`clipforge.cli` from
treating this as a command.)
"""

from __future__ import annotations

import argparse
from typing import Any

from clipforge.errors import ConfigError

MODEL_HELP = (
    "architecture: a registered name (see 'clipforge models'; '-quickgelu' names too) or a model-config "
    "JSON file (clipforge's config, or open_clip's with embed_dim/vision_cfg/text_cfg). Not needed when "
    "--pretrained is a checkpoint that carries its config (a clipforge folder such as RUN/final, an "
    "open_clip Hub folder, a Hugging Face folder)"
)


PRETRAINED_HELP = (
    "weights: a pretrained tag (see 'clipforge models --pretrained'), hf-hub:org/name, or a checkpoint "
    "file or folder (e.g. a trained run's final/)"
)

DEVICE_HELP = "cpu, cuda, cuda:1, mps ... (auto: the GPU when one is visible, else the CPU)"


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


def add_pretrained_argument(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """Add ``--pretrained`` with the shared help (``note``: what this command uses the weights for)."""
    help_text = f"{PRETRAINED_HELP}; {note}" if note else PRETRAINED_HELP
    parser.add_argument("--pretrained", default=None, metavar="WEIGHTS", help=help_text)


def add_device_argument(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """Add ``--device`` (default ``auto`` for every command; ``note``: a command's own detail)."""
    help_text = f"{DEVICE_HELP}; {note}" if note else DEVICE_HELP
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=help_text)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    *,
    device: bool = False,
    pretrained_note: str | None = None,
    device_note: str | None = None,
) -> None:
    """``--model`` and ``--pretrained`` (and ``--device`` for a command that runs the model)."""
    add_model_argument(parser)
    add_pretrained_argument(parser, pretrained_note)
    if device:
        add_device_argument(parser, device_note)


def device_argument(args: argparse.Namespace) -> Any:
    """``--device`` as a ``torch.device`` (a missing GPU fails here, naming the flag)."""
    from clipforge.device import resolve_device

    return resolve_device(getattr(args, "device", None))
