"""``clipforge demo --caption``: the demo's story for captioning, on a laptop CPU with no download.

1. Train ``tiny-coca`` with ``--loss coca`` (contrastive + caption cross-entropy) on the demo's
   synthetic shapes, with the demo's trainer call (:func:`clipforge.demo.train_demo_model`).
2. Caption images of the *held-out* shape/colour combinations (never seen in training) through
   ``clipforge eval --task captioning``'s code path, and score them with pycocoevalcap.
3. Put the scores next to two baselines a captioner has to beat: the most frequent training
   caption given to every image (the best one fixed answer that ignores the image can do) and the
   same model untrained (what the weights training starts from say).
4. Say per attribute how often a caption names the truth (size, colour, shape, position,
   background): the aggregate scores hide that a small model names some attributes from the
   image and guesses others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from clipforge.demo import (
    FULL,
    IMAGE_SIZE,
    DemoSettings,
    TrainedDemo,
    plot_loss,
    start_demo,
    train_demo_model,
    trained_fields,
    write_page,
    write_summary,
)

CAPTION_MODEL = "tiny-coca"
SPLIT = "heldout"
#: open_clip's generate defaults (beam search, 6 beams in 3 groups), bounded to the captions'
#: length: a shapes caption is at most 13 tokens plus SOT and EOT.
GENERATION: dict[str, Any] = {"seq_len": 20}
LOSS_LABEL = "loss (contrastive + 2 x caption cross-entropy)"

# ``eval_images`` are the held-out images captioned; ``retrieval_images`` is unused here.
CAPTION_FULL = replace(
    FULL, train_samples=6_400, epochs=1, batch_size=32, warmup_steps=10, eval_images=200, retrieval_images=0
)
CAPTION_QUICK = replace(CAPTION_FULL, train_samples=3_200, warmup_steps=5, eval_images=60)
CAPTIONERS = {
    "trained": f"{CAPTION_MODEL} (trained)",
    "most_frequent_caption": "most frequent training caption",
    "untrained": f"{CAPTION_MODEL} (untrained)",
}


@dataclass
class CaptionDemoResult(TrainedDemo):
    split: str
    images: int
    generation: dict[str, Any]
    baseline_caption: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # captioner -> metric -> value
    attributes: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # captioner -> attribute -> accuracy
    report_html: str = ""
    examples: str = ""


def most_frequent_caption(n: int) -> str:
    """The commonest caption of the first ``n`` training images (ties: the first seen)."""
    from clipforge.data.synthetic import SyntheticShapes

    counts = Counter(c for caps in SyntheticShapes(n, split="train").all_captions for c in caps)
    return counts.most_common(1)[0][0]


def attributes(caption: str) -> dict[str, str]:
    """The attributes a full-style shapes caption names ("" where it names none)."""
    from clipforge.data import synthetic

    words = caption.split()
    found = {
        "size": next((w for w in words if w in synthetic.SIZES), ""),
        "colour": next((w for w in words[:3] if w in synthetic.COLOURS), ""),
        "shape": next((w for w in words if w in synthetic.SHAPES), ""),
        "position": next((k for k, v in synthetic.POSITION_PHRASES.items() if v in caption), ""),
    }
    tail = caption.rsplit(" on a ", 1)
    found["background"] = tail[1].removesuffix(" background") if len(tail) == 2 else ""
    found["colour+shape"] = f"{found['colour']} {found['shape']}"
    return found


def attribute_accuracy(candidates: list[str], truths: list[str]) -> dict[str, float]:
    """Per attribute, the fraction of images whose caption names the true value."""
    pairs = [(attributes(c), attributes(t)) for c, t in zip(candidates, truths)]
    return {k: sum(c[k] == t[k] for c, t in pairs) / len(pairs) for k in pairs[0][1]}


def _untrained_model(seed: int) -> torch.nn.Module:
    """``tiny-coca`` as training starts from it (the trainer seeds torch with the run's seed, then builds)."""
    from clipforge.factory import create_model

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return create_model(CAPTION_MODEL).eval()
    finally:
        torch.random.set_rng_state(state)


@dataclass
class CaptionScores:
    """Every captioner's scores and attribute accuracy on the same held-out images."""

    images: int
    baseline_caption: str
    scores: dict[str, dict[str, float]]
    attributes: dict[str, dict[str, float]]
    examples: str


def evaluate_captions(
    model_dir: str, out: Path, settings: DemoSettings, seed: int, progress: bool
) -> CaptionScores:
    """Caption the held-out images with the trained and the untrained model; score them and the fixed baseline."""
    from clipforge.eval.captioning import caption_scores
    from clipforge.eval.datasets import load_eval_dataset
    from clipforge.eval.runner import evaluate, format_caption_examples
    from clipforge.factory import create_model_from_pretrained, get_tokenizer

    model, preprocess = create_model_from_pretrained(pretrained=model_dir)
    tokenizer = get_tokenizer(model)
    spec = f"synthetic:shapes?split={SPLIT}&n={settings.eval_images}&image_size={IMAGE_SIZE}"
    dataset = load_eval_dataset(spec, task="retrieval", transform=preprocess)
    common = {"task": "captioning", "generate_options": GENERATION, "seed": seed, "progress": progress}
    trained = evaluate(
        model.eval(), tokenizer, preprocess, dataset, report_dir=out / "report", model_name=CAPTION_MODEL,
        pretrained=model_dir, num_examples=6, **common,
    )  # fmt: skip
    untrained = evaluate(_untrained_model(seed), tokenizer, preprocess, dataset, num_examples=0, **common)
    baseline = most_frequent_caption(settings.train_samples)
    references = [dataset.captions[c["index"]] for c in trained["details"]["captions"]]
    fixed, _ = caption_scores([baseline] * len(references), references)
    truths = [refs[0] for refs in references]
    candidates = {
        "trained": [c["caption"] for c in trained["details"]["captions"]],
        "most_frequent_caption": [baseline] * len(references),
        "untrained": [c["caption"] for c in untrained["details"]["captions"]],
    }
    scores = {
        "trained": trained["metrics"],
        "most_frequent_caption": fixed,
        "untrained": untrained["metrics"],
    }
    scores = {k: {m: float(v) for m, v in s.items() if m in fixed} for k, s in scores.items()}
    accuracy = {k: attribute_accuracy(c, truths) for k, c in candidates.items()}
    return CaptionScores(len(references), baseline, scores, accuracy, format_caption_examples(trained))


def _captioner_rows(
    table: dict[str, dict[str, float]], columns: Iterable[str], cell: Callable[[float], str]
) -> str:
    """One HTML row per captioner: its name, then ``cell(value)`` for each of ``columns``."""
    import html

    return "".join(
        f"<tr><th>{html.escape(CAPTIONERS[k])}</th>"
        + "".join(f"<td>{cell(v[c])}</td>" for c in columns)
        + "</tr>"
        for k, v in table.items()
    )


def write_caption_page(out: Path, result: CaptionDemoResult) -> Path:
    """A top-level index.html: the score table, the loss curve, and a link to the captioning report."""
    import html

    from clipforge.eval.captioning import HEADLINE

    head = "".join(f"<th>{html.escape(v)}</th>" for v in HEADLINE.values())
    rows = _captioner_rows(result.scores, HEADLINE, lambda x: f"{x:.3f}")
    attrs = list(next(iter(result.attributes.values())))
    arows = _captioner_rows(result.attributes, attrs, lambda x: f"{100 * x:.1f}%")
    body = f"""<p>{CAPTION_MODEL} trained with the coca loss for {result.train_steps} steps ({result.train_time_s:.0f}s,
{result.samples_per_s:.0f} samples/s) on synthetic shapes, then captioning {result.images} images of shape/colour
combinations it never saw (beam search). Total wall time {result.wall_time_s:.0f}s.</p>
<table><tr><th></th>{head}</tr>{rows}</table>
<p>Attribute named correctly:</p>
<table><tr><th></th>{"".join(f"<th>{html.escape(x)}</th>" for x in attrs)}</tr>{arows}</table>
<p><img src="loss.png" alt="training loss"></p>
<p><a href="report/index.html">Captioning report</a> (example images with their captions) &middot;
<a href="demo_summary.json">demo_summary.json</a></p>
"""
    return write_page(out, "clipforge demo --caption", body)


def run_caption_demo(
    out_dir: str | Path = "./clipforge-demo-caption",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    max_steps: int | None = None,
) -> CaptionDemoResult:
    """Train tiny-coca, caption held-out combinations, score against the baselines, write the report."""
    from clipforge.eval.captioning import require_toolkit

    out, start = start_demo(out_dir, require_toolkit)
    settings = CAPTION_QUICK if quick else CAPTION_FULL
    trained = train_demo_model(
        out, settings, seed, progress, threads, model=CAPTION_MODEL, loss="coca", max_steps=max_steps
    )
    scored = evaluate_captions(trained.final_model_dir, out, settings, seed, progress)
    plot_loss(trained.loss_history, out / "loss.png", ylabel=LOSS_LABEL)
    result = CaptionDemoResult(
        **trained_fields(out, trained, start),
        split=SPLIT,
        images=scored.images,
        generation=dict(GENERATION),
        baseline_caption=scored.baseline_caption,
        scores=scored.scores,
        attributes=scored.attributes,
        report_html=str(out / "index.html"),
        examples=scored.examples,
    )
    write_caption_page(out, result)
    write_summary(out, result)
    return result


def format_caption_demo_summary(result: CaptionDemoResult) -> str:
    """The terminal summary: scores against the baselines, attributes, example captions, the report."""
    from clipforge.eval.captioning import HEADLINE

    width = max(map(len, CAPTIONERS.values()))
    lines = [
        "",
        f"clipforge demo --caption: trained {CAPTION_MODEL} (loss coca) for {result.train_steps} steps in "
        f"{result.train_time_s:.0f}s ({result.samples_per_s:.0f} samples/s); loss {result.first_loss:.2f} -> "
        f"{result.final_loss:.2f}",
        f"captions of {result.images} held-out images (shape/colour combinations never seen in training), "
        "beam search:",
        f"  {'':<{width}}  " + "  ".join(f"{v:>7}" for v in HEADLINE.values()),
    ]
    for key, s in result.scores.items():
        lines.append(f"  {CAPTIONERS[key]:<{width}}  " + "  ".join(f"{s[m]:7.3f}" for m in HEADLINE))
    lines.append(f"  (most frequent training caption: {result.baseline_caption!r})")
    attrs = list(next(iter(result.attributes.values())))
    lines.append("attribute named correctly:")
    lines.append(f"  {'':<{width}}  " + "  ".join(f"{a:>12}" for a in attrs))
    for key, acc in result.attributes.items():
        lines.append(f"  {CAPTIONERS[key]:<{width}}  " + "  ".join(f"{100 * acc[a]:11.1f}%" for a in attrs))
    if result.examples:
        lines += ["example captions of held-out images (the truth below each):", result.examples]
    lines.append(f"report: {result.report_html}   (total {result.wall_time_s:.0f}s)")
    return "\n".join(lines)
