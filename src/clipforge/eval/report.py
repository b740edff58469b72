"""Evaluation report: PNG plots and an HTML page over every result JSON in a folder.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend state), are
rendered at an exact pixel size (no ``bbox_inches="tight"``, which would change it) and written
atomically, like the JSON and the HTML. ``index.html`` is rebuilt from all ``*.json`` results in
the folder each time, so several evaluations (zero-shot, then retrieval) share one page.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DPI = 100
GOOD, BAD = "#2e9d4a", "#c8352c"


# ---------------------------------------------------------------------------------------------
# figure plumbing


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    from clipforge.atomic import atomic_write
    from clipforge.eval.results import publish

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(buf.getvalue())
    return publish(path)


def _clamp(v: float, lo: int, hi: int) -> int:
    return int(round(max(lo, min(hi, v)) / 10) * 10)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# plots


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]],
    classnames: Sequence[str],
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    title: str = "Confusion matrix",
) -> Path:
    """Rows = true class, columns = predicted; colour = fraction of the row (recall), counts
    written in the cells when there are few classes."""
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    c = cm.shape[0]
    side = _clamp(260 + 42 * c, 520, 1400)
    width, height = size or (side + 120, side)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cbar.set_label("fraction of true class")
    if c <= 50:
        names = [_short(n, 18) for n in classnames]
        ax.set_xticks(range(c), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
        ax.set_yticks(range(c), names, fontsize=9)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    colour = "white" if frac[i, j] > 0.55 else "black"
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=9, color=colour)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}  (top-1 {100 * acc:.1f}%, n={int(cm.sum())})")
    return _save(fig, path)


def plot_per_class_accuracy(
    per_class: Sequence[float | None],
    classnames: Sequence[str],
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
    max_bars: int = 60,
) -> Path:
    """Horizontal bars, one per class (worst and best ``max_bars/2`` when there are more), with
    the mean per-class recall and chance level marked."""
    items = [(n, a) for n, a in zip(classnames, per_class) if a is not None]
    if not items:
        items = [("(no samples)", 0.0)]
    mean = sum(a for _, a in items) / len(items)
    chance = 1.0 / max(len(classnames), 1)
    note = ""
    if len(items) > max_bars:
        ranked = sorted(items, key=lambda t: t[1])
        items = ranked[: max_bars // 2] + ranked[-(max_bars // 2) :]
        note = f" ({max_bars // 2} worst and best of {len(per_class)})"
    width, height = size or (820, _clamp(170 + 26 * len(items), 340, 1800))
    fig = _figure(width, height)
    ax = fig.add_subplot()
    names = [_short(n) for n, _ in items][::-1]
    values = [100 * a for _, a in items][::-1]
    colours = [GOOD if v >= 100 * mean else "#4a7ebb" for v in values]
    ax.barh(range(len(values)), values, color=colours, height=0.7)
    ax.set_yticks(range(len(values)), names, fontsize=9)
    ax.set_ylim(-0.6, len(values) - 0.4)
    for y, v in enumerate(values):
        ax.text(min(v + 1, 93), y, f"{v:.0f}%", va="center", fontsize=8)
    ax.axvline(
        100 * mean,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"mean per-class recall {100 * mean:.1f}%",
    )
    ax.axvline(100 * chance, color=BAD, linestyle=":", linewidth=1.5, label=f"chance {100 * chance:.1f}%")
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("Per-class accuracy" + note)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def recall_curve(ranks: Any, max_k: int | None = None) -> tuple[list[int], list[float]]:
    """Recall@K for K = 1..max_k from 1-based ranks."""
    import numpy as np

    r = np.asarray(ranks)
    if max_k is None:
        max_k = int(r.max()) if r.size else 1
    ks = list(range(1, max_k + 1))
    if not r.size:
        return ks, [0.0] * len(ks)
    counts = np.bincount(np.clip(r, 1, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return ks, list(np.cumsum(counts) / r.size)


def plot_recall_at_k(
    metrics: Mapping[str, Any],
    path: str | os.PathLike,
    ranks: Mapping[str, Any] | None = None,
    size: tuple[int, int] = (820, 540),
) -> Path:
    """Recall@K against K (log axis) for both directions; the full curve when per-query ranks
    are available, the reported K's as markers always."""
    fig = _figure(*size)
    ax = fig.add_subplot()
    labels = {"image_retrieval": "text → image", "text_retrieval": "image → text"}
    colours = {"image_retrieval": "#4a7ebb", "text_retrieval": "#e08a1e"}
    n_max = 1
    for prefix, label in labels.items():
        points = sorted(
            (int(k.rsplit("@", 1)[1]), float(v))
            for k, v in metrics.items()
            if k.startswith(f"{prefix}_recall@")
        )
        if points:
            label += "  (" + ", ".join(f"R@{k} {100 * v:.1f}" for k, v in points) + ")"
        if ranks is not None and prefix in ranks and len(ranks[prefix]):
            n = int(metrics.get("num_images" if prefix == "image_retrieval" else "num_texts", 0)) or None
            ks, values = recall_curve(ranks[prefix], n)
            ax.plot(ks, [100 * v for v in values], color=colours[prefix], label=label, linewidth=2)
            n_max = max(n_max, len(ks))
        elif points:
            ax.plot([k for k, _ in points], [100 * v for _, v in points], color=colours[prefix], label=label)
        if points:
            ax.plot([k for k, _ in points], [100 * v for _, v in points], "o", color=colours[prefix])
        n_max = max([n_max] + [k for k, _ in points])
    n_img = metrics.get("num_images")
    if n_img:
        ks = range(1, int(n_img) + 1)
        ax.plot(ks, [100 * k / n_img for k in ks], color="gray", linestyle=":", label="chance (text → image)")
    ax.set_xscale("log")
    ax.set_xlim(1, max(n_max, 2))
    ax.set_ylim(0, 101)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("Retrieval recall@K")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    return _save(fig, path)


def plot_retrieval_examples(
    examples: Sequence[Mapping[str, Any]],
    load_image: Any,
    path: str | os.PathLike,
    size: tuple[int, int] | None = None,
) -> Path:
    """One row per text query: its top-5 images, framed green when it is the query's image."""
    from clipforge.transforms import to_rgb

    rows = max(len(examples), 1)
    width, height = size or (1000, 40 + 230 * rows)
    fig = _figure(width, height)
    fig.suptitle("Example text → image searches (top 5; green = the caption's own image)", fontsize=12)
    subfigs = fig.subfigures(rows, 1, squeeze=False)[:, 0]
    for sub, ex in zip(subfigs, examples):
        where = f"   (its image ranked #{ex['rank']})" if "rank" in ex else ""
        sub.suptitle(f'"{_short(ex["query"], 100)}"{where}', fontsize=10, x=0.01, ha="left")
        axes = sub.subplots(1, 5)
        for rank, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if rank >= len(ex["top"]):
                ax.axis("off")
                continue
            ax.imshow(to_rgb(load_image(ex["top"][rank])))  # datasets keep the file's mode
            ok = ex["correct"][rank]
            for spine in ax.spines.values():
                spine.set_edgecolor(GOOD if ok else "#bbbbbb")
                spine.set_linewidth(5 if ok else 1)
            ax.set_xlabel(f"#{rank + 1}  {ex['scores'][rank]:.3f}", fontsize=9, color=GOOD if ok else "black")
    return _save(fig, path)


def plot_caption_examples(
    examples: Sequence[Mapping[str, Any]],
    load_image: Any,
    path: str | os.PathLike,
    columns: int = 4,
) -> Path:
    """A grid of images, each with its generated caption (bold, above) and its first reference (below)."""
    import textwrap
    import warnings

    from clipforge.transforms import to_rgb

    count = max(len(examples), 1)
    cols = min(columns, count)
    rows = -(-count // cols)
    fig = _figure(260 * cols, 60 + 420 * rows)  # room for three lines above and below each image
    fig.suptitle("Generated captions (bold, above) and each image's first reference caption", fontsize=12)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(examples):
            ax.axis("off")
            continue
        ex = examples[k]
        ax.imshow(to_rgb(load_image(ex["index"])))  # datasets keep the file's mode
        refs = ex.get("references") or [""]
        ax.set_title(textwrap.fill(_short(ex["caption"], 80), 32), fontsize=9, fontweight="bold")
        score = f"  (CIDEr {ex['CIDEr']:.2f})" if "CIDEr" in ex else ""
        truth = textwrap.fill(f"truth: {_short(refs[0], 80)}", 38)
        ax.set_xlabel(f"image {ex['index']}{score}\n{truth}", fontsize=8, color="#444")
    with warnings.catch_warnings():  # glyphs DejaVu lacks (emoji, scripts) are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# report folder


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe ``text``; when cut to ``limit``, a hash of the whole keeps names distinct."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    if len(s) > limit:
        s = f"{s[: limit - 9]}_{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return s or "run"


def write_report(
    out_dir: str | os.PathLike,
    result: dict[str, Any],
    *,
    dataset: Any = None,
    ranks: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<name>.json`` plus the plots that fit the task, then rebuild ``index.html``.
    Returns ``{"json", "html", "plots"}`` with paths relative to ``out_dir``."""
    from clipforge.eval.results import write_result

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = slug(f"{result['task']}-{result['dataset']}")
    details, metrics = result.get("details", {}), result["metrics"]
    plots: list[str] = []
    if "confusion_matrix" in details:
        names = details.get("classnames") or [str(i) for i in range(len(details["confusion_matrix"]))]
        plots.append(
            plot_confusion_matrix(details["confusion_matrix"], names, out / f"{name}-confusion.png").name
        )
        plots.append(
            plot_per_class_accuracy(details["per_class_accuracy"], names, out / f"{name}-per-class.png").name
        )
    if result["task"] == "zeroshot_retrieval":
        plots.append(plot_recall_at_k(metrics, out / f"{name}-recall.png", ranks).name)
        if details.get("examples") and dataset is not None:
            grid = plot_retrieval_examples(
                details["examples"], dataset.load_image, out / f"{name}-examples.png"
            )
            plots.append(grid.name)
    if result["task"] == "captioning" and details.get("examples") and dataset is not None:
        grid = plot_caption_examples(details["examples"], dataset.load_image, out / f"{name}-captions.png")
        plots.append(grid.name)
    info = {"json": f"{name}.json", "html": "index.html", "plots": plots}
    write_result({**result, "report": info}, out / info["json"])
    write_index(out)
    log.info("report written to %s", out / "index.html")
    return info


def _load_results(out: Path) -> list[dict[str, Any]]:
    results = []
    for p in sorted(out.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict) and "task" in data:
            data.setdefault("report", {"json": p.name, "plots": []})
            results.append(data)
    return results


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    from clipforge.eval.captioning import METRICS as CAPTION_METRICS

    rows = []
    for k, v in metrics.items():
        if isinstance(v, float) and ("acc" in k or "recall" in k):
            shown = f"{100 * v:.2f}%"
        elif isinstance(v, float) and k in CAPTION_METRICS:  # BLEU, METEOR, ROUGE-L, CIDEr
            shown = f"{v:.4f}"
        else:
            shown = html.escape(str(v))
        rows.append(f"<tr><th>{html.escape(k)}</th><td>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_index(out_dir: str | os.PathLike, title: str = "clipforge evaluation report") -> Path:
    """An HTML page with one section per result: headline metrics, plots, timings, versions."""
    from clipforge.atomic import atomic_write_text
    from clipforge.eval.results import publish

    out = Path(out_dir)
    sections = []
    for r in _load_results(out):
        rep = r.get("report", {})
        plots = "".join(
            f'<figure><a href="{html.escape(p)}"><img src="{html.escape(p)}" alt="{html.escape(p)}"></a></figure>'
            for p in rep.get("plots", [])
        )
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in r.get("timings", {}).items())
        versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
        sections.append(
            f"<section><h2>{html.escape(r['task'])} — {html.escape(str(r.get('dataset')))}</h2>"
            f"<p>model <b>{html.escape(str(r.get('model')))}</b> {html.escape(str(r.get('pretrained') or ''))}"
            f' · <a href="{html.escape(rep.get("json", ""))}">JSON</a></p>'
            f"{_metrics_table(r['metrics'])}<div class=plots>{plots}</div>"
            f"<p class=small>timings: {html.escape(timings)}<br>versions: {html.escape(versions)}"
            f"<br>created {html.escape(str(r.get('created', '')))}</p></section>"
        )
    body = "".join(sections) or "<p>No results yet.</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
section {{ border-top: 1px solid #ddd; padding-top: 1em; margin-top: 1.5em; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; font-variant-numeric: tabular-nums; }}
th {{ font-weight: normal; color: #555; }}
.plots img {{ max-width: 100%; border: 1px solid #eee; }}
figure {{ margin: 1em 0; }}
.small {{ color: #777; font-size: 85%; }}
</style></head>
<body><h1>{html.escape(title)}</h1>{body}</body></html>
"""
    path = out / "index.html"
    atomic_write_text(path, page)
    return publish(path)
