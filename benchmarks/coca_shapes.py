"""A tiny CoCa trained on synthetic shapes captions held-out shape/colour combinations.

Trains ``tiny-coca`` with ``--loss coca`` on ``synthetic:shapes`` (train split: the held-out
combinations never appear), captions ``synthetic:shapes?split=heldout`` images with
``clipforge eval --task captioning``'s code path, and scores them against the most frequent
training caption given to every image (what a model that ignores the image can at best do with one
fixed answer). Prints a table of BLEU-1/4, METEOR, ROUGE-L and CIDEr, plus a few examples.

    nice -n 10 python benchmarks/coca_shapes.py                      # train (a few minutes), then eval
    python benchmarks/coca_shapes.py --model-dir runs/coca/final     # eval an existing model only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import clipforge
from clipforge.demo_caption import attribute_accuracy, most_frequent_caption
from clipforge.eval.captioning import HEADLINE, caption_scores
from clipforge.eval.runner import evaluate, format_caption_examples

IMAGE_SIZE = 32


def train_model(args: argparse.Namespace) -> tuple[str, float]:
    """Train tiny-coca for one epoch; return (final model folder, seconds)."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train

    cfg = TrainConfig(
        data=f"synthetic:shapes?n={args.train_samples}&split=train&image_size={IMAGE_SIZE}",
        model="tiny-coca",
        loss="coca",
        output_dir=str(Path(args.out) / "train"),
        epochs=1,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=10,
        weight_decay=0.1,
        seed=args.seed,
        threads=args.threads,
        workers=0,
        progress=False,
        save_every_epochs=0,
        keep_last=1,
        log_every=10,
    )
    t0 = time.perf_counter()
    train(cfg)
    return str(Path(cfg.output_dir) / "final"), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="evaluate this trained model instead of training one")
    p.add_argument("--out", default="runs/coca_shapes", help="training output and report folder")
    p.add_argument("--train-samples", type=int, default=3200, help="one epoch over this many images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=200, help="held-out images to caption")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model_dir, seconds = args.model_dir, None
    if model_dir is None:
        model_dir, seconds = train_model(args)
    model, preprocess = clipforge.create_model_from_pretrained(pretrained=model_dir)
    spec = f"synthetic:shapes?split=heldout&n={args.eval_images}&image_size={IMAGE_SIZE}"
    result = evaluate(
        model, clipforge.get_tokenizer(model), preprocess, spec, task="captioning",
        report_dir=Path(args.out) / "report", model_name="tiny-coca", pretrained=model_dir, num_examples=8,
    )  # fmt: skip
    from clipforge.eval.datasets import load_eval_dataset

    dataset = load_eval_dataset(spec, task="retrieval")
    images = [c["index"] for c in result["details"]["captions"]]
    references = [dataset.captions[i] for i in images]
    baseline_caption = most_frequent_caption(args.train_samples)
    baseline, _ = caption_scores([baseline_caption] * len(references), references)

    trained = f" (trained {seconds:.0f} s)" if seconds is not None else ""
    print(f"\ntiny-coca{trained}, {len(images)} held-out images ({spec}), beam search (open_clip defaults)")
    print(f"baseline: the most frequent training caption for every image: {baseline_caption!r}\n")
    print(f"| captioner | {' | '.join(HEADLINE.values())} |")
    print(f"|---|{'---|' * len(HEADLINE)}")
    for name, scores in (("tiny-coca", result["metrics"]), ("most frequent caption", baseline)):
        print(f"| {name} | {' | '.join(f'{scores[k]:.3f}' for k in HEADLINE)} |")
    candidates = [c["caption"] for c in result["details"]["captions"]]
    accuracy = attribute_accuracy(candidates, [refs[0] for refs in references])
    base_accuracy = attribute_accuracy([baseline_caption] * len(references), [refs[0] for refs in references])
    print(f"\n| attribute named correctly | {' | '.join(accuracy)} |")
    print(f"|---|{'---|' * len(accuracy)}")
    for name, acc in (("tiny-coca", accuracy), ("most frequent caption", base_accuracy)):
        print(f"| {name} | {' | '.join(f'{100 * v:.1f}%' for v in acc.values())} |")
    print("\nexamples:\n" + format_caption_examples(result))
    print(f"\nreport: {Path(args.out) / 'report' / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
