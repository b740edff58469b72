"""``clipforge train``: train or fine-tune a CLIP model (also under ``torchrun -m clipforge train``)."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from clipforge.train.config import add_arguments

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a CLIP model on image-caption pairs",
        description="Train a CLIP model. Every option can also be set in a YAML/JSON --config file; "
        "flags given on the command line override the file. Multi-process: "
        "torchrun --nproc-per-node N -m clipforge train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="RUN.yaml", help="YAML or JSON run config")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.train.config import config_from_args
    from clipforge.train.trainer import train

    cfg = config_from_args(args)
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if result.interrupted:
        print(f"stopped cleanly at step {result.steps}; checkpoint {result.last_checkpoint}")
        print(f"continue with: clipforge train ... --output-dir {cfg.output_dir} --resume latest")
        return 0
    print(
        f"trained {result.steps} steps in {result.wall_time_s:.1f}s ({result.samples_per_second:.1f} samples/s); "
        f"final loss {result.final_loss if result.final_loss is None else round(result.final_loss, 4)}"
    )
    skipped = sum(result.skipped_samples.values())
    if skipped or result.skipped_steps:
        print(
            f"skipped {skipped} bad sample(s) {result.skipped_samples} and {result.skipped_steps} non-finite step(s)"
        )
    for key in ("image_retrieval_recall@1", "text_retrieval_recall@1"):
        if key in result.eval_metrics:
            print(f"{key}: {result.eval_metrics[key]:.4f}")
    print(f"model saved to {result.final_model_dir}")
    return 0
