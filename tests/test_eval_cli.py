"""``clipforge eval`` end to end on a tiny random model, and ``clipforge eval merge``."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from clipforge.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for name, rgb in {"red": (220, 30, 30), "blue": (30, 40, 220)}.items():
        (root / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(max(0, c - 20 * i) for c in rgb)).save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_eval_zeroshot_imagefolder_and_retrieval_report_then_merge(folder, tmp_path, capsys):
    zs = tmp_path / "zs.json"
    rc = main(
        ["eval", "--model", "tiny-vit", "--task", "zeroshot", "--data", str(folder), "--templates", "simple",
         "--output", str(zs), "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(zs.read_text())
    assert res["task"] == "zeroshot_classification" and res["model"] == "tiny-vit"
    assert set(res["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}
    assert 0.0 <= res["metrics"]["acc1"] <= 1.0
    assert res["details"]["classnames"] == ["blue", "red"] and res["config"]["num_templates"] == 7
    assert {"clipforge", "torch", "python"} <= set(res["versions"]) and res["timings"]["total"] > 0

    report = tmp_path / "report"
    rc = main(
        ["eval", "--model", "tiny-vit", "--task", "retrieval", "--data", "synthetic:shapes?n=12",
         "--report", str(report), "--recall-k", "1", "5", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "text->image" in out and "example text -> image searches" in out
    html = (report / "index.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert len(pngs) == 2 and all(p in html for p in pngs)
    (ret_json,) = report.glob("*.json")
    ret = json.loads(ret_json.read_text())
    assert set(ret["metrics"]) >= {"image_retrieval_recall@1", "text_retrieval_recall@5"}

    table = tmp_path / "table.csv"
    assert main(["eval", "merge", str(zs), str(ret_json), "--out", str(table)]) == 0
    rows = list(csv.DictReader(table.open()))
    assert [r["task"] for r in rows] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert rows[0]["acc1"] == str(res["metrics"]["acc1"]) and rows[0]["image_retrieval_recall@1"] == ""
    assert rows[1]["model_fullname"] == "tiny-vit"
    assert list(rows[0])[:4] == ["model", "pretrained", "model_fullname", "dataset"]


def test_eval_user_errors_exit_2(folder, tmp_path, capsys):
    assert main(["eval", "--model", "tiny-vit", "--data", str(tmp_path / "missing")]) == 2
    assert "not an existing folder" in capsys.readouterr().err
    bad = tmp_path / "t.txt"
    bad.write_text("a photo of a {}\nno placeholder here\n")
    rc = main(
        ["eval", "--model", "tiny-vit", "--data", str(folder), "--templates", str(bad), "--no-progress"]
    )
    assert rc == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main(["eval", "--data", str(folder)]) == 2
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["eval", "merge", str(broken), "--out", str(tmp_path / "x.csv")]) == 2
    assert "broken.json:1" in capsys.readouterr().err
