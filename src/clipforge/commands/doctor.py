"""``clipforge doctor DATA``: report what a dataset would skip during training, and why."""

from __future__ import annotations

import argparse
import json

from clipforge.commands._options import add_table_arguments, table_kwargs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="scan a dataset and report bad images/rows (counts by reason + examples)",
        description="Decode every image and check every row of DATA (a table, image folder, shards or "
        "synthetic:shapes) the way training would; list what would be skipped and why. Nothing is changed.",
    )
    p.add_argument(
        "data", help="table (.csv/.tsv/.json/.jsonl/.parquet), image folder, shards or synthetic:shapes"
    )
    add_table_arguments(p)
    p.add_argument("--max-examples", type=int, default=10, help="offending rows listed per reason")
    p.add_argument("--no-images", action="store_true", help="check tables only, do not decode images")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if anything would be skipped")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.data.doctor import scan_dataset

    kw = table_kwargs(args)
    report = scan_dataset(
        args.data,
        max_examples=args.max_examples,
        check_images=not args.no_images,
        progress=not args.json,
        **kw,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if args.strict and report.total_skipped else 0
