"""``clipforge eval``: zero-shot classification, retrieval, linear probe or captioning -> JSON (+ report);
``clipforge eval merge``: many result JSONs -> one CSV table."""

from __future__ import annotations

import argparse
from typing import Any

from clipforge.commands._image_options import (
    add_image_alpha_argument,
    add_naflex_argument,
    add_naflex_resize_argument,
    image_model_options,
)
from clipforge.commands._model_options import add_model_arguments, device_argument, model_argument
from clipforge.commands._options import add_table_arguments, table_kwargs
from clipforge.commands.caption import add_generation_arguments, generation_options

TASKS = ("zeroshot", "retrieval", "linear-probe", "captioning")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model (zero-shot, retrieval, linear probe, captioning); 'eval merge' tabulates results",
        description="Evaluate a CLIP model and write a CLIP_benchmark-style JSON result. "
        "Data specs: an ImageFolder dir, a pairs table (.csv/.tsv/.jsonl), a caption folder, "
        "webdataset shards (dir, x.tar, x-{000..009}.tar), synthetic:shapes?split=heldout, "
        "cifar10:ROOT (any torchvision dataset: torchvision:NAME:ROOT). --task captioning (a CoCa "
        "model) generates a caption per image and scores it against all the image's captions with "
        "pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr; needs Java).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p, device=True)
    add_image_alpha_argument(p)
    add_naflex_argument(p)
    add_naflex_resize_argument(p)
    p.add_argument("--task", choices=TASKS, default="zeroshot")
    p.add_argument("--data", metavar="SPEC", help="dataset to evaluate on")
    p.add_argument(
        "--train-data", metavar="SPEC", help="linear probe training data (default: half of --data)"
    )
    p.add_argument(
        "--templates",
        default=None,
        help="imagenet | simple | FILE: one '{}' or '{c}' template per line (CLIP_benchmark's "
        "zeroshot_classification_templates.txt), or JSON: a list, or CLIP_benchmark's dict as FILE.json:DATASET",
    )
    p.add_argument(
        "--classnames",
        metavar="FILE",
        help="class names overriding the dataset's: one per line (classnames.txt), or JSON: a list, "
        "or CLIP_benchmark's en_classnames.json as FILE.json:DATASET",
    )
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10], metavar="K")
    p.add_argument("--report", metavar="DIR", help="also write PNG plots and index.html to DIR")
    p.add_argument(
        "--output", metavar="FILE", help="result JSON (default results.json when --report is not given)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--split", default=None, help="dataset split for torchvision/synthetic data")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_table_arguments(p)
    add_generation_arguments(p)
    p.set_defaults(func=run, eval_command=None)

    sub = p.add_subparsers(dest="eval_command", metavar="merge", required=False)
    m = sub.add_parser("merge", help="merge result JSON files into one CSV table")
    m.add_argument("results", nargs="+", metavar="RESULT.json")
    m.add_argument("--out", required=True, metavar="TABLE.csv")
    m.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from clipforge.eval.results import format_table, merge_results, write_csv

    rows = merge_results(args.results)
    path = write_csv(rows, args.out)
    print(format_table(rows))
    print(f"\n{len(rows)} result(s) -> {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from clipforge.errors import ClipforgeError

    model_argument(args)  # --model, or --pretrained alone with a self-describing checkpoint
    if not args.data:
        raise ClipforgeError("--data is required (e.g. --data synthetic:shapes?split=heldout)")

    from clipforge.eval.runner import evaluate
    from clipforge.factory import create_model_and_transforms, get_tokenizer

    device = device_argument(args)
    model, _, preprocess = create_model_and_transforms(
        args.model,
        args.pretrained,
        device=device,
        **image_model_options(args),
    )
    model.eval()
    tokenizer = get_tokenizer(model)
    dataset, train = _datasets(args, preprocess)
    classnames = None
    if args.classnames:
        from clipforge.eval.templates import load_classnames_file, split_file_key

        classnames = load_classnames_file(*split_file_key(args.classnames))
    output = args.output or (None if args.report else "results.json")
    result = evaluate(
        model,
        tokenizer,
        preprocess,
        dataset,
        task=args.task,
        templates=args.templates,
        classnames=classnames,
        train_dataset=train,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        ks=tuple(args.recall_k),
        model_name=model.architecture,  # the real architecture (the config is recorded too)
        pretrained=args.pretrained,
        dataset_name=args.data,
        report_dir=args.report,
        output=output,
        progress=not args.no_progress,
        seed=args.seed,
        generate_options=generation_options(args) if args.task == "captioning" else None,
    )
    _print_result(args, result, dataset, output)
    return 0


def _datasets(args: argparse.Namespace, preprocess: Any) -> tuple[Any, Any]:
    """The ``--data`` set (captions per image for retrieval and captioning, labels otherwise) and
    the linear probe's ``--train-data`` set (None when not given)."""
    from clipforge.eval.datasets import load_eval_dataset

    kind = "retrieval" if args.task in ("retrieval", "captioning") else "classification"
    table = table_kwargs(args)
    dataset = load_eval_dataset(
        args.data, task=kind, transform=preprocess, download=args.download, split=args.split, **table
    )
    train = None
    if args.train_data:
        train = load_eval_dataset(
            args.train_data, transform=preprocess, download=args.download, split="train", **table
        )
    return dataset, train


def _print_result(args: argparse.Namespace, result: dict, dataset: Any, output: str | None) -> None:
    """The summary, a few examples for retrieval and captioning, and where the files went."""
    from pathlib import Path

    from clipforge.eval.runner import format_caption_examples, format_examples, format_summary

    print(format_summary(result))
    if args.task == "retrieval":
        examples = format_examples(result, dataset)
        if examples:
            print("example text -> image searches:")
            print(examples)
    if args.task == "captioning":
        print("example captions:")
        print(format_caption_examples(result))
    print(f"time {result['timings']['total']:.1f}s")
    if output:
        print(f"result: {output}")
    if args.report:
        print(f"report: {Path(args.report) / 'index.html'}")
