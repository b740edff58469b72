"""``clipforge search``: query an index by text and/or image from the command line."""

from __future__ import annotations

import argparse

from clipforge.commands._image_options import add_image_alpha_argument, image_alpha
from clipforge.commands._model_options import add_device_argument, device_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="search an index by text, image or both",
        description="Search an index built by `clipforge index`. Text and --image combine "
        "(weighted with --weights TEXT IMAGE), e.g. an image plus 'in winter'.",
    )
    p.add_argument("index", help="index folder")
    p.add_argument("text", nargs="?", default=None, help="text query")
    p.add_argument("--image", default=None, help="query image file")
    p.add_argument("--image-id", type=int, default=None, help="query by an indexed image's id")
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="weights of the given parts, in the order text, image, image-id",
    )
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--dedup", action="store_true", help="drop near-identical results")
    add_device_argument(p)
    add_image_alpha_argument(p)  # for --image queries; the index's embed run should have used the same
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from clipforge.errors import ClipforgeError
    from clipforge.search.searcher import Searcher

    if args.text is None and args.image is None and args.image_id is None:
        raise ClipforgeError("give a text query, --image or --image-id")
    if args.k <= 0:
        raise ClipforgeError(f"-k must be positive, got {args.k}")
    searcher = Searcher(args.index, device=device_argument(args), image_alpha=image_alpha(args))
    results = searcher.search(
        text=args.text,
        image=args.image,
        image_id=args.image_id,
        weights=args.weights,
        k=args.k,
        dedup=args.dedup,
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    for rank, r in enumerate(results, 1):
        caption = f"  {r.caption[:60]}" if r.caption else ""
        print(f"{rank:3d}. {r.score:.4f}  #{r.id:<7d} {r.path}{caption}")
    return 0
