"""The public API: every exported name resolves, ``import clipforge`` stays light, the quickstart runs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import clipforge

HEAVY = (
    "transformers",
    "open_clip",
    "faiss",
    "fastapi",
    "uvicorn",
    "matplotlib",
    "webdataset",
    "timm",
    "peft",
)


@pytest.mark.parametrize("name", clipforge.__all__)
def test_every_exported_name_resolves(name):
    value = getattr(clipforge, name)
    assert value is not None
    if name != "__version__":
        assert name in dir(clipforge)
        assert getattr(value, "__name__", name) == name  # the real object, not a stand-in


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        clipforge.no_such_thing  # noqa: B018


def test_downstream_names_are_exported():
    from clipforge.conditioning import encode_text_for_conditioning
    from clipforge.guidance import CLIPGuidance

    assert clipforge.CLIPGuidance is CLIPGuidance
    assert clipforge.encode_text_for_conditioning is encode_text_for_conditioning


def test_import_is_light():
    """``import clipforge`` (what the CLI does first) must not pull in optional heavy packages."""
    code = f"import sys, clipforge; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == ""


def test_quickstart_runs_end_to_end_on_random_weights(tmp_path):
    """The design doc's quickstart with the tiny model (``create_model_and_transforms`` is a 3-tuple)."""
    from PIL import Image

    assert {"tiny-vit", "ViT-B-32", "RN50"} <= set(clipforge.list_models())
    torch.manual_seed(0)
    result = clipforge.create_model_and_transforms("tiny-vit")
    assert len(result) == 3
    model, _, preprocess = result
    model.eval()
    tokenizer = clipforge.get_tokenizer("tiny-vit")

    pil = Image.new("RGB", (50, 40), (200, 30, 30))
    pixels = preprocess(pil).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(["a photo of a dog"]), normalize=True)
    assert img.shape == txt.shape == (1, model.config.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(1), atol=1e-5)

    clf = clipforge.zero_shot_classifier(model, tokenizer, ["dog", "cat"], templates="imagenet")
    assert clf.shape == (model.config.embed_dim, 2)
    probs = (100 * img @ clf).softmax(-1)
    assert probs.shape == (1, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(1), atol=1e-5)

    # clipforge.load_checkpoint(model, "file"): a saved model loads back into a fresh one exactly.
    clipforge.save_pretrained(model, tmp_path / "ckpt")
    fresh = clipforge.create_model("tiny-vit").eval()
    clipforge.load_checkpoint(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(pixels, normalize=True), img)


def test_missing_optional_package_names_the_extra(capsys, monkeypatch):
    import clipforge.commands.index as index_command
    from clipforge.cli import main

    def needs_faiss(args):
        raise ModuleNotFoundError("No module named 'faiss'", name="faiss")

    monkeypatch.setattr(index_command, "run", needs_faiss)
    assert main(["index", "emb", "--out", "idx"]) == 2
    assert "pip install 'clipforge[search]'" in capsys.readouterr().err

    def needs_something_else(args):
        raise ModuleNotFoundError("No module named 'nonexistent_pkg'", name="nonexistent_pkg")

    monkeypatch.setattr(index_command, "run", needs_something_else)
    with pytest.raises(ModuleNotFoundError):  # a real bug, not a missing extra: keep the traceback
        main(["index", "emb", "--out", "idx"])


def test_every_command_prints_its_help(capsys):
    """argparse formats help texts with %: one stray '%' in a flag's help breaks --help."""
    import pkgutil

    from clipforge import commands
    from clipforge.cli import main

    names = [m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    assert "train" in names and "embed" in names
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage: clipforge" in capsys.readouterr().out, name
