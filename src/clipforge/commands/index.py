"""``clipforge index``: build a faiss index (kind chosen by size and memory) over embeddings."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="build a search index over `clipforge embed` output",
        description="Build a faiss index. auto: exact (flat) below 50k vectors, HNSW up to 250k, IVF "
        "beyond; IVF-PQ when --max-memory requires it. The search setting is calibrated to the "
        "target recall and the expected recall@10 is printed. --add appends to an existing index. "
        "IVF kinds are built shard by shard into on-disk inverted lists; under `torchrun "
        "--nproc-per-node N -m clipforge index ...` the ranks fill the parts and rank 0 merges them.",
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
    p.add_argument(
        "--part-size",
        type=int,
        default=None,
        help="vectors per part of an IVF build (default: from --max-memory)",
    )
    p.add_argument("--seed", type=int, default=0, help="training sample and calibration queries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.search import sharding
    from clipforge.search.index import add_to_index, describe

    if args.add:
        if sharding.under_torchrun() and int(os.environ.get("RANK", "0")) != 0:
            return 0  # an add is one process: rank 0 does it
        m = add_to_index(args.out, args.emb)
        print(f"added {args.emb}: {describe(m)}")
        return 0
    sharding.start("cpu")  # gloo; a world of one without torchrun
    try:
        return _build(args)
    finally:
        sharding.finish()


def _build(args: argparse.Namespace) -> int:
    from clipforge.search import sharding
    from clipforge.search.embed import load_manifest
    from clipforge.search.index import build_index, describe, plan_index

    main = sharding.world()[0] == 0
    em = load_manifest(args.emb)
    plan = plan_index(int(em["count"]), int(em["dim"]), args.kind, args.max_memory)
    if main:
        print(f"choice: {plan.kind} ({plan.reason}), ~{plan.memory_bytes / 1e6:,.1f} MB in memory")
    m = build_index(
        args.emb,
        args.out,
        kind=args.kind,
        max_memory=args.max_memory,
        metric=args.metric,
        target_recall=args.target_recall,
        seed=args.seed,
        part_rows=args.part_size,
    )
    if not main:
        return 0
    print(f"built in {m['build_seconds']:.1f}s: {describe(m)}")
    print(f'saved to {args.out}; try: clipforge search {args.out} "a photo of a dog"')
    return 0
