"""One call from (model, tokenizer, preprocess, dataset) to a results record (and a report).

This is what the CLI, the trainer's periodic evaluation and ``clipforge demo`` share::

    result = evaluate(model, tokenizer, preprocess, "synthetic:shapes?split=heldout",
                      task="zeroshot", report_dir="out/")
    result["metrics"]["acc1"]

The record is :func:`clipforge.eval.results.make_result`'s CLIP_benchmark-shaped dict. With
``report_dir`` the JSON, PNG plots and an ``index.html`` (covering every result in the folder)
are written there; with ``output`` the JSON alone goes to that path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import ClipforgeError
from clipforge.eval.datasets import (
    EvalDataset,
    as_eval_dataset,
    encode_texts,
    extract_features,
    make_loader,
)
from clipforge.eval.results import benchmark_task, make_result, write_result
from clipforge.eval.templates import TemplateSpec, resolve_templates
from clipforge.model.architecture import config_record, model_label

log = logging.getLogger(__name__)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess: Callable | None,
    dataset: Any,
    *,
    task: str = "zeroshot",
    templates: TemplateSpec | None = None,
    classnames: Sequence[str] | None = None,
    train_dataset: Any = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
    model_name: str = "",
    pretrained: str | None = None,
    dataset_name: str | None = None,
    report_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    num_examples: int = 6,
    progress: bool = False,
    seed: int = 0,
    generate_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``dataset`` (an :class:`EvalDataset`, a ``--data`` spec string, or a
    clipforge/torchvision dataset) for ``task`` in {"zeroshot", "retrieval", "linear-probe",
    "captioning"}.

    ``preprocess`` turns a PIL image into the model's input tensor. Linear probe trains on
    ``train_dataset`` if given, else on a seeded random half of ``dataset``. Captioning (a CoCa)
    generates with ``generate_options`` (:func:`clipforge.model.generate.generate`'s keywords;
    open_clip's beam-search defaults, as CLIP_benchmark) and scores against every reference.
    """
    bench_task = benchmark_task(task)
    t0 = time.perf_counter()
    ds = _eval_set(dataset, bench_task, preprocess)
    run = _Run(model, tokenizer, ds, device, {"batch_size": batch_size, "num_workers": num_workers}, progress)
    tasks = {  # each task's method, called for the one asked for
        "zeroshot_classification": lambda: run.zero_shot(templates, classnames),
        "zeroshot_retrieval": lambda: run.retrieval(ks, num_examples),
        "captioning": lambda: run.captioning(num_examples, dict(generate_options or {}), seed),
        "linear_probe": lambda: run.linear_probe(_probe_train_set(train_dataset, preprocess), seed),
    }
    metrics, details, config = tasks[bench_task]()
    run.timings["total"] = time.perf_counter() - t0
    config.update({"batch_size": batch_size, "device": str(run.device), "num_images": len(ds)})
    result = make_result(
        dataset=dataset_name or ds.name,
        model=model_label(model, model_name or None) or type(model).__name__,
        model_config=config_record(model),  # the architecture itself, not only its name
        pretrained=pretrained,
        task=task,
        metrics=metrics,
        details=details,
        timings=run.timings,
        config=config,
    )
    _publish(result, output, report_dir, ds, run)
    return result


def _eval_set(dataset: Any, bench_task: str, preprocess: Callable | None) -> EvalDataset:
    """``dataset`` as the EvalDataset the task reads: captions per image for retrieval and
    captioning, class labels for classification and the linear probe."""
    kind = "retrieval" if bench_task in ("zeroshot_retrieval", "captioning") else "classification"
    return as_eval_dataset(dataset, task=kind, transform=preprocess)


def _probe_train_set(train_dataset: Any, preprocess: Callable | None) -> EvalDataset | None:
    """The linear probe's training set as an EvalDataset (None: the probe splits the eval set)."""
    return as_eval_dataset(train_dataset, transform=preprocess) if train_dataset is not None else None


def _publish(
    result: dict[str, Any],
    output: str | os.PathLike | None,
    report_dir: str | os.PathLike | None,
    ds: EvalDataset,
    run: _Run,
) -> None:
    """Write the JSON to ``output`` and/or the report (JSON, plots, index.html) to ``report_dir``."""
    if output is not None:
        write_result(result, output)
    if report_dir is not None:
        from clipforge.eval.report import write_report

        result["report"] = write_report(report_dir, result, dataset=ds, ranks=run.ranks)


class _Run:
    """State shared by the task methods: model, data, device and the timings they record."""

    def __init__(self, model, tokenizer, ds: EvalDataset, device, loader_kw, progress) -> None:
        from clipforge.eval.zero_shot import model_device

        self.model, self.tokenizer, self.ds = model, tokenizer, ds
        self.device = torch.device(device) if device is not None else model_device(model)
        self.loader_kw, self.progress = loader_kw, progress
        self.timings: dict[str, float] = {}
        self.ranks: dict[str, torch.Tensor] = {}

    def _timed(self, name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        return out

    def image_features(self, ds: EvalDataset) -> tuple[torch.Tensor, torch.Tensor]:
        loader = make_loader(ds, **self.loader_kw)
        return self._timed(
            "encode_images", extract_features, self.model, loader, self.device, progress=self.progress
        )

    # -- tasks ---------------------------------------------------------------------------------
    def zero_shot(self, templates, classnames) -> tuple[dict, dict, dict]:
        from clipforge.eval.zero_shot import accuracy_metrics, cb_logits, zero_shot_classifier

        ds = self.ds
        if not ds.supports_classification:
            raise ClipforgeError(f"{ds.name}: no class labels, so zero-shot classification is impossible")
        names = list(classnames or ds.classnames or [])
        if len(names) != len(ds.classnames or []):
            raise ClipforgeError(
                f"{len(names)} class names given, dataset {ds.name} has {len(ds.classnames or [])}"
            )
        prompts = resolve_templates(templates if templates is not None else (ds.templates or "imagenet"))
        clf = self._timed(
            "classifier", zero_shot_classifier, self.model, self.tokenizer, names, prompts, device=self.device
        )
        feats, idx = self.image_features(ds)
        labels = torch.tensor(ds.labels)[idx]
        t = time.perf_counter()
        metrics = accuracy_metrics(cb_logits(feats, clf.cpu()), labels, len(names))
        self.timings["metrics"] = time.perf_counter() - t
        details = {"classnames": names, "skipped_images": len(ds) - len(idx)}
        shown = [p if isinstance(p, str) else p("{}") for p in prompts]
        config = {
            "templates": shown if len(shown) <= 10 else f"{len(shown)} templates",
            "num_templates": len(shown),
        }
        return metrics, details, config

    def retrieval(self, ks: Sequence[int], num_examples: int) -> tuple[dict, dict, dict]:
        from clipforge.eval.retrieval import retrieval_metrics, topk_retrieve

        ds = self.ds
        if not ds.supports_retrieval:
            raise ClipforgeError(f"{ds.name}: no captions, so retrieval is impossible")
        img, idx = self.image_features(ds)
        texts, t2i = [], []
        for pos, i in enumerate(idx.tolist()):
            for caption in ds.captions[i]:
                texts.append(caption)
                t2i.append(pos)
        if not texts:
            raise ClipforgeError(f"{ds.name}: the loaded images have no captions")
        txt = self._timed(
            "encode_texts",
            encode_texts,
            self.model,
            self.tokenizer,
            texts,
            self.device,
            progress=self.progress,
        )
        t = time.perf_counter()
        scale = _logit_scale(self.model)
        m = retrieval_metrics(
            img, txt, torch.tensor(t2i), ks=ks, device=self.device, return_ranks=True, logit_scale=scale
        )
        self.timings["metrics"] = time.perf_counter() - t
        self.ranks = {
            "image_retrieval": m.pop("image_retrieval_ranks"),
            "text_retrieval": m.pop("text_retrieval_ranks"),
        }
        # example text->image searches, spread over the dataset, for the report and the terminal
        examples = []
        if num_examples > 0:
            picks = torch.linspace(0, len(texts) - 1, min(num_examples, len(texts))).round().long().unique()
            top_idx, top_val = topk_retrieve(txt[picks], img, k=5)
            for q, row, vals in zip(picks.tolist(), top_idx.tolist(), top_val.tolist()):
                examples.append(
                    {
                        "query": texts[q],
                        "target": int(idx[t2i[q]]),
                        "rank": int(self.ranks["image_retrieval"][q]),
                        "top": [int(idx[j]) for j in row],
                        "scores": [round(v, 4) for v in vals],
                        "correct": [j == t2i[q] for j in row],
                    }
                )
        details = {"examples": examples, "skipped_images": len(ds) - len(idx)}
        return m, details, {"ks": list(ks), "logit_scale": float(scale)}

    def captioning(self, num_examples: int, options: dict[str, Any], seed: int) -> tuple[dict, dict, dict]:
        """Generate one caption per image, then BLEU/METEOR/ROUGE-L/CIDEr against all its references."""
        from clipforge.captioning import require_captioner
        from clipforge.eval.captioning import caption_scores, require_toolkit, spread

        ds = self.ds
        require_captioner(self.model)
        if not ds.supports_retrieval:
            raise ClipforgeError(f"{ds.name}: no reference captions, so captioning cannot be scored")
        require_toolkit()  # before minutes of generation, not after
        idx, generated = self._timed("generate", self._generate, options, seed)
        keep = [k for k, i in enumerate(idx) if ds.captions[i]]
        if not keep:
            raise ClipforgeError(f"{ds.name}: none of the loaded images has a reference caption")
        images = [idx[k] for k in keep]
        candidates = [generated[k] for k in keep]
        references = [ds.captions[i] for i in images]
        t = time.perf_counter()
        metrics, per_image = caption_scores(candidates, references)
        self.timings["metrics"] = time.perf_counter() - t
        examples = [
            {
                "index": images[k],
                "caption": candidates[k],
                "references": references[k],
                **{m: round(per_image[m][k], 4) for m in ("Bleu_4", "CIDEr")},
            }
            for k in spread(num_examples, len(images))
        ]
        details = {
            "examples": examples,
            "captions": [{"index": i, "caption": c} for i, c in zip(images, candidates)],
            "skipped_images": len(ds) - len(idx),
            "images_without_references": len(idx) - len(keep),
        }
        metrics = {**metrics, "num_images": len(images), "num_references": sum(map(len, references))}
        return metrics, details, {"generate": options, "seed": seed}

    def _generate(self, options: dict[str, Any], seed: int) -> tuple[list[int], list[str]]:
        """(dataset indices that loaded, their captions) over the dataset's batches."""
        from clipforge.eval.zero_shot import _maybe_tqdm, model_dtype
        from clipforge.model.generate import captions_from_ids

        generator = torch.Generator(device=self.device).manual_seed(seed)
        dtype = model_dtype(self.model)
        pad = options.get("pad_token_id", 0)
        indices: list[int] = []
        captions: list[str] = []
        for batch in _maybe_tqdm(make_loader(self.ds, **self.loader_kw), self.progress, "caption"):
            if batch is None:
                continue
            images, idx = batch
            ids = self.model.generate(images.to(self.device, dtype), generator=generator, **options)
            captions += captions_from_ids(self.tokenizer, ids.cpu(), pad)
            indices += [int(i) for i in idx]
        if not indices:
            raise ClipforgeError(f"{self.ds.name}: no images could be loaded for captioning")
        return indices, captions

    def linear_probe(self, train_ds: EvalDataset | None, seed: int) -> tuple[dict, dict, dict]:
        from clipforge.eval.linear_probe import linear_probe

        ds = self.ds
        if not ds.supports_classification:
            raise ClipforgeError(f"{ds.name}: no class labels, so a linear probe is impossible")
        feats, idx = self.image_features(ds)
        labels = torch.tensor(ds.labels)[idx]
        if train_ds is not None:
            tr_feats, tr_idx = self.image_features(train_ds)
            tr_labels = torch.tensor(train_ds.labels)[tr_idx]
            te_feats, te_labels, split = feats, labels, "train_dataset"
        else:
            perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))
            half = len(perm) // 2
            tr_feats, tr_labels = feats[perm[:half]], labels[perm[:half]]
            te_feats, te_labels, split = feats[perm[half:]], labels[perm[half:]], "random half"
        t = time.perf_counter()
        metrics = linear_probe(
            tr_feats,
            tr_labels,
            te_feats,
            te_labels,
            num_classes=len(ds.classnames),
            seed=seed,
            device=self.device,
        )
        self.timings["fit"] = time.perf_counter() - t
        details = {"classnames": ds.classnames, "l2_sweep": metrics.pop("l2_sweep")}
        config = {"train_split": split, "num_train": len(tr_labels), "num_test": len(te_labels), "seed": seed}
        return metrics, details, config


def _logit_scale(model: torch.nn.Module) -> float:
    """The model's ``exp(logit_scale)``: open_clip's ``get_clip_metrics`` ranks scaled logits, and
    scaling can merge nearly equal float32 scores into ties. 1.0 for models without one."""
    raw = getattr(model, "logit_scale", None)
    if not isinstance(raw, torch.Tensor):
        return 1.0
    return float(raw.detach().float().exp().mean())


def format_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: the headline metrics of one result."""
    m = result["metrics"]
    model = f"{result['model']} {result.get('pretrained') or ''}".strip()
    head = f"{result['task']} on {result['dataset']} ({model})"
    if result["task"] == "captioning":
        from clipforge.eval.captioning import HEADLINE

        scores = "  ".join(f"{label} {m[key]:.3f}" for key, label in HEADLINE.items() if key in m)
        body = [f"  {scores}  ({m.get('num_images', 0)} images, {m.get('num_references', 0)} references)"]
    elif result["task"] == "zeroshot_retrieval":
        ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("image_retrieval_recall@"))
        t2i = "  ".join(f"R@{k} {100 * m[f'image_retrieval_recall@{k}']:.1f}" for k in ks)
        i2t = "  ".join(f"R@{k} {100 * m[f'text_retrieval_recall@{k}']:.1f}" for k in ks)
        body = [f"  text->image  {t2i}", f"  image->text  {i2t}"]
    else:
        body = [
            f"  acc1 {100 * m['acc1']:.1f}%  acc5 {100 * m.get('acc5', float('nan')):.1f}%  "
            f"mean per-class recall {100 * m['mean_per_class_recall']:.1f}%"
        ]
    return "\n".join([head, *body])


def format_examples(result: dict[str, Any], dataset: EvalDataset | None = None) -> str:
    """Example text->image searches as text: query, then the top-5 with a tick on the right one."""
    lines = []
    for ex in result.get("details", {}).get("examples", []):
        lines.append(f'  "{ex["query"]}"')
        for rank, (j, s, ok) in enumerate(zip(ex["top"], ex["scores"], ex["correct"]), start=1):
            what = _describe_item(dataset, j)
            lines.append(f"     {rank}. {'✓' if ok else ' '} {s:+.3f}  {what}")
    return "\n".join(lines)


def format_caption_examples(result: dict[str, Any]) -> str:
    """Example generated captions as text, each with the image's first reference and its scores."""
    lines = []
    for ex in result.get("details", {}).get("examples", []):
        refs = ex.get("references") or [""]
        more = f" (+{len(refs) - 1} more)" if len(refs) > 1 else ""
        lines.append(
            f'  image {ex["index"]}: "{ex["caption"]}"   BLEU-4 {ex["Bleu_4"]:.3f}  CIDEr {ex["CIDEr"]:.3f}'
        )
        lines.append(f'     truth: "{refs[0]}"{more}')
    return "\n".join(lines)


def _describe_item(dataset: EvalDataset | None, j: int) -> str:
    if dataset is not None and dataset.captions is not None and dataset.captions[j]:
        return f"image {j}: {dataset.captions[j][0]}"
    paths = getattr(dataset, "paths", None)
    if paths:
        return str(Path(paths[j]).name)
    return f"image {j}"
