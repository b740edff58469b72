"""``eval --task captioning``: scores equal pycocoevalcap's own driver; references grouped per image."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import seeded_model
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.data import synthetic
from clipforge.errors import ClipforgeError, ConfigError
from clipforge.eval.captioning import METRICS, caption_scores
from clipforge.eval.runner import evaluate
from clipforge.model.generate import captions_from_ids
from clipforge.transforms import image_transform

GREEDY = ["--generation-type", "greedy", "--seq-len", "10", "--min-seq-len", "2"]


def oracle_scores(candidates: list[str], references: list[list[str]], monkeypatch) -> dict[str, float]:
    """pycocoevalcap's ``COCOEvalCap`` on COCO-shaped annotations (SPICE stubbed: it needs a download)."""
    import pycocoevalcap.eval as coco_eval

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    class Annotations:
        def __init__(self, per_image: list[list[str]]) -> None:
            self.imgToAnns = {
                i: [{"image_id": i, "caption": c} for c in caps] for i, caps in enumerate(per_image)
            }

        def getImgIds(self) -> list[int]:
            return list(self.imgToAnns)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    evaluator = coco_eval.COCOEvalCap(Annotations(references), Annotations([[c] for c in candidates]))
    evaluator.evaluate()
    return {k: v for k, v in evaluator.eval.items() if k != "SPICE"}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """A random tiny CoCa, six shape images, a table whose two caption columns partly match its captions."""
    root = tmp_path_factory.mktemp("caption_eval")
    model = seeded_model("tiny-coca")
    clipforge.save_pretrained(model, root / "model")
    data = synthetic.SyntheticShapes(6, split="heldout", seed=3, image_size=32)
    paths = []
    for i in range(len(data)):
        paths.append(root / f"img{i}.png")
        data.get_image(i).save(paths[-1])
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    images = torch.stack([preprocess(Image.open(p)) for p in paths])
    ids = model.generate(images, generation_type="greedy", seq_len=10, min_seq_len=2)
    generated = captions_from_ids(clipforge.get_tokenizer(model), ids)
    # References: the truth, plus (for half the images) the model's own caption or a part of it,
    # so every metric is away from 0 and from its maximum.
    references = []
    for i, caption in enumerate(generated):
        half = " ".join(caption.split()[: max(len(caption.split()) // 2, 1)])
        second = [caption, f"{half} and more", caption.upper() + "."][i] if i < 3 else "A shape, drawn."
        references.append([data.caption_for(i), second])
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "alt"])
        writer.writerows([p.name, *refs] for p, refs in zip(paths, references))
    return root, model, generated, references


def test_eval_captioning_cli_equals_pycocoevalcap(captioned, monkeypatch, capsys):
    root, _, generated, references = captioned
    report = root / "report"
    argv = [
        "eval",
        "--task",
        "captioning",
        "--pretrained",
        str(root / "model"),
        "--data",
        str(root / "pairs.csv"),
    ]
    assert (
        main([*argv, "--caption-key", "caption,alt", "--report", str(report), "--no-progress", *GREEDY]) == 0
    )
    assert "BLEU-4" in capsys.readouterr().out
    (result_file,) = report.glob("captioning-*.json")
    result = json.loads(result_file.read_text())
    assert result["task"] == "captioning" and result["metrics"]["num_images"] == 6
    assert result["metrics"]["num_references"] == 12
    assert [c["caption"] for c in result["details"]["captions"]] == generated  # == model.generate
    assert result["config"]["generate"]["generation_type"] == "greedy"
    expected = oracle_scores(generated, references, monkeypatch)
    assert set(expected) == set(METRICS)
    for name in METRICS:
        assert result["metrics"][name] == pytest.approx(expected[name], abs=1e-12), name
    assert 0 < expected["Bleu_1"] < 1 and 0 < expected["CIDEr"]
    example = result["details"]["examples"][0]
    assert example["references"] == references[example["index"]]
    assert any(p.endswith("-captions.png") for p in result["report"]["plots"])
    assert (report / result["report"]["plots"][0]).stat().st_size > 0
    assert "captioning" in (report / "index.html").read_text()


def test_references_are_grouped_per_image(tmp_path, monkeypatch):
    """A caption folder whose ``.txt`` sidecars hold several lines, and a JSON table with lists."""
    import clipforge.eval.captioning as captioning

    seen = {}

    def fake_scores(candidates, references):  # the java tools are the test above's business
        seen.update(candidates=list(candidates), references=[list(r) for r in references])
        return {m: 0.5 for m in METRICS}, {m: [0.5] * len(candidates) for m in METRICS}

    monkeypatch.setattr(captioning, "caption_scores", fake_scores)
    model = seeded_model("tiny-coca")
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    data = synthetic.SyntheticShapes(3, split="val", seed=0, image_size=32)
    folder = tmp_path / "folder"
    folder.mkdir()
    truth = [[f"caption {i} a", f"caption {i} b", f"caption {i} c"][: i + 1] for i in range(3)]
    for i, refs in enumerate(truth):
        data.get_image(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("\n".join(refs) + "\n\n", encoding="utf-8")
    rows = [{"image": f"folder/{i}.png", "caption": refs} for i, refs in enumerate(truth)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows), encoding="utf-8")
    options = {"generation_type": "greedy", "seq_len": 8}
    tokenizer = clipforge.get_tokenizer(model)
    for source in (folder, tmp_path / "pairs.json"):
        result = evaluate(
            model,
            tokenizer,
            preprocess,
            str(source),
            task="captioning",
            generate_options=options,
            num_examples=2,
        )
        assert seen["references"] == truth, source
        assert result["metrics"]["num_references"] == 6 and result["metrics"]["CIDEr"] == 0.5
        assert [e["index"] for e in result["details"]["examples"]] == [0, 2]


def test_captioning_refusals(tmp_path):
    tokenizer = clipforge.get_tokenizer("tiny-vit")
    clip = clipforge.create_model("tiny-vit")
    preprocess = image_transform(clip.preprocess_cfg, is_train=False)
    spec = "synthetic:shapes?split=heldout&n=2&image_size=32"
    with pytest.raises(ConfigError, match="tiny-vit cannot caption"):
        evaluate(clip, tokenizer, preprocess, spec, task="captioning")
    with pytest.raises(ClipforgeError, match="2 candidates but 1 reference"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ClipforgeError, match="no reference caption"):
        caption_scores(["a", "b"], [["a"], []])
