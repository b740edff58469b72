"""``clipforge demo --quick`` end to end: trains, evaluates, writes the report, prints a summary."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def assert_real_png(path, min_side: int = 100) -> None:
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side, (path.name, img.size)
        pixels = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8).float()
    assert pixels.std() > 5, f"{path.name} looks blank"


def test_demo_quick_end_to_end(tmp_path, capsys, keep_threads):
    from clipforge.cli import main

    code = main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "combinations never seen in training" in printed
    assert "chance" in printed and "R@1" in printed
    assert "example text->image searches" in printed and "  1. " in printed
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    zs = summary["zero_shot"]
    assert set(zs) == {"colour_shape", "shape", "colour"}
    assert zs["colour_shape"]["split"] == "heldout" and zs["shape"]["split"] == "val"
    assert zs["colour_shape"]["classes"] == 36 and zs["colour_shape"]["chance"] == pytest.approx(1 / 36)
    assert 0.0 <= zs["colour_shape"]["acc1"] <= 1.0
    assert summary["retrieval"]["heldout"]["chance_R@1"] == pytest.approx(1 / 60)
    assert summary["final_loss"] < summary["first_loss"]  # it learned something even in quick mode
    # report: top page + loss curve, and the evaluation report with its plots and JSON results
    page = (tmp_path / "index.html").read_text()
    assert "loss.png" in page and "report/index.html" in page
    assert_real_png(tmp_path / "loss.png")
    report = tmp_path / "report"
    assert (report / "index.html").exists()
    results = [json.loads(p.read_text()) for p in report.glob("*.json")]
    assert {r["task"] for r in results} == {"zeroshot_classification", "zeroshot_retrieval"}
    pngs = sorted(report.glob("*.png"))
    for kind in ("confusion", "per-class", "recall", "examples"):
        assert any(p.stem.endswith(f"-{kind}") for p in pngs), (kind, [p.name for p in pngs])
    for png in pngs:
        assert_real_png(png)
        assert png.name in (report / "index.html").read_text()
    # the trained model is a normal clipforge checkpoint
    from clipforge.factory import create_model

    model = create_model(pretrained=summary["model_dir"])
    assert model.config.vision.image_size == 32


def test_demo_without_matplotlib_fails_before_training(tmp_path, capsys, monkeypatch):
    import importlib.util

    from clipforge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) != 0
    err = capsys.readouterr().err
    assert "matplotlib" in err and "clipforge[demo]" in err
    assert not (tmp_path / "d").exists()  # nothing trained, nothing written
