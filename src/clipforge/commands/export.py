"""``clipforge export``: image and text towers (and a CoCa's decoder) to ONNX (verified with onnxruntime) or torch.export."""

from __future__ import annotations

import argparse
from typing import Any

from clipforge.commands._image_options import add_naflex_argument
from clipforge.commands._model_options import add_model_arguments, model_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the image/text towers (and a CoCa's captioning decoder) to ONNX or a torch.export program",
        description="Write image.onnx and text.onnx (dynamic batch; text also dynamic length) and check "
        "them against PyTorch with onnxruntime (max abs diff must stay below --atol). For a CoCa model also "
        "decoder.onnx (image tokens + caption prefix -> next-token logits), and image.onnx returns the image "
        "tokens as a second output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--towers", default=None,
        help="comma-separated: image, text, decoder (CoCa only); default: every graph the model has",
    )  # fmt: skip
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    p.add_argument(
        "--int8", action="store_true", help="also write <tower>.int8.onnx (dynamic int8, CPU fast path)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--atol", type=float, default=1e-4)
    add_naflex_argument(
        p, "export the fixed-size square image graph (without it the image graph of such weights is refused)"
    )
    p.set_defaults(func=run)


def _towers(arg: str | None, model: Any) -> tuple[str, ...]:
    """The graphs to write: ``--towers`` checked against what the model has (default: all of them)."""
    from clipforge.errors import ConfigError
    from clipforge.export import GRAPHS, towers_for

    if arg is None:
        return towers_for(model)
    towers = tuple(t.strip() for t in arg.split(",") if t.strip())
    unknown = sorted(set(towers) - set(GRAPHS))
    if unknown or not towers:
        raise ConfigError(f"--towers: unknown {unknown or 'empty'}; choose from {', '.join(GRAPHS)}")
    missing = sorted(set(towers) - set(towers_for(model)))
    if missing:
        raise ConfigError(
            f"--towers {','.join(missing)}: {model.architecture} has no captioning decoder (only a CoCa has one); "
            f"choose from {', '.join(towers_for(model))}"
        )
    return towers


def _describe(model: Any) -> dict[str, str]:
    """Each graph's inputs and outputs, as printed next to its file."""
    from clipforge.export import decoder_length, is_coca

    cfg = model.config
    size, ctx, dim = cfg.vision.image_size, cfg.text.context_length, cfg.embed_dim
    image_out = f"features [batch, {dim}]"
    if is_coca(model):
        image_out += f", image_tokens [batch, {cfg.vision.attn_pooler_queries - 1}, {dim}]"
    described = {
        "image": f"images float32 [batch, 3, {size}, {size}] -> {image_out}",
        "text": f"tokens int64 [batch, <={ctx}] -> features [batch, {dim}]",
    }
    if is_coca(model):
        vocab, longest = cfg.multimodal.vocab_size, decoder_length(model)
        described["decoder"] = (f"image_tokens float32 [batch, {cfg.vision.attn_pooler_queries - 1}, {dim}], "
                                f"tokens int64 [batch, <={longest}] -> logits [batch, length, {vocab}]")  # fmt: skip
    return described


def run(args: argparse.Namespace) -> int:
    from clipforge.export import export_onnx, export_program, refuse_naflex
    from clipforge.factory import create_model

    model = create_model(model_argument(args), args.pretrained).eval()
    towers = _towers(args.towers, model)
    refuse_naflex(model, towers, fixed_size=args.no_naflex)
    if args.no_naflex and getattr(model.preprocess_cfg, "naflex_max_patches", None) is not None:
        size = model.config.vision.image_size
        print(f"warning: NaFlex preprocessing is not exported; image.onnx takes square {size}x{size} images "
              "(the fixed-size resize), not NaFlex patch dicts")  # fmt: skip
    if args.format == "torch-export":
        result = export_program(model, args.out, towers=towers)
    else:
        result = export_onnx(
            model, args.out, towers=towers, opset=args.opset, dynamo=args.dynamo,
            verify=not args.no_verify, atol=args.atol, int8=args.int8,
        )  # fmt: skip
    described = _describe(model)
    what = "torch.export programs" if args.format == "torch-export" else f"ONNX (opset {args.opset})"
    print(f"{model.architecture} ({args.pretrained or 'random weights'}) -> {what} in {args.out}; "
          f"{len(result.paths)} files written; features are not L2-normalised")  # fmt: skip
    for tower, path in result.paths.items():
        diff, cos = result.max_abs_diff.get(tower), result.min_cos.get(tower)
        check = f"max abs diff vs PyTorch {diff:.2e}" if diff is not None else ""
        check += f"min cosine vs float32 {cos:.5f}" if cos is not None else ""
        print(f"  {tower:12s} {str(path):40s} {check}".rstrip())
        print(f"  {'':12s} {described[tower.split('-')[0]]}")
    if "text" in towers:
        print("  text: trim token rows to the batch's last EOT before running (clipforge.inference.trim_tokens);"
              " the output is the same and shorter rows are faster")  # fmt: skip
    if "decoder" in towers:
        print("  decoder: run it on the caption so far (SOT first) and read the last position's logits; image "
              "tokens come from the image graph's second output")  # fmt: skip
    return 0
