"""``clipforge caption IMAGES... [--out captions.jsonl]``: captions from a CoCa model."""

from __future__ import annotations

import argparse
import json
import sys

from clipforge.commands._image_options import add_image_alpha_argument, image_alpha
from clipforge.commands._model_options import add_model_arguments, device_argument, model_argument
from clipforge.commands._options import add_table_arguments, table_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "caption",
        help="caption images with a CoCa model (JSONL: image, caption, reference)",
        description="Generate captions with a CoCa model (open_clip's generate: same options, same "
        "tokens). IMAGES are any data spec the other commands take: folders, image files or "
        "patterns, pairs tables, webdataset shards. Unreadable images get an 'error' record.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGES", help="folder, image file/pattern, table or shards")
    add_model_arguments(p, device=True)
    add_image_alpha_argument(p)
    p.add_argument("--out", default=None, help="JSONL file to write (default: print to stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed for top-k/top-p sampling")
    add_table_arguments(p)
    p.set_defaults(func=run)


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """open_clip's ``CoCa.generate`` options with its defaults (shared by ``caption`` and ``eval``)."""
    g = p.add_argument_group("generation (open_clip's CoCa.generate arguments)")
    g.add_argument(
        "--generation-type", default="beam_search", choices=["beam_search", "greedy", "top_k", "top_p"]
    )
    g.add_argument("--seq-len", type=int, default=30, help="maximum tokens, SOT and EOT included")
    g.add_argument("--min-seq-len", type=int, default=5, help="EOT is forbidden before this length")
    g.add_argument("--num-beams", type=int, default=6)
    g.add_argument("--num-beam-groups", type=int, default=3)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", default="false", choices=["false", "true", "never"])
    g.add_argument("--top-k", type=int, default=1)
    g.add_argument("--top-p", type=float, default=0.1)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)


def generation_options(args: argparse.Namespace) -> dict:
    stopping = {"false": False, "true": True, "never": "never"}[args.early_stopping]
    return {
        "generation_type": args.generation_type,
        "seq_len": args.seq_len,
        "min_seq_len": args.min_seq_len,
        "num_beams": args.num_beams,
        "num_beam_groups": args.num_beam_groups,
        "length_penalty": args.length_penalty,
        "early_stopping": stopping,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "temperature": args.temperature,
        "repetition_penalty": args.repetition_penalty,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from clipforge.captioning import caption_images
    from clipforge.factory import create_model_and_transforms, get_tokenizer

    device = device_argument(args)
    model, _, preprocess = create_model_and_transforms(
        model_argument(args), pretrained=args.pretrained, device=device, image_alpha=image_alpha(args)
    )
    torch.manual_seed(args.seed)
    source = args.images[0] if len(args.images) == 1 else args.images
    records = caption_images(
        model,
        preprocess,
        get_tokenizer(model),
        source,
        args.out,
        table=table_options(args),
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
        **generation_options(args),
    )
    if args.out is None:
        for record in records:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    failed = sum("error" in r for r in records)
    print(f"captioned {len(records) - failed} images ({failed} unreadable)", file=sys.stderr)
    return 0
