"""``clipforge demo``: the whole story on a laptop CPU in a few minutes, with no download.

1. Synthetic data: shapes with a size, colour, position and background, captioned in words.
   Six (shape, colour) combinations never appear in training ("held out").
2. Train a small CLIP on it with the real trainer (the same code path as ``clipforge train``).
3. Evaluate zero-shot classification on images of the *held-out* combinations (the model must
   compose "blue" and "circle" although it never saw a blue circle) and text->image retrieval.
4. Write the report (JSON + PNG plots + HTML) and print a summary and example searches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from clipforge.errors import ClipforgeError
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

DEMO_MODEL = "clipforge-demo"
IMAGE_SIZE = 32


def demo_model_config() -> CLIPConfig:
    """A ViT small enough for CPU training, big enough to bind colours to shapes.

    32 px images in 4 px patches keep small shapes visible (8x8 grid); captions are ~15 BPE
    tokens, so a 32-token context saves most of the text tower's work.
    """
    return CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=4, width=128, layers=3, head_width=32),
        text=TextConfig(context_length=32, width=128, heads=4, layers=3),
    )


@dataclass
class DemoSettings:
    train_samples: int
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    eval_images: int
    retrieval_images: int


FULL = DemoSettings(
    train_samples=24_000,
    epochs=2,
    batch_size=128,
    lr=2e-3,
    warmup_steps=30,
    eval_images=600,
    retrieval_images=200,
)
QUICK = replace(
    FULL, train_samples=2_048, epochs=1, batch_size=64, warmup_steps=4, eval_images=120, retrieval_images=60
)


@dataclass
class TrainedDemo:
    """What both demos (this one and ``--caption``) say about their training run: the first fields
    of their results and of demo_summary.json."""

    out_dir: str
    model_dir: str
    wall_time_s: float
    train_time_s: float
    train_steps: int
    samples_per_s: float
    first_loss: float
    final_loss: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trained_fields(out: Path, trained: Any, start: float) -> dict[str, Any]:
    """The :class:`TrainedDemo` fields of a finished training run, its wall time measured from ``start``."""
    losses = trained.loss_history
    return dict(
        out_dir=str(out),
        model_dir=trained.final_model_dir,
        wall_time_s=time.perf_counter() - start,
        train_time_s=trained.wall_time_s,
        train_steps=trained.steps,
        samples_per_s=trained.samples_per_second,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=trained.final_loss if trained.final_loss is not None else float("nan"),
    )


@dataclass
class DemoResult(TrainedDemo):
    zero_shot: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {split, acc1, chance}
    retrieval: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # split -> CLIP_benchmark recall@1/5, chance
    report_html: str = ""
    examples: str = ""


def zero_shot_templates(label: str) -> list[str]:
    """Prompts in the captions' own words: the class fills its slot, every other attribute varies.

    Captions always name size, colour, shape, position and background, so a prompt that leaves
    one out is text the model never read. The class embedding averages the prompts over the
    attributes it does not classify, exactly what CLIP's 80 ImageNet templates do for photo styles.
    """
    from clipforge.data import synthetic

    things = {"colour_shape": ["{}"], "shape": [f"{c} {{}}" for c in synthetic.COLOURS],
              "colour": [f"{{}} {s}" for s in synthetic.SHAPES]}[label]  # fmt: skip
    return [
        f"a {size} {thing} {synthetic.POSITION_PHRASES[pos]} on a {bg} background"
        for size in synthetic.SIZES
        for thing in things
        for pos in synthetic.POSITIONS
        for bg in synthetic.BACKGROUNDS
    ]


#: Which images each zero-shot task is scored on. The compositional test is colour+shape on the
#: held-out combinations. Shape or colour alone is scored on new images of seen combinations:
#: on held-out images it would be confounded, since the right shape word is the only one never
#: seen with that colour (its prompt lacks exactly the colour evidence every wrong one has).
ZERO_SHOT_SPLITS = {"colour_shape": "heldout", "shape": "val", "colour": "val"}


def _register_model() -> None:
    from clipforge.model.registry import list_models, register_model

    if DEMO_MODEL not in list_models():
        register_model(DEMO_MODEL, demo_model_config())


def train_demo_model(
    out: Path,
    settings: DemoSettings,
    seed: int,
    progress: bool,
    threads: int | None,
    *,
    model: str = DEMO_MODEL,
    loss: str = "clip",
    max_steps: int | None = None,
) -> Any:
    """Train ``model`` on the demo's training split with the real trainer (``--caption``: tiny-coca, coca)."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train

    _register_model()
    cfg = TrainConfig.from_flat(
        data=f"synthetic:shapes?n={settings.train_samples}&split=train&image_size={IMAGE_SIZE}",
        model=model,
        loss=loss,
        max_steps=max_steps,
        output_dir=str(out / "train"),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup_steps=settings.warmup_steps,
        weight_decay=0.1,
        seed=seed,
        threads=threads,
        progress=progress,
        save_every_epochs=0,
        keep_last=1,
        log_every=5,
    )
    return train(cfg)


def evaluate_demo(
    model_dir: str, out: Path, settings: DemoSettings, progress: bool
) -> tuple[dict, dict, str]:
    """Zero-shot (see ``ZERO_SHOT_SPLITS``) and retrieval on held-out and on seen combinations."""
    from clipforge.eval.datasets import load_eval_dataset
    from clipforge.eval.runner import evaluate, format_examples
    from clipforge.factory import create_model_from_pretrained, get_tokenizer

    model, preprocess = create_model_from_pretrained(pretrained=model_dir)
    model.eval()
    tokenizer = get_tokenizer(model)
    report = out / "report"
    common = {"report_dir": report, "model_name": DEMO_MODEL, "pretrained": model_dir, "progress": progress}
    zero_shot = {}
    for label, split in ZERO_SHOT_SPLITS.items():
        spec = (
            f"synthetic:shapes?split={split}&n={settings.eval_images}&label={label}&image_size={IMAGE_SIZE}"
        )
        result = evaluate(
            model,
            tokenizer,
            preprocess,
            spec,
            task="zeroshot",
            templates=zero_shot_templates(label),
            **common,
        )
        n_classes = len(result["details"]["classnames"])
        zero_shot[label] = {
            "split": split,
            "acc1": result["metrics"]["acc1"],
            "chance": 1.0 / n_classes,
            "classes": n_classes,
        }
    retrieval, examples = {}, ""
    for split in ("heldout", "val"):
        n = settings.retrieval_images
        spec = f"synthetic:shapes?split={split}&n={n}&image_size={IMAGE_SIZE}"
        dataset = load_eval_dataset(spec, task="retrieval", transform=preprocess)
        result = evaluate(model, tokenizer, preprocess, dataset, task="retrieval", num_examples=4, **common)
        m = result["metrics"]
        retrieval[split] = {
            "image_retrieval_recall@1": m["image_retrieval_recall@1"],
            "image_retrieval_recall@5": m["image_retrieval_recall@5"],
            "text_retrieval_recall@1": m["text_retrieval_recall@1"],
            "chance_R@1": 1.0 / n,
            "images": n,
        }
        if split == "heldout":
            examples = format_examples(result, dataset)
    return zero_shot, retrieval, examples


def require_plotting() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ClipforgeError(
            "clipforge demo draws its report with matplotlib, which is not installed; "
            "install it with: pip install 'clipforge[demo]'"
        )


def plot_loss(losses: list[float], path: Path, ylabel: str = "contrastive loss") -> Path:
    """Training loss per step with a moving average (written atomically, fixed pixel size)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from clipforge.atomic import atomic_write

    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, color="#9bb", lw=0.8, label="loss")
    window = max(1, len(losses) // 20)
    if len(losses) >= window:
        smooth = [sum(losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        ax.plot(range(window, len(losses) + 1), smooth, color="#1f5f8b", lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title("clipforge demo: training loss")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path


_PAGE_HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}
th,td{{text-align:left;padding:2px 14px 2px 0}} th{{font-weight:normal;color:#555}} img{{max-width:100%}}</style>
</head><body><h1>{title}</h1>
"""


def write_page(out: Path, title: str, body: str) -> Path:
    """``out/index.html``: ``body`` (HTML) under the demos' shared head, style and heading."""
    from clipforge.atomic import atomic_write_text

    path = out / "index.html"
    atomic_write_text(path, _PAGE_HEAD.format(title=title) + body + "</body></html>\n")
    return path


def write_summary(out: Path, result: TrainedDemo) -> Path:
    """``out/demo_summary.json``: the result as JSON, for scripts and the README's figures."""
    from clipforge.atomic import atomic_write_text

    path = out / "demo_summary.json"
    atomic_write_text(path, json.dumps(result.to_dict(), indent=2) + "\n")
    return path


def write_demo_page(out: Path, result: DemoResult) -> Path:
    """A top-level index.html: headline numbers, the loss curve, and a link to the full report."""
    import html

    rows = "".join(
        f"<tr><th>zero-shot {html.escape(k)} on {html.escape(v['split'])} images ({v['classes']} classes)</th>"
        f"<td>{100 * v['acc1']:.1f}%</td>"
        f"<td>chance {100 * v['chance']:.1f}%</td></tr>"
        for k, v in result.zero_shot.items()
    )
    rows += "".join(
        f"<tr><th>text&rarr;image R@1, {html.escape(k)} ({v['images']} images)</th>"
        f"<td>{100 * v['image_retrieval_recall@1']:.1f}%</td><td>chance {100 * v['chance_R@1']:.1f}%</td></tr>"
        for k, v in result.retrieval.items()
    )
    body = f"""<p>A {DEMO_MODEL} CLIP trained for {result.train_steps} steps ({result.train_time_s:.0f}s,
{result.samples_per_s:.0f} samples/s) on synthetic shapes; evaluated on shape/colour combinations it never
saw. Total wall time {result.wall_time_s:.0f}s.</p>
<table>{rows}</table>
<p><img src="loss.png" alt="training loss"></p>
<p><a href="report/index.html">Full evaluation report</a> (confusion matrices, per-class accuracy,
recall@K curves, example searches) &middot; <a href="demo_summary.json">demo_summary.json</a></p>
"""
    return write_page(out, "clipforge demo", body)


def start_demo(out_dir: str | Path, *requirements: Callable[[], None]) -> tuple[Path, float]:
    """The demo's output folder, created, and its start time. The optional packages it needs are
    checked first (plotting, then ``requirements``): a missing one fails now, not after minutes of
    training."""
    start = time.perf_counter()
    require_plotting()
    for require in requirements:
        require()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, start


def run_demo(
    out_dir: str | Path = "./clipforge-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    max_steps: int | None = None,
) -> DemoResult:
    """Generate data, train, evaluate, write the report; returns the headline numbers."""
    out, start = start_demo(out_dir)
    settings = QUICK if quick else FULL
    trained = train_demo_model(out, settings, seed, progress, threads, max_steps=max_steps)
    zero_shot, retrieval, examples = evaluate_demo(trained.final_model_dir, out, settings, progress)
    plot_loss(trained.loss_history, out / "loss.png")
    result = DemoResult(
        **trained_fields(out, trained, start),
        zero_shot=zero_shot,
        retrieval=retrieval,
        report_html=str(out / "index.html"),
        examples=examples,
    )
    write_demo_page(out, result)
    write_summary(out, result)
    return result


def format_demo_summary(result: DemoResult) -> str:
    """The terminal summary: what was trained, how well it does vs chance, where the report is."""
    lines = [
        "",
        f"clipforge demo: trained {DEMO_MODEL} for {result.train_steps} steps in {result.train_time_s:.0f}s "
        f"({result.samples_per_s:.0f} samples/s); loss {result.first_loss:.2f} -> {result.final_loss:.2f}",
        "zero-shot classification (heldout = shape/colour combinations never seen in training):",
    ]
    for label, z in result.zero_shot.items():
        lines.append(
            f"  {label:<13} {z['split']:<8} top-1 {100 * z['acc1']:5.1f}%   (chance {100 * z['chance']:.1f}%, "
            f"{z['classes']} classes)"
        )
    lines.append("text->image retrieval:")
    for split, r in result.retrieval.items():
        lines.append(
            f"  {split:<8} R@1 {100 * r['image_retrieval_recall@1']:5.1f}%  R@5 {100 * r['image_retrieval_recall@5']:5.1f}%"
            f"   (chance R@1 {100 * r['chance_R@1']:.1f}%, {r['images']} images)"
        )
    if result.examples:
        lines += [
            "example text->image searches on held-out combinations (top 5, score, ✓ = the right image):",
            result.examples,
        ]
    lines.append(f"report: {result.report_html}   (total {result.wall_time_s:.0f}s)")
    return "\n".join(lines)
