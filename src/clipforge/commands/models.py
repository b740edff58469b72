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
    p.add_argument(
        "--sizes",
        action="store_true",
        help="also count parameters of timm / Hugging Face towers (builds each on the meta device: slow; "
        "a Hugging Face tower needs its config locally)",
    )
    p.set_defaults(func=run)


def models_table(name_filter: str | None = None, sizes: bool = False) -> list[dict[str, object]]:
    """One row per registered architecture (library function behind the command).

    Towers from timm or Hugging Face are sized only with ``sizes=True`` (building a timm trunk,
    even on the meta device, costs about a second; a Hugging Face tower needs its config): their
    counts are NaN otherwise, and the ``towers`` column says what they are.
    """
    from clipforge.model.registry import get_model_config, list_models, tower_kinds

    rows = []
    for name in list_models():
        if name_filter and name_filter.lower() not in name.lower():
            continue
        cfg = get_model_config(name)
        image_p, text_p, image_f, text_f = _sizes(cfg, sizes)
        rows.append(
            {
                "name": name,
                "image_params_m": image_p / 1e6,
                "text_params_m": text_p / 1e6,
                "image_gflops": image_f,
                "text_gflops": text_f,
                "embed_dim": cfg.embed_dim,
                "image_size": cfg.vision.image_size,
                "towers": " + ".join(tower_kinds(cfg)),
            }
        )
    return rows


def _sizes(cfg: object, external: bool) -> tuple[float, float, float, float]:
    """(image params, text params, image GFLOPs, text GFLOPs); NaN where not computed."""
    from clipforge.model.stats import model_stats

    nan = float("nan")
    if cfg.vision.timm_model_name is None and cfg.text.hf_model_name is None or external:
        try:
            stats = model_stats(cfg)
        except Exception:  # noqa: BLE001 - e.g. a Hugging Face config not available offline
            return nan, nan, nan, nan
        return stats.image_params, stats.text_params, stats.image_gflops, stats.text_gflops
    return nan, nan, nan, nan


def _num(value: object, small: int = 4) -> str:
    value = float(value)  # tiny test models would show 0.00 with a fixed two decimals
    if value != value:
        return "-"  # not computed (timm / Hugging Face towers without --sizes)
    return f"{value:.2f}" if value >= 0.1 else f"{value:.{small}f}"


def format_table(rows: list[dict[str, object]]) -> str:
    header = (
        "model",
        "image params (M)",
        "text params (M)",
        "image GFLOPs",
        "text GFLOPs",
        "embed dim",
        "image size",
        "towers",
    )
    lines = [
        (
            str(r["name"]),
            _num(r["image_params_m"], 2),
            _num(r["text_params_m"], 2),
            _num(r["image_gflops"]),
            _num(r["text_gflops"]),
            str(r["embed_dim"]),
            str(r["image_size"]),
            str(r.get("towers", "")),
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)
    ]
    last = len(widths) - 1
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, last) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row).rstrip() for row in [header, *lines])


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
            str(r.get("towers", "")),
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
    print(format_table(models_table(args.filter, sizes=args.sizes)).rstrip())
    return 0
