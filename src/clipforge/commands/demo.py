"""``clipforge demo``: synthetic data -> train a tiny CLIP on CPU -> evaluate -> report."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train and evaluate a tiny CLIP on synthetic shapes (CPU, a few minutes, no download)",
        description="Generate synthetic captioned shapes, train a small CLIP on CPU, evaluate zero-shot accuracy "
        "on held-out shape/colour combinations and retrieval Recall@K, and write an HTML report.",
    )
    p.add_argument("--out", default="./clipforge-demo", help="output folder (default: ./clipforge-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller run that finishes in under a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.demo import format_demo_summary, run_demo

    result = run_demo(
        args.out, quick=args.quick, seed=args.seed, progress=args.progress, threads=args.threads
    )
    print(format_demo_summary(result))
    return 0
