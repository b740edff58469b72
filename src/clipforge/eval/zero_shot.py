"""Zero-shot classification: class names x prompt templates -> a linear classifier, then accuracy.

The classifier follows CLIP: every prompt is encoded and L2-normalised, the prompts of one class
are averaged, and the mean is renormalised. Prompts of all classes are encoded in flat batches of
``batch_size`` (not one class at a time), which keeps the text tower busy when there are many
classes with few templates or few classes with many templates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from clipforge.eval.templates import TemplateSpec, format_template, resolve_templates
from clipforge.model import prepack

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Evaluate with dropout/BN in eval mode (and, as nothing writes the weights meanwhile, on
    prepacked CPU linears: :func:`clipforge.model.prepack.frozen`), then give the model back in
    the mode we found it."""
    was_training = model.training
    model.eval()
    try:
        with prepack.frozen(model):
            yield model
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Images are fed in the model's floating dtype, so a bf16/fp16 model needs no autocast."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: TemplateSpec = "imagenet",
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Return class weights ``[embed_dim, num_classes]`` (float32, unit columns) on ``device``.

    ``templates`` is "imagenet" (CLIP's 80), "simple" (7), a file with one ``{}`` template per
    line, or a list of templates.
    """
    if not classnames:
        raise ValueError("zero_shot_classifier: classnames is empty")
    prompts = resolve_templates(templates)
    device = torch.device(device) if device is not None else model_device(model)
    texts = [format_template(t, c) for c in classnames for t in prompts]  # class-major: [C * T]
    # Identical prompts (ImageNet names "crane" and "maillot" twice) are encoded once.
    unique = list(dict.fromkeys(texts))
    where = {text: i for i, text in enumerate(unique)}
    chunks = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(unique), batch_size):
            tokens = tokenizer(unique[start : start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    order = torch.tensor([where[text] for text in texts], device=device)
    emb = torch.cat(chunks)[order].reshape(len(classnames), len(prompts), -1).mean(dim=1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    log.debug("zero-shot classifier: %d classes x %d templates", len(classnames), len(prompts))
    return emb.T.contiguous()


def accuracy_metrics(
    logits_or_preds: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    topk: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Pure metric function: logits ``[N, C]`` (or predictions ``[N]``) and labels ``[N]``.

    CLIP_benchmark's keys mean what ``clip_benchmark.metrics.zeroshot_classification`` computes
    on the same logits, ties included: ``acc{k}`` is membership of the label in ONE
    ``logits.topk(max k)`` call (sorted; ``acc1`` is its first column), ``max k`` taken over the
    k's that fit the class count (CLIP_benchmark: (1, 5), or (1,) under 5 classes); a k above the
    class count is clipped (every label is within the top-C, so 1.0; CLIP_benchmark writes NaN
    there). ``mean_per_class_recall`` is sklearn's balanced accuracy of ``logits.argmax`` (the
    first maximum on ties), over the classes that occur in ``labels``; ``per_class_accuracy``
    (None for classes without samples) and ``confusion_matrix`` (rows = true class, columns =
    predicted) use the same argmax predictions.

    Tie-independent extras: ``acc{k}_pessimistic`` (rank = 1 + classes scoring >= the label's
    score) and ``acc{k}_boundary_ties``, the samples whose top-k hit depends on how ties are broken.
    With bare predictions only acc1 can be computed.
    """
    acc = _Accumulator(num_classes or _infer_classes(logits_or_preds, labels), topk)
    acc.update(logits_or_preds, labels)
    return acc.result()


def _infer_classes(x: torch.Tensor, labels: torch.Tensor) -> int:
    if x.ndim == 2:
        return x.shape[1]
    return int(max(x.max().item(), labels.max().item())) + 1 if labels.numel() else 1


class _Accumulator:
    """Streaming top-k counts and confusion matrix, so evaluation never keeps all logits."""

    def __init__(self, num_classes: int, topk: Sequence[int]) -> None:
        self.num_classes = num_classes
        self.topk = tuple(topk)
        self.correct = dict.fromkeys(self.topk, 0)
        self.pessimistic = dict.fromkeys(self.topk, 0)
        self.boundary_ties = dict.fromkeys(self.topk, 0)
        self.has_logits = True
        self.n = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.detach().to("cpu", torch.long).reshape(-1)
        x = x.detach().cpu()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}"
            )
        if x.ndim == 2:
            if x.shape[1] != self.num_classes:
                raise ValueError(f"logits have {x.shape[1]} columns, expected {self.num_classes} classes")
            x = x.float()
            self._count_topk(x, labels)
            self._count_ties(x, labels)
            preds = x.argmax(dim=1)  # CLIP_benchmark's prediction: the first maximum
        else:
            self.has_logits = False
            preds = x.to(torch.long).reshape(-1)
        if preds.shape != labels.shape:
            raise ValueError(f"{preds.shape[0]} predictions but {labels.shape[0]} labels")
        self.confusion += torch.bincount(
            labels * self.num_classes + preds, minlength=self.num_classes**2
        ).reshape(self.num_classes, self.num_classes)
        self.n += labels.numel()

    def _count_topk(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """CLIP_benchmark's ``accuracy``: one sorted ``topk`` with the largest k that fits, then
        label membership in its first k columns (its tie choice can differ from topk(k))."""
        fits = [k for k in self.topk if k <= self.num_classes]
        if fits:
            top = x.topk(max(fits), dim=1, largest=True, sorted=True).indices
            hits = top == labels[:, None]
        for k in self.topk:
            self.correct[k] += int(hits[:, :k].any(dim=1).sum()) if k in fits else labels.numel()

    def _count_ties(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """Pessimistic top-k hits, and the samples whose hit a tie decides."""
        own = x.gather(1, labels[:, None])
        optimistic = (x > own).sum(dim=1) + 1
        pessimistic = (x >= own).sum(dim=1)  # the label's own column counts as the 1
        for k in self.topk:
            self.pessimistic[k] += int((pessimistic <= k).sum())
            self.boundary_ties[k] += int(((optimistic <= k) & (pessimistic > k)).sum())

    def result(self) -> dict[str, Any]:
        support = self.confusion.sum(dim=1)
        diag = self.confusion.diagonal()
        per_class = [(int(d) / int(s)) if s > 0 else None for d, s in zip(diag, support)]
        present = [p for p in per_class if p is not None]
        out: dict[str, Any] = {}
        n = max(self.n, 1)
        if self.has_logits:
            for k in self.topk:
                out[f"acc{k}"] = self.correct[k] / n
            for k in self.topk:
                out[f"acc{k}_pessimistic"] = self.pessimistic[k] / n
                out[f"acc{k}_boundary_ties"] = self.boundary_ties[k]
        else:
            out["acc1"] = int(diag.sum()) / n
        out["mean_per_class_recall"] = sum(present) / len(present) if present else 0.0
        out["per_class_accuracy"] = per_class
        out["confusion_matrix"] = self.confusion.tolist()
        out["num_samples"] = self.n
        out["num_classes"] = self.num_classes
        return out


def evaluate_zero_shot(
    model: torch.nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classifier: torch.Tensor,
    device: torch.device | str | None = None,
    *,
    topk: Sequence[int] = (1, 5),
    progress: bool = False,
) -> dict[str, Any]:
    """Classify every ``(images, labels)`` batch with ``classifier`` (from ``zero_shot_classifier``).

    Logits are ``(100 * image_features) @ classifier`` in float32, CLIP_benchmark's formula
    (without autocast): scaling by 100 can merge nearly equal float32 scores into ties, so the
    same numbers are ranked, not merely the same order.
    """
    device = torch.device(device) if device is not None else model_device(model)
    classifier = classifier.to(device, torch.float32)
    acc = _Accumulator(classifier.shape[1], topk)
    batches = _maybe_tqdm(dataloader, progress, "zero-shot")
    dtype = model_dtype(model)
    with eval_mode(model), torch.inference_mode():
        for images, labels in batches:
            feats = F.normalize(model.encode_image(images.to(device, dtype)).float(), dim=-1)
            acc.update(cb_logits(feats, classifier), torch.as_tensor(labels))
    return acc.result()


def cb_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """CLIP_benchmark's zero-shot logits, ``100. * image_features @ classifier`` (the scale is
    applied to the features first, as Python evaluates that expression), in float32."""
    return (100.0 * image_features.float()) @ classifier.float()


def _maybe_tqdm(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)
