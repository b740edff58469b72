"""Evaluation data sources: ImageFolder, pairs tables, caption folders, shards, synthetic, torchvision;
plus the library runner on them with a tiny random model."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.data.sources import expand_braces
from clipforge.errors import ClipforgeError, DataError
from clipforge.eval.datasets import (
    EvalDataset,
    extract_features,
    load_eval_dataset,
    make_loader,
)

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230)}


def _png(colour, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


class MeanColour(torch.nn.Module):
    """encode_image = mean RGB (a perfect colour classifier); encode_text = fixed per-word vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, images, normalize=False):
        x = images.mean(dim=(2, 3)) - 0.4
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        x = tokens.float()
        return F.normalize(x, dim=-1) if normalize else x


def colour_tokenizer(texts):
    rows = []
    for t in texts:
        v = [0.0, 0.0, 0.0]
        for i, name in enumerate(COLOURS):
            if name in t:
                v[i] = 1.0
        rows.append(torch.tensor(v) - 0.2)
    return torch.stack(rows)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "folder"
    for name, rgb in COLOURS.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(8):
            shade = tuple(max(0, c - 8 * i) for c in rgb)
            (d / f"{i}.png").write_bytes(_png(shade))
    (root / "green" / "broken.png").write_bytes(b"not a png")
    return root


def test_image_folder_and_skipping(image_folder):
    ds = load_eval_dataset(image_folder, transform=_to_tensor)
    assert ds.classnames == ["blue", "green", "red"]
    assert len(ds) == 25 and ds.supports_classification and not ds.supports_retrieval
    feats, idx = extract_features(MeanColour(), make_loader(ds, batch_size=5), "cpu")
    assert feats.shape == (24, 3) and len(idx) == 24  # the broken file is skipped, not fatal
    labels = torch.tensor(ds.labels)[idx]
    assert torch.equal(feats.argmax(1), torch.tensor([2, 1, 0])[labels])  # blue->B, green->G, red->R


@pytest.mark.slow
def test_runner_zero_shot_and_linear_probe_on_folder(image_folder, tmp_path):
    from clipforge.eval.runner import evaluate, format_summary

    out = tmp_path / "r.json"
    res = evaluate(
        MeanColour(),
        colour_tokenizer,
        _to_tensor,
        str(image_folder),
        task="zeroshot",
        templates=["a {} thing"],
        output=out,
    )
    assert res["metrics"]["acc1"] == 1.0 and res["metrics"]["mean_per_class_recall"] == 1.0
    assert res["details"]["skipped_images"] == 1
    assert json.loads(out.read_text())["metrics"]["acc1"] == 1.0
    assert "acc1 100.0%" in format_summary(res)
    lp = evaluate(MeanColour(), colour_tokenizer, _to_tensor, str(image_folder), task="linear-probe")
    assert lp["task"] == "linear_probe" and lp["metrics"]["acc1"] == 1.0 and "weight_decay" in lp["metrics"]
    with pytest.raises(ClipforgeError, match="no captions"):
        evaluate(MeanColour(), colour_tokenizer, _to_tensor, str(image_folder), task="retrieval")


def test_pairs_table_multi_caption_retrieval(tmp_path):
    from clipforge.eval.runner import evaluate, format_examples

    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        (tmp_path / f"{i}.png").write_bytes(_png(rgb))
        rows.append({"image": f"{i}.png", "captions": [f"something {name}", f"a {name} square"]})
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_eval_dataset(table, task="retrieval")
    assert ds.captions == [r["captions"] for r in rows]
    res = evaluate(
        MeanColour(), colour_tokenizer, _to_tensor, ds, task="retrieval", ks=(1, 2), num_examples=2
    )
    m = res["metrics"]
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0
    assert m["num_images"] == 3 and m["num_texts"] == 6
    ex = res["details"]["examples"]
    assert len(ex) == 2 and all(e["correct"][0] for e in ex) and ex[0]["rank"] == 1
    assert "✓" in format_examples(res, ds)


def test_caption_folder(tmp_path):
    for name, rgb in COLOURS.items():
        (tmp_path / f"{name}.png").write_bytes(_png(rgb))
        (tmp_path / f"{name}.txt").write_text(f"a {name} image\nplain {name}\n")
    ds = load_eval_dataset(tmp_path, task="retrieval")
    assert ds.supports_retrieval and sorted(c[0] for c in ds.captions) == [
        "a blue image",
        "a green image",
        "a red image",
    ]


def _write_shard(path, items):
    with tarfile.open(path, "w") as tf:
        for key, fields in items:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards_both_tasks(tmp_path):
    names = list(COLOURS)
    for s in range(2):
        items = []
        for i, name in enumerate(names):
            fields = {
                "png": _png(COLOURS[name]),
                "cls": str(i).encode(),
                "txt": f"a {name} one\nthe {name}".encode(),
            }
            items.append((f"sub/{s:02d}_{i:03d}", fields))
        _write_shard(tmp_path / f"shard-{s:03d}.tar", items)
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    assert expand_braces(str(tmp_path / "shard-{000..001}.tar")) == [
        str(tmp_path / "shard-000.tar"),
        str(tmp_path / "shard-001.tar"),
    ]
    for spec in (str(tmp_path), str(tmp_path / "shard-{000..001}.tar")):
        ds = load_eval_dataset(spec, transform=_to_tensor)
        assert len(ds) == 6 and ds.classnames == names
        assert ds.labels == [0, 1, 2, 0, 1, 2]
        assert ds.captions[1] == ["a green one", "the green"]
    feats, idx = extract_features(MeanColour(), make_loader(ds, batch_size=4, num_workers=0))
    assert feats.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match="not found"):
        load_eval_dataset(str(tmp_path / "nope-{000..001}.tar"))


def test_synthetic_specs():
    ds = load_eval_dataset("synthetic:shapes?split=heldout&n=12&label=colour_shape")
    assert len(ds) == 12 and len(ds.classnames) == 36 and ds.supports_retrieval
    assert all(0 <= y < 36 for y in ds.labels)
    r = load_eval_dataset("synthetic:shapes?n=10", task="retrieval")
    assert len(r) == 10 and len({c[0] for c in r.captions}) == 10  # distinct captions
    with pytest.raises(DataError, match="unknown option"):
        load_eval_dataset("synthetic:shapes?colour=red")


def test_torchvision_missing_dataset_hints_download(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_eval_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="unknown torchvision dataset"):
        load_eval_dataset(f"torchvision:NoSuchSet:{tmp_path}")


def test_eval_dataset_validates_lengths():
    with pytest.raises(DataError, match="labels"):
        EvalDataset("x", 3, lambda i: None, labels=[0, 1])
