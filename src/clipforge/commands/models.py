"""``clipforge models``: the registered architectures with their size and cost, and
(``--pretrained``) the named weights with their Hub repository and licence (the rows and their
formatting are library functions, in :mod:`clipforge.model_table`)."""

from __future__ import annotations

import argparse

from clipforge.model_table import format_models, format_pretrained, models_table, pretrained_rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list model architectures (parameters, GFLOPs, embed dim)",
        description="List registered architectures. GFLOPs count one multiply-add as one FLOP "
        "(open_clip's convention); text GFLOPs are for a full 77-token context.",
    )
    p.add_argument("--filter", default=None, help="only names containing this substring (case-insensitive)")
    p.add_argument("--pretrained", action="store_true", help="list the named pretrained weights instead")
    p.add_argument(
        "--sizes",
        action="store_true",
        help="also count parameters of timm / Hugging Face towers (builds each on the meta device: slow; "
        "a Hugging Face tower needs its config locally)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        print(format_pretrained(pretrained_rows(args.filter)))
        return 0
    print(format_models(models_table(args.filter, sizes=args.sizes)))
    return 0
