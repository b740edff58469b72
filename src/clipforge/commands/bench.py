"""``clipforge bench``: images/s and texts/s for a model on this machine."""

from __future__ import annotations

import argparse

from clipforge.commands._model_options import add_model_arguments, model_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure images/s and texts/s (optionally side by side with open_clip, int8, ONNX)",
        description="Time encode_image / encode_text for a model. Variants are timed round-robin, so the "
        "ratios in the table hold even on a busy machine. Random weights unless --pretrained is given.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p, device=True)  # neither --model nor --pretrained: ViT-B-32, random weights
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 adds a bf16 variant (and open_clip's in bf16 with --open-clip); measure: on CPUs "
                        "without bf16 units it is slower")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (median reported)")
    p.add_argument("--kinds", default="image,text", help="comma-separated: image, text")
    p.add_argument("--open-clip", action="store_true", help="also time open_clip with the same weights")
    p.add_argument("--int8", action="store_true", help="also time int8 dynamic quantisation (CPU)")
    p.add_argument("--onnx", action="store_true", help="also time ONNX Runtime")
    p.add_argument("--onnx-int8", action="store_true", help="also time ONNX Runtime with int8 weights")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow first call)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.bench import describe_device, format_rows, resolve_device, run_bench
    from clipforge.errors import ConfigError
    from clipforge.factory import create_model

    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - {"image", "text"}:
        raise ConfigError(f"--kinds must list image and/or text, got {args.kinds!r}")
    variants = ["open_clip"] if args.open_clip else []
    variants.append("clipforge")
    bf16 = args.dtype == "bfloat16"
    variants += [v for v, on in (("open_clip-bf16", bf16 and args.open_clip), ("bf16", bf16), ("int8", args.int8),
                                 ("compile", args.compile), ("onnx", args.onnx), ("onnx-int8", args.onnx_int8)) if on]  # fmt: skip
    device = resolve_device(args.device)
    model = create_model(model_argument(args, fallback="ViT-B-32"), args.pretrained)
    rows = run_bench(model, variants=variants, kinds=kinds, batch_size=args.batch_size,
                     rounds=args.rounds, threads=args.threads, device=device)  # fmt: skip
    print(f"{model.architecture} ({args.pretrained or 'random weights'})  {describe_device(device)}  "
          f"batch {args.batch_size}  median of {args.rounds} interleaved rounds")  # fmt: skip
    print(format_rows(rows, rows[0].variant if rows else variants[0]))
    print("items/s: images/s or texts/s (texts: realistic 5-30 word captions). max|diff| and min cos "
          f"compare L2-normalised features with {rows[0].variant if rows else variants[0]}'s.")  # fmt: skip
    return 0
