"""The tables behind ``clipforge models``: registered architectures with their size and cost, and
the named pretrained weights with their Hub repository and licence.

Library functions (the command only prints them), so a notebook or a script gets the same rows.
Nothing here imports torch until a size is actually computed.
"""

from __future__ import annotations

from typing import Any

from clipforge.text_table import format_columns

MODEL_HEADER = (
    "model",
    "image params (M)",
    "text params (M)",
    "image GFLOPs",
    "text GFLOPs",
    "embed dim",
    "image size",
    "towers",
)
PRETRAINED_HEADER = ("model", "tag", "hub repository", "license", "quickgelu", "size")


def models_table(name_filter: str | None = None, sizes: bool = False) -> list[dict[str, object]]:
    """One row per registered architecture whose name contains ``name_filter`` (case-insensitive).

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


def _sizes(cfg: Any, external: bool) -> tuple[float, float, float, float]:
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


def format_models(rows: list[dict[str, object]]) -> str:
    """``models_table`` rows as aligned columns (numbers right-aligned)."""
    cells = [
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
    return format_columns(MODEL_HEADER, cells, right=range(1, len(MODEL_HEADER) - 1))


def pretrained_rows(name_filter: str | None = None) -> list[dict[str, object]]:
    """One row per named weight set (no torch import)."""
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
    cells = [
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
    return format_columns(PRETRAINED_HEADER, cells, right=(5,))
