"""NaFlex through the product: a saved checkpoint with NaFlex preprocessing, then ``clipforge eval``.

The tiny SigLIP 2 of the zoo, saved with ``naflex_max_patches`` in its preprocessing; real icons
of two sizes cropped to three aspect ratios in a 2-class folder, so a batch mixes patch counts and needs the padded collate.
The oracle is the library on one unpadded image at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from PIL import Image
from realdata import icons

from clipforge.naflex_transforms import NaFlexTransform

pytest.importorskip("timm")

PATCH, MOST = 8, 16


_main = run_cli


@pytest.fixture(scope="module")
def naflex_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint folder, class folder): tiny-siglip2 saved with NaFlex preprocessing; icons 48 and 96 px."""
    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model
    from clipforge.transforms import PreprocessConfig

    root = tmp_path_factory.mktemp("naflex_product")
    torch.manual_seed(0)
    model = create_model("tiny-siglip2").eval()
    pre = PreprocessConfig.from_dict(
        {**model.preprocess_cfg.to_dict(), "naflex_max_patches": MOST, "naflex_patch_size": PATCH}
    )
    save_pretrained(model, root / "ckpt", preprocess_cfg=pre)
    folder = root / "classes"
    for size in ("48x48", "96x96"):
        for cls in ("devices", "places"):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            for i, p in enumerate([p for p in icons(size) if p.parent.name == cls][:3]):
                with Image.open(p) as im:  # square, wide and tall crops: patch counts differ
                    w, h = im.size
                    box = ((0, 0, w, h), (0, 0, w, h // 3), (0, 0, w // 2, h))[i]
                    im.crop(box).save(folder / cls / f"{size}-{p.stem}.png")
    return root / "ckpt", folder


def test_checkpoint_keeps_its_naflex_preprocessing(naflex_ckpt):
    from clipforge.factory import create_model_and_transforms

    _, train, val = create_model_and_transforms(pretrained=str(naflex_ckpt[0]))
    for t in (train, val):
        assert isinstance(t, NaFlexTransform) and (t.patch_size, t.max_num_patches) == (PATCH, MOST)


def test_zero_shot_eval_cli_equals_the_library_per_image(naflex_ckpt, tmp_path):
    """``clipforge eval`` batches mixed patch counts; its confusion matrix equals one image at a time."""
    from clipforge.eval.zero_shot import zero_shot_classifier
    from clipforge.factory import create_model_and_transforms, get_tokenizer

    ckpt, folder = naflex_ckpt
    out = tmp_path / "zs.json"
    assert _main(["eval", "--pretrained", str(ckpt), "--task", "zeroshot", "--data", str(folder),
                  "--templates", "simple", "--output", str(out), "--device", "cpu", "--no-progress",
                  "--batch-size", "4"]) == 0  # fmt: skip
    res = json.loads(out.read_text())
    classes = res["details"]["classnames"]
    assert classes == ["devices", "places"]

    model, _, transform = create_model_and_transforms(pretrained=str(ckpt))
    model.eval()
    weights = zero_shot_classifier(model, get_tokenizer(str(ckpt)), classes, "simple", device="cpu")
    confusion = [[0, 0], [0, 0]]
    shapes = set()
    with torch.no_grad():
        for p in sorted(folder.rglob("*.png")):
            with Image.open(p) as im:
                batch = transform.batch([im])
            shapes.add(tuple(batch["spatial_shapes"][0].tolist()))
            feats = model.encode_image(batch, normalize=True)
            confusion[classes.index(p.parent.name)][int((feats @ weights).argmax())] += 1
    assert len(shapes) >= 3 and sum(map(sum, confusion)) == 12
    assert res["details"]["confusion_matrix"] == confusion
    acc = (confusion[0][0] + confusion[1][1]) / 12
    assert res["metrics"]["acc1"] == pytest.approx(acc, abs=1e-9)


def test_embed_cli_rows_equal_encode_image_per_image(naflex_ckpt, tmp_path):
    """``clipforge embed --pretrained`` on a NaFlex checkpoint: each row is that image alone, unpadded."""
    import numpy as np

    from clipforge.factory import create_model_and_transforms

    ckpt, folder = naflex_ckpt
    out = tmp_path / "emb"
    assert _main(["embed", "--pretrained", str(ckpt), "--images", str(folder), "--out", str(out),
                  "--workers", "0", "--dtype", "float32", "--no-captions", "--batch-size", "5"]) == 0  # fmt: skip
    stored = np.concatenate([np.load(p) for p in sorted(out.rglob("img_emb_*.npy"))])
    model, _, transform = create_model_and_transforms(pretrained=str(ckpt))
    with torch.no_grad():
        want = []
        for p in sorted(folder.rglob("*.png")):
            with Image.open(p) as im:
                want.append(model.eval().encode_image(transform.batch([im]), normalize=True))
    want = torch.cat(want).numpy()
    assert stored.shape == want.shape == (12, model.config.embed_dim)
    assert float(np.abs(stored - want).max()) < 1e-5


def test_export_refuses_naflex_unless_asked_for_the_fixed_size_graph(naflex_ckpt, tmp_path, capsys):
    """The square image graph is not what a NaFlex checkpoint's preprocessing feeds: exit 2, then opt in."""
    ckpt, _ = naflex_ckpt
    refused = tmp_path / "refused"
    assert _main(["export", "--pretrained", str(ckpt), "--out", str(refused), "--towers", "image"]) == 2
    err = capsys.readouterr().err
    assert "NaFlex" in err and "--no-naflex" in err and "naflex_max_patches=16" in err
    assert not refused.exists()

    out = tmp_path / "fixed"
    assert (
        _main(["export", "--pretrained", str(ckpt), "--out", str(out), "--towers", "image", "--no-naflex"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "warning: NaFlex preprocessing is not exported" in printed and "max abs diff vs PyTorch" in printed
    assert (out / "image.onnx").stat().st_size > 1000
