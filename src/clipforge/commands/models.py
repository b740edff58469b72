"""``clipforge models``: the registered architectures with their size and cost, and
(``--pretrained``) the named weights with their Hub repository and licence."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list model architectures (parameters, GFLOPs, embed dim)",
        description="List registered architectures. GFLOPs count one multiply-add as one FLOP "
        "(open_clip's convention); text GFLOPs are for a full 77-token context.",
    )
    p.add_argument("--filter", default=None, help="only names containing this substring (case-insensitive)")
    p.add_argument("--pretrained", action="store_true", help="list the named pretrained weights instead")
    p.set_defaults(func=run)


def models_table(name_filter: str | None = None) -> list[dict[str, object]]:
    """One row per registered architecture (library function behind the command)."""
    from clipforge.model.registry import get_model_config, list_models
    from clipforge.model.stats import model_stats

    rows = []
    for name in list_models():
        if name_filter and name_filter.lower() not in name.lower():
            continue
        cfg = get_model_config(name)
        stats = model_stats(cfg)
        rows.append(
            {
                "name": name,
                "image_params_m": stats.image_params / 1e6,
                "text_params_m": stats.text_params / 1e6,
                "image_gflops": stats.image_gflops,
                "text_gflops": stats.text_gflops,
                "embed_dim": cfg.embed_dim,
                "image_size": cfg.vision.image_size,
            }
        )
    return rows


def _num(value: object) -> str:
    value = float(value)  # tiny test models would show 0.00 with a fixed two decimals
    return f"{value:.2f}" if value >= 0.1 or value != value else f"{value:.4f}"


def format_table(rows: list[dict[str, object]]) -> str:
    header = (
        "model",
        "image params (M)",
        "text params (M)",
        "image GFLOPs",
        "text GFLOPs",
        "embed dim",
        "image size",
    )
    lines = [
        (
            str(r["name"]),
            f"{r['image_params_m']:.2f}",
            f"{r['text_params_m']:.2f}",
            _num(r["image_gflops"]),
            _num(r["text_gflops"]),
            str(r["embed_dim"]),
            str(r["image_size"]),
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*line) for line in lines)])


def pretrained_rows(name_filter: str | None = None) -> list[dict[str, object]]:
    """One row per named weight set (library function behind ``--pretrained``; no torch import)."""
    from clipforge.checkpoints.pretrained import pretrained_entries

    return [
        {
            "model": e.model,
            "tag": e.tag,
            "hf_hub": e.hf_hub,
            "license": e.license or "-",
            "quick_gelu": e.quick_gelu,
            "image_size": e.image_size or 224,
        }
        for e in pretrained_entries(name_filter)
    ]


def format_pretrained(rows: list[dict[str, object]]) -> str:
    """Aligned columns; QuickGELU tags also answer to ``<model>-quickgelu``, as in open_clip."""
    header = ("model", "tag", "hub repository", "license", "quickgelu", "size")
    lines = [
        (
            str(r["model"]),
            str(r["tag"]),
            str(r["hf_hub"]),
            str(r["license"]),
            "yes" if r["quick_gelu"] else "",
            str(r["image_size"]),
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    fmt = "  ".join(f"{{:<{w}}}" if i < 5 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*line).rstrip() for line in lines)])


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        print(format_pretrained(pretrained_rows(args.filter)))
        return 0
    print(format_table(models_table(args.filter)))
    return 0
