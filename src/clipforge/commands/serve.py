"""``clipforge serve``: the HTTP search service and web page for an index."""

from __future__ import annotations

import argparse

from clipforge.commands._image_options import add_image_alpha_argument, image_alpha
from clipforge.commands._model_options import add_device_argument, device_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an index over HTTP with a web page",
        description="Serve /search, /image/{id}, /health and a web page at / . Bind to 127.0.0.1 "
        "unless you mean to expose it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("index", help="index folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    add_device_argument(p)
    add_image_alpha_argument(p)  # for image queries
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted image upload")
    p.add_argument("--max-k", type=int, default=100, help="largest k a client may ask for")
    p.add_argument("--max-text-chars", type=int, default=1000, help="longest accepted text query")
    p.add_argument("--batch-wait-ms", type=float, default=4.0, help="how long to gather concurrent queries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.search.server import serve

    print(f"serving {args.index} on http://{args.host}:{args.port}/")
    serve(
        args.index,
        host=args.host,
        port=args.port,
        device=device_argument(args),
        image_alpha=image_alpha(args),
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_k=args.max_k,
        max_text_chars=args.max_text_chars,
        batch_wait_ms=args.batch_wait_ms,
    )
    return 0
