"""``clipforge caption``: every data spec, JSONL records, equal to ``model.generate`` on the same images."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
import torch
from helpers import seeded_model
from PIL import Image
from realdata import concept, icons

import clipforge
from clipforge.cli import main
from clipforge.model.generate import captions_from_ids
from clipforge.transforms import image_transform


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption")
    model = seeded_model("tiny-coca")
    clipforge.save_pretrained(model, root / "model")
    files = icons("48x48")[:5]
    folder = root / "images"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"not a png")
    return root, model, files


def expected_captions(model, files, **options) -> dict[str, str]:
    preprocess = image_transform(model.preprocess_cfg, is_train=False)
    images = torch.stack([preprocess(Image.open(f)) for f in files])  # the transform handles alpha
    ids = model.generate(images, **options)
    return dict(zip([f.name for f in files], captions_from_ids(clipforge.get_tokenizer(model), ids)))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_caption_folder_table_and_shards(setup, tmp_path, capsys):
    root, model, files = setup
    want = expected_captions(model, files, seq_len=10)
    common = ["--pretrained", str(root / "model"), "--seq-len", "10", "--no-progress", "--batch-size", "2",
              "--device", "cpu"]  # fmt: skip

    out = tmp_path / "folder.jsonl"
    assert main(["caption", str(root / "images"), "--out", str(out), *common]) == 0
    records = read_jsonl(out)
    assert [r["image"].rsplit("/", 1)[-1] for r in records] == sorted(
        p.name for p in (root / "images").iterdir()
    )
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in records}
    assert "error" in by_name.pop("broken.png")
    assert {k: r["caption"] for k, r in by_name.items()} == want

    table = tmp_path / "pairs.csv"
    table.write_text("filepath,title\n" + "".join(f"{f},{concept(f)}\n" for f in files))
    args = ["caption", str(table), "--csv-caption-key", "title", "--out", str(tmp_path / "t.jsonl"), *common]
    assert main(args) == 0
    records = read_jsonl(tmp_path / "t.jsonl")
    assert [r["caption"] for r in records] == [want[f.name] for f in files]
    assert [r["reference"] for r in records] == [concept(f) for f in files]

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, f in enumerate(files):
            tar.add(f, arcname=f"{i:04d}.png")
    assert main(["caption", str(shard), *common]) == 0  # no --out: JSONL on stdout
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in lines] == [want[f.name] for f in files]
    assert all("#offset=" in r["image"] for r in lines)


def test_caption_refuses_a_model_without_decoder(tmp_path):
    clipforge.save_pretrained(clipforge.create_model("tiny-vit"), tmp_path / "clip")
    assert main(["caption", str(tmp_path), "--pretrained", str(tmp_path / "clip"), "--no-progress"]) == 2
