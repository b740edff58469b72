"""``clipforge shards make TABLE --out DIR``: write webdataset tar shards from pairs data."""

from __future__ import annotations

import argparse

from clipforge.commands._options import add_table_arguments, table_kwargs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards", help="webdataset shards (make)", description="Work with webdataset shards."
    )
    sub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    m = sub.add_parser(
        "make",
        help="write shards from a table, image folder or synthetic:shapes",
        description="Write <prefix>-000000.tar ... plus manifest.json. Bad images are skipped and counted.",
    )
    m.add_argument(
        "data", help="table (.csv/.tsv/.json/.jsonl/.parquet), image folder or synthetic:shapes?n=..."
    )
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    m.add_argument(
        "--max-size-mb", type=float, default=1024, help="bytes per shard cap in MiB (default 1024)"
    )
    m.add_argument("--format", default="keep", choices=["keep", "jpg", "png", "webp"],
                   help="keep original JPEG/PNG/WebP bytes (default) or re-encode")  # fmt: skip
    m.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    add_table_arguments(m)
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.data.shards import write_shards

    kw = table_kwargs(args)
    res = write_shards(
        args.data,
        args.out,
        max_count=args.max_count,
        max_size=int(args.max_size_mb * 2**20),
        prefix=args.prefix,
        image_format=args.format,
        progress=True,
        **kw,
    )
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(res.skipped.items())) or "none"
    print(f"wrote {res.total} sample(s) in {len(res.paths)} shard(s): {res.pattern}")
    print(f"skipped: {skipped}")
    return 0
