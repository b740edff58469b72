"""``clipforge index``: build a faiss index (kind chosen by size and memory) over embeddings."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="build a search index over `clipforge embed` output",
        description="Build a faiss index. auto: exact (flat) below 50k vectors, HNSW up to 250k, IVF "
        "beyond; IVF-PQ when --max-memory requires it. The search setting is calibrated to the "
        "target recall and the expected recall@10 is printed. --add appends to an existing index.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("emb", help="embedding folder written by `clipforge embed`")
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--kind", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"], default="auto")
    p.add_argument("--max-memory", default=None, help="memory budget for the index, e.g. 2GB, 512MiB")
    p.add_argument("--metric", choices=["ip", "l2"], default="ip")
    p.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 the search setting is tuned for"
    )
    p.add_argument("--add", action="store_true", help="append EMB to the existing index in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.search.index import add_to_index, build_index, describe, plan_index

    if args.add:
        m = add_to_index(args.out, args.emb)
        print(f"added {args.emb}: {describe(m)}")
        return 0
    from clipforge.search.embed import load_manifest

    em = load_manifest(args.emb)
    plan = plan_index(int(em["count"]), int(em["dim"]), args.kind, args.max_memory)
    print(f"choice: {plan.kind} ({plan.reason}), ~{plan.memory_bytes / 1e6:,.1f} MB in memory")
    m = build_index(
        args.emb,
        args.out,
        kind=args.kind,
        max_memory=args.max_memory,
        metric=args.metric,
        target_recall=args.target_recall,
    )
    print(f"built in {m['build_seconds']:.1f}s: {describe(m)}")
    print(f'saved to {args.out}; try: clipforge search {args.out} "a photo of a dog"')
    return 0
