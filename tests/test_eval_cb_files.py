"""CLIP_benchmark's files as they are: ``{c}`` templates, classnames.txt, its JSON files and its
webdataset layout (ROOT/{classnames.txt, zeroshot_classification_templates.txt, test/0.tar,
test/nshards.txt}), read by ``clipforge eval`` without conversion."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import clip_benchmark.datasets as cb_datasets
import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier as cb_zero_shot_classifier
from helpers import seeded_model
from PIL import Image
from realdata import concept, icons

from clipforge.cli import main
from clipforge.errors import ClipforgeError
from clipforge.eval.datasets import load_eval_dataset
from clipforge.eval.templates import (
    format_template,
    load_classnames_file,
    load_template_file,
    resolve_templates,
)

CB_DIR = Path(cb_datasets.__file__).parent
CB_TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "itap of a {c}."]


def test_c_placeholder_templates_format_as_clip_benchmark(tmp_path):
    f = tmp_path / "zeroshot_classification_templates.txt"
    f.write_text("\n".join(CB_TEMPLATES) + "\n")
    loaded = load_template_file(f)
    assert loaded == CB_TEMPLATES
    assert [format_template(t, "dog") for t in loaded] == [t.format(c="dog") for t in CB_TEMPLATES]
    assert resolve_templates(str(f)) == CB_TEMPLATES
    f.write_text("a photo of a {c}.\na photo without a slot\n")
    with pytest.raises(ClipforgeError, match=r"zeroshot_classification_templates\.txt:2"):
        load_template_file(f)
    with pytest.raises(ClipforgeError, match="exactly once"):
        resolve_templates(["a {} and a {c}"])


def test_clip_benchmark_json_files_load_as_clip_benchmark_reads_them():
    templates_json = CB_DIR / "en_zeroshot_classification_templates.json"
    classnames_json = CB_DIR / "en_classnames.json"
    templates, classnames = json.loads(templates_json.read_text()), json.loads(classnames_json.read_text())
    for name, value in templates.items():  # every list of CLIP_benchmark's templates is accepted
        if isinstance(value, list):
            assert load_template_file(templates_json, name) == value
    assert resolve_templates(f"{templates_json}:cifar10") == templates["cifar10"]
    # CLIP_benchmark falls back to imagenet1k's templates for a dataset it has none for
    assert load_template_file(templates_json, "no-such-set") == templates["imagenet1k"]
    assert load_template_file(templates_json, "wds/cifar10") == templates["cifar10"]  # as CB looks up
    assert load_classnames_file(classnames_json, "flowers") == classnames["flowers"]
    with pytest.raises(ClipforgeError, match="available"):
        load_classnames_file(classnames_json)  # several datasets and no key
    with pytest.raises(ClipforgeError, match="no entry"):
        load_classnames_file(classnames_json, "no-such-set")


def test_classnames_txt_keeps_line_numbers(tmp_path):
    f = tmp_path / "classnames.txt"
    f.write_text("cat\n  dog \nsea turtle\n\n")
    assert load_classnames_file(f) == ["cat", "dog", "sea turtle"]
    f.write_text("cat\n\ndog\n")
    with pytest.raises(ClipforgeError, match=r"classnames\.txt:2"):
        load_classnames_file(f)


def _tar(path: Path, samples: list[tuple[str, bytes, str, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, data, ext, label in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def cb_root(tmp_path_factory):
    """A CLIP_benchmark webdataset folder made from real Adwaita icons (one class per icon)."""
    root = tmp_path_factory.mktemp("wds_icons")
    chosen = icons("48x48")[::97][:4]
    names = [concept(p) for p in chosen]
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(CB_TEMPLATES) + "\n")
    samples = []
    for label, path in enumerate(chosen):
        image = Image.open(path)
        for fmt, ext in (("WEBP", "webp"), ("PNG", "png")):
            buf = io.BytesIO()
            image.save(buf, fmt)
            samples.append((f"s{len(samples):04d}", buf.getvalue(), ext, label))
    for split, parts in (("test", [samples[:5], samples[5:]]), ("train", [samples[:3]])):
        (root / split).mkdir()
        for i, part in enumerate(parts):
            _tar(root / split / f"{i}.tar", part)
        (root / split / "nshards.txt").write_text(f"{len(parts)}\n")
    return root, names, len(samples)


def test_webdataset_root_and_split_folder_find_shards_names_and_templates(cb_root):
    root, names, n = cb_root
    for spec in (root, root / "test"):
        ds = load_eval_dataset(spec)
        assert len(ds) == n and ds.classnames == names and ds.templates == CB_TEMPLATES
        assert ds.labels == [i // 2 for i in range(n)]
        assert ds.load_image(3).size == (48, 48)
    assert len(load_eval_dataset(root / "train")) == 3
    from clipforge.eval.datasets import webdataset_shards

    assert len(webdataset_shards(root, split="train")) == 3


@pytest.mark.slow
def test_clipforge_eval_on_clip_benchmark_folder_uses_its_templates_and_names(cb_root, tmp_path):
    root, names, n = cb_root
    out = tmp_path / "zs.json"
    rc = main(
        ["eval", "--model", "tiny-vit", "--task", "zeroshot", "--data", str(root), "--output", str(out),
         "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["details"]["classnames"] == names
    assert res["config"]["templates"] == CB_TEMPLATES and res["config"]["num_images"] == n
    assert res["metrics"]["num_samples"] == n


def test_classifier_from_clip_benchmark_folder_equals_clip_benchmark_classifier(cb_root):
    from clipforge.eval.zero_shot import zero_shot_classifier
    from clipforge.factory import get_tokenizer

    root, names, _ = cb_root
    model = seeded_model("tiny-vit")
    tokenizer = get_tokenizer(model)
    ds = load_eval_dataset(root)
    ours = zero_shot_classifier(model, tokenizer, ds.classnames, ds.templates, device="cpu")
    theirs = cb_zero_shot_classifier(model, tokenizer, names, CB_TEMPLATES, "cpu", amp=False)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_eval_cli_classnames_and_templates_files(cb_root, tmp_path):
    root, names, _ = cb_root
    renamed = tmp_path / "names.json"
    renamed.write_text(json.dumps({"icons": [f"{n} icon" for n in names]}))
    out = tmp_path / "zs.json"
    rc = main(
        ["eval", "--model", "tiny-vit", "--data", str(root / "test"), "--output", str(out),
         "--classnames", f"{renamed}:icons", "--templates",
         f"{CB_DIR / 'en_zeroshot_classification_templates.json'}:cifar10", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["details"]["classnames"] == [f"{n} icon" for n in names]
    cifar = json.loads((CB_DIR / "en_zeroshot_classification_templates.json").read_text())["cifar10"]
    assert res["config"]["num_templates"] == len(cifar)
