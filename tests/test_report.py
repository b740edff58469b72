"""Report: plots exist, have the requested pixel size, are not blank; HTML ties them together."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("matplotlib")

from clipforge.eval import report  # noqa: E402
from clipforge.eval.datasets import EvalDataset  # noqa: E402
from clipforge.eval.results import make_result  # noqa: E402
from clipforge.eval.retrieval import retrieval_metrics, topk_retrieve  # noqa: E402
from clipforge.eval.zero_shot import accuracy_metrics  # noqa: E402


def _check_png(path, size=None, min_std=10.0):
    assert path.is_file() and path.stat().st_size > 2000
    img = Image.open(path)
    if size is not None:
        assert img.size == size
    pixels = np.asarray(img.convert("L"), dtype=np.float32)
    assert pixels.std() > min_std, f"{path.name} looks blank (std {pixels.std():.1f})"
    return img


def _classification_result(num_classes=5, n=200):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    logits = torch.randn(n, num_classes, generator=gen) + 2 * F.one_hot(labels, num_classes)
    names = [f"class {i}" for i in range(num_classes)]
    m = accuracy_metrics(logits, labels)
    return make_result(
        dataset="toy",
        model="tiny-vit",
        pretrained="",
        task="zeroshot",
        metrics=m,
        details={"classnames": names},
    )


def _colour_image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:] = rng.integers(0, 255, 3)
    arr[8:24, 8:24] = 255 - arr[0, 0]
    return Image.fromarray(arr)


def test_individual_plots_have_requested_size(tmp_path):
    res = _classification_result()
    d = res["details"]
    p = report.plot_confusion_matrix(
        d["confusion_matrix"], d["classnames"], tmp_path / "cm.png", size=(600, 500)
    )
    _check_png(p, (600, 500))
    p = report.plot_per_class_accuracy(
        d["per_class_accuracy"], d["classnames"], tmp_path / "pc.png", size=(700, 400)
    )
    _check_png(p, (700, 400))
    ranks = {"image_retrieval": torch.tensor([1, 2, 3, 8, 1]), "text_retrieval": torch.tensor([1, 1, 4])}
    metrics = {
        "image_retrieval_recall@1": 0.4,
        "text_retrieval_recall@1": 2 / 3,
        "num_images": 3,
        "num_texts": 5,
    }
    _check_png(report.plot_recall_at_k(metrics, tmp_path / "r.png", ranks, size=(800, 450)), (800, 450))
    ks, values = report.recall_curve(torch.tensor([1, 2, 2, 5]), 5)
    assert ks == [1, 2, 3, 4, 5] and values == pytest.approx([0.25, 0.75, 0.75, 0.75, 1.0])
    ex = [
        {
            "query": "a red square",
            "top": [0, 1, 2, 3, 4],
            "scores": [0.9, 0.8, 0.7, 0.6, 0.5],
            "correct": [0, 1, 0, 0, 0],
        }
    ]
    _check_png(
        report.plot_retrieval_examples(ex, _colour_image, tmp_path / "g.png", size=(900, 300)), (900, 300)
    )
    assert not list(tmp_path.glob("*.tmp")) and not list(
        tmp_path.glob(".*")
    )  # atomic writes leave no temp files


@pytest.mark.slow
def test_many_classes_still_render(tmp_path):
    res = _classification_result(num_classes=80, n=800)
    d = res["details"]
    img = _check_png(
        report.plot_confusion_matrix(d["confusion_matrix"], d["classnames"], tmp_path / "cm.png")
    )
    assert max(img.size) <= 1600
    img = _check_png(
        report.plot_per_class_accuracy(d["per_class_accuracy"], d["classnames"], tmp_path / "pc.png")
    )
    assert img.size[1] <= 1800


@pytest.mark.slow
def test_write_report_folder_and_html(tmp_path):
    out = tmp_path / "report"
    info = report.write_report(out, _classification_result())
    assert len(info["plots"]) == 2
    # a retrieval run in the same folder: the page covers both
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(12, 8, generator=gen), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(12, 8, generator=gen), dim=-1)
    m = retrieval_metrics(img, txt, torch.arange(12), return_ranks=True)
    ranks = {
        "image_retrieval": m.pop("image_retrieval_ranks"),
        "text_retrieval": m.pop("text_retrieval_ranks"),
    }
    top, val = topk_retrieve(txt[:3], img, 5)
    examples = [
        {
            "query": f"caption {q}",
            "top": t,
            "scores": v,
            "correct": [j == q for j in t],
            "rank": int(ranks["image_retrieval"][q]),
        }
        for q, t, v in zip(range(3), top.tolist(), val.tolist())
    ]
    ds = EvalDataset("toy-pairs", 12, _colour_image, captions=[[f"caption {i}"] for i in range(12)])
    res = make_result(
        dataset="toy-pairs",
        model="m",
        pretrained="p",
        task="retrieval",
        metrics=m,
        details={"examples": examples},
    )
    info2 = report.write_report(out, res, dataset=ds, ranks=ranks)
    assert len(info2["plots"]) == 2

    html = (out / "index.html").read_text()
    referenced = set(re.findall(r'src="([^"]+\.png)"', html))
    assert referenced == set(info["plots"]) | set(info2["plots"])
    for name in referenced:
        _check_png(out / name)
    assert f'href="{info["json"]}"' in html and f'href="{info2["json"]}"' in html
    assert "zeroshot_classification" in html and "zeroshot_retrieval" in html
    saved = json.loads((out / info2["json"]).read_text())
    assert saved["task"] == "zeroshot_retrieval" and saved["report"]["plots"] == info2["plots"]


def test_long_result_names_stay_distinct():
    a = report.slug("zeroshot_classification-synthetic:shapes?split=heldout&n=600&label=shape&image_size=32")
    b = report.slug("zeroshot_classification-synthetic:shapes?split=heldout&n=600&label=colour&image_size=32")
    assert a != b and len(a) == len(b) == 60 and re.fullmatch(r"[A-Za-z0-9._-]+", a)
    assert report.slug("short name") == "short_name"
