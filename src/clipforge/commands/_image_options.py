"""``--image-alpha`` as every image-preprocessing command takes it (train, eval, embed, search,
serve, bench), ``--no-naflex`` as eval, embed and export take it, and ``--naflex-resize`` as
eval and embed take it: one definition, one meaning. (The leading underscore keeps :mod:`clipforge.cli` from treating this module as a
command.)
"""

from __future__ import annotations

import argparse
from typing import Any

IMAGE_ALPHA_HELP = (
    "what transparent pixels (RGBA, LA, palette images) become: 'drop' (discard alpha, as open_clip, "
    "OpenAI and transformers 4.x do), 'composite' (blend on white) or 'composite:#RRGGBB' / "
    "'composite:R,G,B'. Default: the convention stored with the weights (open_clip/OpenAI weights: drop; "
    "Hugging Face folders: composite on white, as CLIPImageProcessor; clipforge models: what they were "
    "trained with)"
)


def _alpha_value(text: str) -> str:
    """Validate while parsing, so a typo fails before any model is loaded."""
    from clipforge.conventions import parse_alpha
    from clipforge.errors import ConfigError

    try:
        parse_alpha(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_image_alpha_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--image-alpha`` (default None: keep the weights' stored convention)."""
    parser.add_argument(
        "--image-alpha",
        default=None,
        type=_alpha_value,
        metavar="drop|composite[:COLOUR]",
        help=IMAGE_ALPHA_HELP,
    )


def image_alpha(args: argparse.Namespace) -> str | None:
    """The ``--image-alpha`` value, or None where the command has no such flag or it was not given."""
    return getattr(args, "image_alpha", None)


NAFLEX_HELP = (
    "for weights whose preprocessing is NaFlex (SigLIP 2 at native aspect ratio: the default of a "
    "Hugging Face Siglip2Model folder with a Siglip2ImageProcessor, as in transformers, and of checkpoints "
    "saved with naflex_max_patches): resize to the model's fixed square size instead"
)


def add_naflex_argument(parser: argparse.ArgumentParser, note: str | None = None) -> None:
    """Add ``--no-naflex`` (``note``: what it means for this command's output)."""
    help_text = f"{NAFLEX_HELP}; {note}" if note else NAFLEX_HELP
    parser.add_argument("--no-naflex", action="store_true", help=help_text)


NAFLEX_RESIZE_HELP = (
    "whose NaFlex resize runs for NaFlex weights: 'siglip2' (transformers' Siglip2ImageProcessor: "
    "bilinear on the uint8 tensor) or 'timm' (timm's transforms, as open_clip main runs them: PIL with "
    "the weights' interpolation, bicubic for SigLIP 2). Both pick the same patch grid. Default: the "
    "weights' origin's (open_clip main's NaFlex tags and hf-hub repositories: timm; Siglip2 folders and "
    "clipforge checkpoints: what they store, siglip2 if nothing)"
)


def add_naflex_resize_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--naflex-resize`` (default None: keep the weights' own rule)."""
    parser.add_argument("--naflex-resize", default=None, choices=("siglip2", "timm"), help=NAFLEX_RESIZE_HELP)


def image_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``create_model_and_transforms``'s image keywords from the parsed flags, the same for every
    command: each None (the weights' own choice) where the command has no such flag or it was not
    given; ``--no-naflex`` gives ``image_naflex=False``."""
    return {
        "image_alpha": image_alpha(args),
        "image_naflex": False if getattr(args, "no_naflex", False) else None,
        "image_naflex_resize": getattr(args, "naflex_resize", None),
    }
