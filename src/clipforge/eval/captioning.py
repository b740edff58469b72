"""Captioning evaluation (``clipforge eval --task captioning``): generate, then score with pycocoevalcap.

The scores are the COCO caption toolkit's, computed the way CLIP_benchmark's ``captioning`` task
computes them, so numbers are comparable with theirs:

- references are grouped per image (every caption the dataset has for it: several table columns,
  a JSON list, the lines of a ``.txt`` sidecar or of a shard's ``txt``), the candidate is the one
  generated caption;
- references and candidates are tokenized separately by the Stanford PTB tokenizer (lower-cased,
  punctuation removed), as CLIP_benchmark does;
- BLEU-1..4 (``closest`` reference length), METEOR 1.5, ROUGE-L and CIDEr-D then run on the
  tokenized text. Metric names are CLIP_benchmark's: ``Bleu_1`` .. ``Bleu_4``, ``METEOR``,
  ``ROUGE_L``, ``CIDEr``. SPICE, which CLIP_benchmark also runs, is left out: it downloads
  Stanford CoreNLP models at first use, which a machine without internet cannot do.

CIDEr-D weighs n-grams by their document frequency *over the evaluated references*, so a CIDEr is
a property of the whole set (a subset gives a different value), exactly as in pycocoevalcap.

Both the PTB tokenizer and METEOR are Java programs shipped inside pycocoevalcap: without a
``java`` on ``PATH`` (Debian: ``apt-get install default-jre-headless``) this fails up front with
a message instead of deep inside a subprocess.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

from clipforge.errors import ClipforgeError

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
HEADLINE = {
    "Bleu_1": "BLEU-1",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr",
}


def require_toolkit() -> None:
    """Fail early, naming what to install, when pycocoevalcap or Java is missing."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ClipforgeError(
            "captioning metrics need pycocoevalcap: pip install 'clipforge[caption]' (or pycocoevalcap)"
        ) from None
    if shutil.which("java") is None:
        raise ClipforgeError(
            "captioning metrics need Java (pycocoevalcap's PTB tokenizer and METEOR are Java programs): "
            "no 'java' on PATH; on Debian/Ubuntu: apt-get install default-jre-headless"
        )


def _check_inputs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ClipforgeError(
            f"captioning metrics: {len(candidates)} candidates but {len(references)} reference lists"
        )
    if not candidates:
        raise ClipforgeError("captioning metrics: no captions to score")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise ClipforgeError(
            f"captioning metrics: {len(empty)} image(s) have no reference caption (first: position {empty[0]})"
        )


def _close_meteor(meteor: Any) -> None:
    """Stop METEOR's JVM now (pycocoevalcap only does it when the object is collected)."""
    proc = getattr(meteor, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def caption_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(corpus scores, per-image scores) of ``candidates[i]`` against ``references[i]`` (a list each).

    Keys are :data:`METRICS`. Raises :class:`ClipforgeError` for mismatched lengths, an image
    without references, or a missing toolkit/Java.
    """
    _check_inputs(candidates, references)
    require_toolkit()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    corpus: dict[str, float] = {}
    per_image: dict[str, list[float]] = {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        corpus[f"Bleu_{n + 1}"], per_image[f"Bleu_{n + 1}"] = float(bleu[n]), [float(s) for s in bleu_each[n]]
    meteor = Meteor()
    try:
        score, each = meteor.compute_score(gts, res)
    finally:
        _close_meteor(meteor)
    corpus["METEOR"], per_image["METEOR"] = float(score), [float(s) for s in each]
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        score, each = scorer.compute_score(gts, res)
        corpus[name], per_image[name] = float(score), [float(s) for s in each]
    return corpus, per_image


def spread(count: int, total: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)``: report examples from the whole set."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    step = (total - 1) / max(count - 1, 1)
    return sorted({round(i * step) for i in range(count)})
