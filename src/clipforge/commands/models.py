"""``clipforge models``: the registered architectures with their size and cost."""

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


def _pretrained_lines(name_filter: str | None) -> list[str]:
    try:
        from clipforge.checkpoints.pretrained import list_pretrained
    except ImportError:
        return ["(no pretrained table available)"]
    pairs = [(m, t) for m, t in list_pretrained() if not name_filter or name_filter.lower() in m.lower()]
    width = max((len(m) for m, _ in pairs), default=5)
    return [f"{'model':<{width}}  tag"] + [f"{m:<{width}}  {t}" for m, t in pairs]


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        print("\n".join(_pretrained_lines(args.filter)))
        return 0
    print(format_table(models_table(args.filter)))
    return 0
