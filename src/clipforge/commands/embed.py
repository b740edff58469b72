"""``clipforge embed``: images (folder, pairs table or webdataset shards) -> embedding shards."""

from __future__ import annotations

import argparse
from typing import Any

from clipforge.commands._image_options import (
    add_image_alpha_argument,
    add_naflex_argument,
    add_naflex_resize_argument,
    image_model_options,
)
from clipforge.commands._model_options import add_model_arguments, model_argument
from clipforge.commands._options import add_table_arguments, table_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="embed a collection of images into .npy shards + a metadata table",
        description="Embed images with a CLIP model. Resumable: rerun the same command after an "
        "interruption and finished shards are skipped. Unreadable images are listed in skipped.csv. "
        "Under `torchrun --nproc-per-node N -m clipforge embed ...` the shards are split over the "
        "ranks (gloo on CPU, nccl with --device cuda: one GPU per rank); a rerun with any number "
        "of ranks finishes what is missing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p, device=True, device_note="under torchrun, cuda and auto are this rank's GPU")
    add_image_alpha_argument(p)
    add_naflex_argument(p, "the index records it, so image queries are preprocessed the same way")
    add_naflex_resize_argument(p)
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="SRC",
        help="a folder (recursive), a CSV/TSV/JSONL/parquet pairs table, or .tar shards / patterns",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument(
        "--decode-threads",
        type=int,
        default=None,
        help="threads each decoding process decodes a batch with (default: the available cores "
        "divided by the decoding processes, at most 8; 1 decodes one image at a time)",
    )
    p.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode each image reduced by an integer factor to a shorter side of at least twice the "
        "model's input (JPEG DCT scaling, Image.reduce otherwise) instead of at full size: large photos "
        "decode several times faster; embeddings move slightly from those of a full-size decode "
        "(the default, which gives open_clip's numbers)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="compute precision: bf16 casts the weights (LayerNorm statistics stay fp32). On a CPU "
        "with AMX or AVX512-BF16 (Sapphire Rapids and later) ViT-B-32 runs ~3x faster and embeddings "
        "move slightly (cosine to fp32 ~0.9999); on other CPUs bf16 is several times slower",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="images per output shard")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage precision")
    p.add_argument("--no-captions", action="store_true", help="do not embed captions")
    add_table_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.search import sharding

    info = sharding.start(args.device)  # a world of one without torchrun
    try:
        return _embed(args, info)
    finally:
        sharding.finish()


def _embed(args: argparse.Namespace, info: Any) -> int:
    import torch

    from clipforge.factory import create_model_and_transforms, get_tokenizer
    from clipforge.inference import optimize_for_inference
    from clipforge.search.embed import embed_images

    model, _, preprocess = create_model_and_transforms(
        model_argument(args),
        pretrained=args.pretrained,
        device=info.device,
        **image_model_options(args),
    )
    # fp32: the same features (ResNets ~1.5x faster on the CPU); bf16: weights cast
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    model = optimize_for_inference(model, inplace=True, dtype=dtype)
    tokenizer = None if args.no_captions else get_tokenizer(model)
    source = args.images[0] if len(args.images) == 1 else args.images
    m = embed_images(
        model,
        preprocess,
        source,
        args.out,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shard_size=args.shard_size,
        dtype=args.dtype,
        tokenizer=tokenizer,
        model_name=model.architecture,  # e.g. "custom (from my-arch.json)"; the config is stored too
        pretrained=args.pretrained,
        device=info.device,
        table=table_options(args),
        decode_threads=args.decode_threads,
        fast_decode=args.fast_decode,
    )
    if not info.is_main:
        return 0
    ranks = sorted({s["rank"] for s in m["shards"] if s.get("rank") is not None})
    if info.distributed:
        print(f"{info.world_size} ranks ({info.backend}); shards on disk written by ranks {ranks}")
    print(
        f"embedded {m['count']:,} images ({m['dim']}-d, {m['dtype']}) into {len(m['shards'])} shard(s) in {args.out}"
    )
    if m["skipped"]:
        print(f"skipped {m['skipped']:,} unreadable image(s): see {args.out}/skipped.csv")
    print(f"next: clipforge index {args.out} --out INDEX_DIR")
    return 0
