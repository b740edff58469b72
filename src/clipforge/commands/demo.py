"""``clipforge demo``: synthetic data -> train a tiny CLIP (or, with ``--caption``, a tiny CoCa) on CPU -> evaluate -> report."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train and evaluate a tiny CLIP (or CoCa captioner) on synthetic shapes (CPU, a few minutes, no download)",
        description="Generate synthetic captioned shapes, train a small CLIP on CPU, evaluate zero-shot accuracy "
        "on held-out shape/colour combinations and retrieval Recall@K, and write an HTML report. With --caption, "
        "train tiny-coca with the coca loss instead and caption the held-out combinations (BLEU/METEOR/ROUGE-L/"
        "CIDEr against the most frequent training caption and the untrained model; needs pycocoevalcap and Java).",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default: ./clipforge-demo, ./clipforge-demo-caption with --caption)",
    )
    p.add_argument(
        "--caption", action="store_true", help="the captioning demo: train and evaluate a tiny CoCa"
    )
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in under a minute")
    p.add_argument(
        "--steps", type=int, default=None, help="stop training after this many steps (a smoke run)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.errors import ConfigError

    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be a positive number of training steps, got {args.steps}")
    common = {"quick": args.quick, "seed": args.seed, "progress": args.progress, "threads": args.threads,
              "max_steps": args.steps}  # fmt: skip
    if args.caption:
        from clipforge.demo_caption import format_caption_demo_summary, run_caption_demo

        result = run_caption_demo(args.out or "./clipforge-demo-caption", **common)
        print(format_caption_demo_summary(result))
        return 0
    from clipforge.demo import format_demo_summary, run_demo

    result = run_demo(args.out or "./clipforge-demo", **common)
    print(format_demo_summary(result))
    return 0
