"""A custom architecture end to end through the CLI: ``train --model my-arch.json``, then every
later command from the trained folder alone (no ``--model``), and every output naming the real
architecture and storing its config, so the search service rebuilds exactly that model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from search_fixtures import make_images

from clipforge.checkpoints.config_file import read_config_file
from clipforge.cli import main
from clipforge.factory import create_model_and_transforms, get_tokenizer

LABEL = "custom (from my-arch.json)"
#: open_clip's JSON form; no registered architecture has these shapes (or a 32-token context).
MY_ARCH = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom-arch")
    arch = root / "my-arch.json"
    arch.write_text(json.dumps(MY_ARCH, indent=4))
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--model", str(arch), "--data", "synthetic:shapes?n=16&image_size=32",
                     "--batch-size", "8", "--epochs", "1", "--threads", "1", "--no-progress",
                     "--output-dir", str(root / "run")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    make_images(root / "images", n=8, broken=False, duplicates=0)
    return root, read_config_file(arch)


def test_training_saves_the_resolved_config_with_the_run(trained):
    root, cfg = trained
    saved = json.loads((root / "run" / "model_config.json").read_text())
    assert saved == {"architecture": LABEL, "model_config": cfg.to_dict()}
    final = json.loads((root / "run" / "final" / "config.json").read_text())
    assert final["model_config"] == cfg.to_dict() and final["extra"]["architecture"] == LABEL


def test_embed_index_search_serve_from_the_trained_folder_alone(trained, capsys):
    from fastapi.testclient import TestClient

    from clipforge.search.searcher import Searcher
    from clipforge.search.server import create_app
    from clipforge.search.tables import read_table

    root, cfg = trained
    final, emb, idx = root / "run" / "final", root / "emb", root / "idx"
    assert main(["embed", "--pretrained", str(final), "--images", str(root / "images"), "--out", str(emb),
                 "--workers", "0", "--dtype", "float32"]) == 0  # fmt: skip
    manifest = json.loads((emb / "embed_manifest.json").read_text())
    assert manifest["model"] == LABEL and manifest["model_config"] == cfg.to_dict()

    model, _, preprocess = create_model_and_transforms(pretrained=str(final))
    model.eval()
    from PIL import Image

    paths = read_table(emb / "meta_00000.csv")["path"]
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
    np.testing.assert_allclose(np.load(emb / "img_emb_00000.npy"), direct.numpy(), atol=1e-6)

    assert main(["index", str(emb), "--out", str(idx)]) == 0
    searcher = Searcher(idx)
    assert searcher.architecture == LABEL and searcher.model_config == cfg.to_dict()
    searcher.ensure_model()
    assert searcher.model.config == cfg
    with torch.no_grad():
        tokens = get_tokenizer(model)(["a red circle"])
        want = model.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(searcher.encode_text(["a red circle"]), want, atol=1e-6)

    client = TestClient(create_app(searcher, warmup=False))
    health = client.get("/health").json()
    assert health["model"] == LABEL and health["model_config"] == cfg.to_dict()
    answer = client.get("/search", params={"text": "a red circle", "k": 3}).json()
    assert answer["model"] == LABEL and len(answer["results"]) == 3
    capsys.readouterr()


def test_eval_and_bench_from_the_trained_folder_alone(trained, capsys):
    root, cfg = trained
    final, out = root / "run" / "final", root / "eval.json"
    assert main(["eval", "--pretrained", str(final), "--task", "retrieval", "--data",
                 "synthetic:shapes?n=8&image_size=32", "--output", str(out), "--no-progress",
                 "--device", "cpu"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["model"] == LABEL and result["model_config"] == cfg.to_dict()
    capsys.readouterr()
    assert main(["bench", "--pretrained", str(final), "--rounds", "1", "--batch-size", "2",
                 "--kinds", "image", "--device", "cpu", "--threads", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith(f"{LABEL} ({final}")


def test_a_wrong_model_name_no_longer_renames_the_outputs(trained):
    """The old workaround (`embed --model tiny-vit --pretrained RUN/final`) used to record
    'tiny-vit' for a model that is not tiny-vit; the checkpoint's own config and name win."""
    root, cfg = trained
    emb = root / "emb-named"
    assert main(["embed", "--model", "tiny-vit", "--pretrained", str(root / "run" / "final"), "--images",
                 str(root / "images"), "--out", str(emb), "--workers", "0"]) == 0  # fmt: skip
    manifest = json.loads((emb / "embed_manifest.json").read_text())
    assert manifest["model"] == LABEL and manifest["model_config"] == cfg.to_dict()


def test_commands_without_model_or_pretrained_say_what_to_give(capsys):
    assert main(["embed", "--images", "x", "--out", "y"]) == 2
    assert "give --model" in capsys.readouterr().err


def test_fine_tuning_a_trained_folder_needs_no_model(trained, caplog):
    root, cfg = trained
    threads = torch.get_num_threads()
    try:
        with caplog.at_level("WARNING"):
            code = main(["train", "--pretrained", str(root / "run" / "final"), "--data",
                         "synthetic:shapes?n=8&image_size=32", "--batch-size", "8", "--max-steps", "1",
                         "--threads", "1", "--no-progress", "--output-dir", str(root / "tuned")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert not [r for r in caplog.records if "differs from" in r.getMessage()]  # no stray default name
    saved = json.loads((root / "tuned" / "model_config.json").read_text())
    assert saved == {"architecture": LABEL, "model_config": cfg.to_dict()}
