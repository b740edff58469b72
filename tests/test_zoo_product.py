"""The product on a tiny instance of every model-zoo family: train, zero-shot eval, embed, ONNX export.

Each family's registered tiny instance (``clipforge.model.zoo_tiny``: SigLIP, SigLIP 2, ConvNeXt,
EVA-02, MobileCLIP, PE) and a tiny XLM-R text tower (a local ``transformers`` config and a
SentencePiece tokenizer trained here, in a model-config JSON file as a user would write one) go
through the CLI as users run it, on real Adwaita icons in a CSV:

- ``clipforge train``: 4 steps on one batch of 8 icons; the logged loss must fall;
- ``clipforge eval --task zeroshot`` on an icon folder of 2 classes, from the trained checkpoint;
- ``clipforge embed`` of those icons: stored vectors equal ``encode_image`` of the checkpoint;
- ``clipforge export``: the ONNX graph run by onnxruntime on real icons equals ``encode_image``.

Where a family cannot take an option (patch dropout in a convolutional trunk), the refusal is
checked instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import realdata
import torch
from helpers import run_cli, seeded_model
from PIL import Image

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

FAMILIES = [
    "tiny-siglip",
    "tiny-siglip2",
    "tiny-convnext",
    "tiny-eva02",
    "tiny-mobileclip",
    "tiny-pe",
    "tiny-xlmr",
]
# Text graphs too for SigLIP 2 (bidirectional attention, last-token pool, GELU-tanh: tiny-siglip's and
# tiny-mobileclip's options and one more) and XLM-R (Hugging Face); the rest is clipforge's causal
# text tower, which the export tests cover.
EXPORT_TEXT = {"tiny-siglip2", "tiny-xlmr"}
# SigLIP models train with the sigmoid loss, as their papers and open_clip_train's --siglip do.
LOSS = {"tiny-siglip": "siglip", "tiny-siglip2": "siglip"}
MEASURED: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="session")
def icon_data(tmp_path_factory) -> dict[str, Path]:
    """8 captioned icons in a CSV (train), and a 2-class folder of 6 other icons (zero-shot, embed)."""
    root = tmp_path_factory.mktemp("zoo_data")
    found = realdata.icons("48x48")
    train = found[:: max(1, len(found) // 8)][:8]
    csv = root / "train.csv"
    csv.write_text(
        "image,caption\n" + "".join(f"{p},{realdata.concept(p)}\n" for p in train), encoding="utf-8"
    )
    folder = root / "classes"
    for cls in ("devices", "places"):
        (folder / cls).mkdir(parents=True)
        for p in [p for p in found if p.parent.name == cls][:3]:
            (folder / cls / p.name).write_bytes(p.read_bytes())
    return {"csv": csv, "folder": folder, "captions": [realdata.concept(p) for p in train]}


def _xlmr_config(root: Path, captions: list[str]) -> Path:
    """A clipforge model config with a 2-layer XLM-R text tower and its SentencePiece tokenizer."""
    import sentencepiece as spm
    import transformers

    hf = root / "xlmr"
    hf.mkdir(parents=True)
    lines = captions * 4 + [
        f"{w} {v}" for w in ("a photo of", "an icon of", "devices", "places") for v in captions
    ]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(hf / "sentencepiece.bpe"), vocab_size=200,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    tok = transformers.XLMRobertaTokenizerFast(vocab_file=str(hf / "sentencepiece.bpe.model"))
    tok.save_pretrained(hf)
    transformers.XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ).save_pretrained(hf)  # fmt: skip
    cfg = {
        "embed_dim": 64,
        "custom_text": True,
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text": {"context_length": 32, "hf_model_name": str(hf), "hf_tokenizer_name": str(hf),
                 "hf_pooler_type": "mean", "hf_proj_type": "mlp"},
    }  # fmt: skip
    path = root / "tiny-xlmr.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def model_arg(icon_data, tmp_path_factory):
    """``--model`` value per family: the registered name, or the XLM-R config file."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name == "tiny-xlmr" and name not in cache:
            cache[name] = str(_xlmr_config(tmp_path_factory.mktemp("xlmr"), icon_data["captions"]))
        return cache.get(name, name)

    return get


_main = run_cli


@pytest.fixture(scope="module")
def trained(icon_data, model_arg, tmp_path_factory):
    """``clipforge train`` once per family: (run folder, logged losses); removed after this file."""
    runs: dict[str, tuple[Path, list[float]]] = {}

    def get(name: str) -> tuple[Path, list[float]]:
        if name not in runs:
            out = tmp_path_factory.mktemp(f"run-{name}")
            rc = _main(["train", "--data", str(icon_data["csv"]), "--model", model_arg(name), "--batch-size", "8",
                        "--max-steps", "4", "--lr", "2e-3", "--warmup-steps", "0", "--schedule", "const",
                        "--loss", LOSS.get(name, "clip"), "--log-every", "1", "--threads", "1", "--workers", "0",
                        "--no-progress", "--output-dir", str(out)])  # fmt: skip
            assert rc == 0, f"{name}: clipforge train exited {rc}"
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            runs[name] = out, [r["loss"] for r in rows if r.get("kind") == "train"]
        return runs[name]

    yield get
    for run, _ in runs.values():
        shutil.rmtree(run, ignore_errors=True)


def _reference(final: Path, folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """The checkpoint's preprocessed icons (sorted paths) and their ``encode_image`` features."""
    from clipforge.factory import create_model_and_transforms

    model, _, preprocess = create_model_and_transforms(pretrained=str(final))
    paths = sorted(folder.rglob("*.png"))
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p)) for p in paths])
        return images, model.eval().encode_image(images), paths


@pytest.mark.parametrize("name", FAMILIES)
def test_train_eval_embed_export(name, trained, icon_data, tmp_path) -> None:
    run, losses = trained(name)
    final = run / "final"
    assert len(losses) == 4 and all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], f"{name}: loss did not fall over 4 steps on one batch: {losses}"
    MEASURED.setdefault(name, {}).update(loss_first=losses[0], loss_last=losses[-1])

    zs = tmp_path / "zs.json"
    assert _main(["eval", "--pretrained", str(final), "--task", "zeroshot", "--data", str(icon_data["folder"]),
                  "--templates", "simple", "--output", str(zs), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    res = json.loads(zs.read_text())
    assert res["details"]["classnames"] == ["devices", "places"]
    assert (
        0.0 <= res["metrics"]["acc1"] <= 1.0 and res["metrics"]["acc5"] == 1.0
    )  # 2 classes: top-5 holds both

    images, want, paths = _reference(final, icon_data["folder"])
    emb = tmp_path / "emb"
    assert _main(["embed", "--pretrained", str(final), "--images", str(icon_data["folder"]), "--out", str(emb),
                  "--workers", "0", "--dtype", "float32", "--no-captions"]) == 0  # fmt: skip
    stored = np.load(emb / "img_emb_00000.npy")
    normed = torch.nn.functional.normalize(want, dim=-1).numpy()
    embed_diff = float(np.abs(stored - normed).max())
    assert stored.shape == (len(paths), want.shape[1]) and embed_diff < 1e-5, embed_diff

    towers = "image,text" if name in EXPORT_TEXT else "image"
    onnx = tmp_path / "onnx"
    assert _main(["export", "--pretrained", str(final), "--out", str(onnx), "--towers", towers]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx / "image.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    onnx_diff = float(np.abs(got - want.numpy()).max())
    MEASURED[name].update(embed_diff=embed_diff, onnx_diff=onnx_diff, acc1=res["metrics"]["acc1"])
    print(f"\n{name}: {MEASURED[name]}")
    assert onnx_diff < 1e-4 and float(want.abs().max()) > 1e-3, (onnx_diff, float(want.abs().max()))


def test_patch_dropout_refused_by_a_convolutional_trunk(icon_data, tmp_path, capsys) -> None:
    """timm's ConvNeXt has no patch dropout: train says which option and model, no traceback."""
    rc = _main(["train", "--data", str(icon_data["csv"]), "--model", "tiny-convnext", "--patch-dropout", "0.5",
                "--max-steps", "1", "--threads", "1", "--no-progress", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        rc == 2 and "'convnext_base'" in err and "patch_drop_rate" in err and "vision.patch_dropout" in err
    ), err


def test_lora_on_a_timm_trunk_takes_timms_layer_names(icon_data, tmp_path) -> None:
    """LoRA's default targets are CLIP's layer names (in_proj, c_fc ...); a timm ViT's are qkv,
    fc1, fc2. Named so, the trunk's adapted weights change (merged into the checkpoint) and
    everything else in it stays exactly as initialised."""
    from clipforge.factory import create_model
    from clipforge.train.trainer import seed_everything

    out = tmp_path / "run"
    assert _main(["train", "--data", str(icon_data["csv"]), "--model", "tiny-siglip", "--batch-size", "8",
                  "--max-steps", "2", "--lora-rank", "4", "--lora-targets", "qkv,fc1,fc2,in_proj,out_proj",
                  "--threads", "1", "--workers", "0", "--no-progress", "--output-dir", str(out)]) == 0  # fmt: skip
    seed_everything(0)  # train's default --seed: the run's initial weights
    init = create_model("tiny-siglip").state_dict()
    final = create_model(pretrained=str(out / "final")).state_dict()
    assert set(init) == set(final)
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    adapted = {k for k in init if k.endswith(("attn.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight"))}
    assert {k for k in changed if k.startswith("visual.")} == {k for k in adapted if k.startswith("visual.")}
    assert len(adapted) == 8 and "visual.trunk.patch_embed.proj.weight" not in changed  # 2 blocks + MAP pool


def test_int8_fast_path_keeps_a_biased_text_projection() -> None:
    """SigLIP's text projection is an ``nn.Linear`` (with bias); dynamic int8 replaces it by a
    quantised Linear, which the tower must still call (it used to be matrix-multiplied: TypeError)."""
    from clipforge.inference import optimize_for_inference

    model = seeded_model("tiny-siglip")
    int8 = optimize_for_inference(model, quantize=True)
    tokens = torch.randint(1, 49000, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.encode_text(tokens), int8.encode_text(tokens)
    assert type(int8.text.text_projection) is not torch.nn.Linear  # quantised
    assert torch.nn.functional.cosine_similarity(want, got).min() > 0.99
