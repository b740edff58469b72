"""``clipforge cache DATA --out DIR``: decode a training set once into an image cache, ahead of time."""

from __future__ import annotations

import argparse

from clipforge.commands._image_options import add_image_alpha_argument, image_alpha
from clipforge.commands._model_options import add_model_arguments, model_argument
from clipforge.commands._options import add_table_arguments, table_kwargs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cache",
        help="decode and resize a training set once into a memory-mapped uint8 cache",
        description="Decode every image of DATA (a table or an image folder) once, converted and reduced "
        "the way the model's training preprocessing needs, into DIR; then train with "
        "`clipforge train --cache-images --cache-dir DIR` (same --model/--pretrained/--image-alpha). "
        "What the cache changes relative to decoding each epoch: see clipforge.data.cache.",
    )
    p.add_argument("data", help="table (.csv/.tsv/.json/.jsonl/.parquet) or image folder")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder (written atomically)")
    add_model_arguments(p, pretrained_note="only its preprocessing convention is used here")
    add_image_alpha_argument(p)
    p.add_argument(
        "--side", type=int, default=None, help="cached short side in pixels (default: from the crop scale)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: one per core, at most 8)"
    )
    add_table_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.data.build import build_dataset
    from clipforge.data.cache import ImageCache, build_cache, spec_for_transform
    from clipforge.data.workers import available_cores
    from clipforge.factory import create_model_and_transforms
    from clipforge.train.trainer import DEFAULT_MODEL

    _, train_transform, _ = create_model_and_transforms(
        model_argument(args, DEFAULT_MODEL), args.pretrained, image_alpha=image_alpha(args)
    )
    dataset = build_dataset(args.data, transform=train_transform, **table_kwargs(args))
    spec, _ = spec_for_transform(train_transform, args.side)
    workers = args.workers if args.workers is not None else min(8, available_cores())
    folder = build_cache(dataset, args.out, spec, workers=workers)
    cache = ImageCache(folder)
    bad = len(cache.manifest["bad"])
    print(
        f"{folder}: {len(cache) - bad} images cached at short side {spec.side} "
        f"({cache.manifest['bytes'] / 2**20:.1f} MiB), {bad} bad"
    )
    return 0
