"""``clipforge convert SRC DST --to FORMAT``: rewrite a checkpoint in another format."""

from __future__ import annotations

import argparse

from clipforge.commands._model_options import add_model_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint between clipforge / open_clip / Hugging Face / OpenAI formats",
        description="Read SRC in any supported format (detected automatically; a pretrained tag or "
        "'hf-hub:org/name' also works) and write it to DST in the format given by --to. "
        "Pickled files are read without running their code.",
    )
    p.add_argument("src", help="checkpoint file or folder, 'hf-hub:org/name', or a tag with --model")
    p.add_argument(
        "dst", help="output folder (clipforge, hf, open_clip) or file (openai, open_clip .bin/.safetensors)"
    )
    p.add_argument(
        "--to", required=True, choices=("clipforge", "open_clip", "hf", "openai"), help="output format"
    )
    add_model_argument(p)  # only used when SRC carries no config (else read from SRC / inferred)
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"), help="cast the weights")
    p.add_argument("--cache-dir", default=None, help="Hugging Face Hub cache folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.checkpoints.load import detect_format
    from clipforge.factory import convert_checkpoint

    out = convert_checkpoint(
        args.src, args.dst, args.to, model_name=args.model, dtype=args.dtype, cache_dir=args.cache_dir
    )
    print(f"wrote {out} ({args.to}; read back as {detect_format(out)})")
    return 0
