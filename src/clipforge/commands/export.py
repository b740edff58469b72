"""``clipforge export``: image and text towers to ONNX (verified with onnxruntime) or torch.export."""

from __future__ import annotations

import argparse

from clipforge.commands._model_options import add_model_argument, model_argument


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export the image/text towers to ONNX or a torch.export program",
        description="Write image.onnx and text.onnx (dynamic batch; text also dynamic length) and check "
        "them against PyTorch with onnxruntime (max abs diff must stay below --atol).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--pretrained", default=None, help="weights: a tag, a path or hf-hub:org/name")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--towers", default="image,text", help="comma-separated: image, text")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    p.add_argument(
        "--int8", action="store_true", help="also write <tower>.int8.onnx (dynamic int8, CPU fast path)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--atol", type=float, default=1e-4)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipforge.errors import ConfigError
    from clipforge.export import TOWERS, export_onnx, export_program
    from clipforge.model.factory import create_model

    towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
    unknown = sorted(set(towers) - set(TOWERS))
    if unknown or not towers:
        raise ConfigError(f"--towers: unknown {unknown or 'empty'}; choose from {', '.join(TOWERS)}")
    model = create_model(model_argument(args), args.pretrained).eval()
    if args.format == "torch-export":
        result = export_program(model, args.out, towers=towers)
    else:
        result = export_onnx(
            model, args.out, towers=towers, opset=args.opset, dynamo=args.dynamo,
            verify=not args.no_verify, atol=args.atol, int8=args.int8,
        )  # fmt: skip
    cfg = model.config
    size, ctx = cfg.vision.image_size, cfg.text.context_length
    inputs = {"image": f"images float32 [batch, 3, {size}, {size}]", "text": f"tokens int64 [batch, <={ctx}]"}
    what = "torch.export programs" if args.format == "torch-export" else f"ONNX (opset {args.opset})"
    print(f"{model.architecture} ({args.pretrained or 'random weights'}) -> {what} in {args.out}; "
          f"outputs: features float32 [batch, {cfg.embed_dim}], not L2-normalised")  # fmt: skip
    for tower, path in result.paths.items():
        diff, cos = result.max_abs_diff.get(tower), result.min_cos.get(tower)
        check = f"max abs diff vs PyTorch {diff:.2e}" if diff is not None else ""
        check += f"min cosine vs float32 {cos:.5f}" if cos is not None else ""
        print(f"  {tower:10s} {str(path):40s} {inputs[tower.split('-')[0]]:36s} {check}".rstrip())
    if "text" in towers:
        print("  text: trim token rows to the batch's last EOT before running (clipforge.inference.trim_tokens);"
              " the output is the same and shorter rows are faster")  # fmt: skip
    return 0
