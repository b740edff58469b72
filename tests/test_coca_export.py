"""``clipforge export`` on a CoCa: image, text *and* decoder graphs, verified, enough to caption on ONNX Runtime alone.

The decoder graph takes the image graph's second output (image tokens) and a caption prefix and
returns next-token logits; a greedy loop over the two ONNX graphs must write exactly the tokens
``model.generate(generation_type="greedy")`` writes in PyTorch, on real photos. A CLIP keeps its
two graphs and one output, and asking it for a decoder is a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import seeded_model

from clipforge.model.generate import EOT_TOKEN_ID, SOT_TOKEN_ID

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def coca() -> torch.nn.Module:
    return seeded_model("tiny-coca")


@pytest.fixture(scope="module")
def photos_32(coca) -> torch.Tensor:
    from PIL import Image
    from realdata import photos

    from clipforge.transforms import image_transform

    preprocess = image_transform(coca.preprocess_cfg, is_train=False)
    paths = photos()[:3]
    return torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])


def ort_greedy(image_graph, decoder_graph, images: np.ndarray, seq_len: int, min_seq_len: int) -> np.ndarray:
    """open_clip's greedy loop (EOT forbidden before ``min_seq_len``, forced at ``seq_len``) on ONNX Runtime."""
    features, image_tokens = image_graph.run(None, {"images": images})
    assert features.ndim == 2 and image_tokens.ndim == 3
    out = np.full((images.shape[0], 1), SOT_TOKEN_ID, dtype=np.int64)
    while out.shape[1] < seq_len:
        finished = (out[:, -1] == EOT_TOKEN_ID) | (out[:, -1] == 0)
        if finished.all():
            break
        logits = decoder_graph.run(None, {"image_tokens": image_tokens, "tokens": out})[0][:, -1]
        if out.shape[1] < min_seq_len:
            logits[:, EOT_TOKEN_ID] = -np.inf
        step = logits.argmax(axis=-1)
        if out.shape[1] + 1 == seq_len:
            step[:] = EOT_TOKEN_ID
        step[finished] = 0
        out = np.concatenate([out, step[:, None]], axis=1)
    return out


def test_coca_exports_three_verified_graphs_that_caption_like_generate(coca, photos_32, tmp_path):
    from clipforge.export import export_onnx, towers_for

    assert towers_for(coca) == ("image", "text", "decoder")
    result = export_onnx(coca, tmp_path, towers=towers_for(coca))
    assert {k: p.name for k, p in result.paths.items()} == {
        "image": "image.onnx", "text": "text.onnx", "decoder": "decoder.onnx"
    }  # fmt: skip
    assert set(result.max_abs_diff) == {"image", "text", "decoder"}
    assert max(result.max_abs_diff.values()) < 1e-4, result.max_abs_diff
    image = ort.InferenceSession(str(tmp_path / "image.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in image.get_outputs()] == ["features", "image_tokens"]
    assert [i.name for i in decoder.get_inputs()] == ["image_tokens", "tokens"]
    # the image graph's tokens are the PyTorch ones; features too
    features, tokens = image.run(None, {"images": photos_32.numpy()})
    with torch.no_grad():
        want_features, want_tokens = coca.encode_image_tokens(photos_32)
    np.testing.assert_allclose(features, want_features.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=1e-4, rtol=0)
    # captioning on ONNX Runtime alone writes generate's greedy tokens
    with torch.no_grad():
        want = coca.generate(photos_32, generation_type="greedy", seq_len=12, min_seq_len=5)
    got = ort_greedy(image, decoder, photos_32.numpy(), seq_len=12, min_seq_len=5)
    assert got.shape == tuple(want.shape) and (got == want.numpy()).all(), (got, want)


def test_decoder_torch_export_program_matches_caption_logits(coca, tmp_path):
    from clipforge.export import export_program, graph_inputs

    paths = export_program(coca, tmp_path, towers=("decoder",)).paths
    assert set(paths) == {"decoder"} and paths["decoder"].name == "decoder.pt2"
    program = torch.export.load(paths["decoder"]).module()
    image_tokens, tokens = graph_inputs(coca, "decoder", batch=3, length=7, seed=5)
    with torch.no_grad():
        diff = (program(image_tokens, tokens) - coca.caption_logits(image_tokens, tokens)).abs().max()
    assert float(diff) < 1e-5


def test_export_command_writes_the_decoder_for_a_coca_only(tmp_path, capsys):
    from clipforge.cli import main

    assert main(["export", "--model", "tiny-coca", "--out", str(tmp_path / "coca")]) == 0
    printed = capsys.readouterr().out
    for name in ("image.onnx", "text.onnx", "decoder.onnx"):
        assert (tmp_path / "coca" / name).exists()
        assert name in printed
    assert "3 files written" in printed and "logits [batch, length, 49408]" in printed
    decoder_line = next(line for line in printed.splitlines() if "decoder.onnx" in line)
    assert float(decoder_line.rsplit(" ", 1)[-1]) < 1e-4  # its max abs diff against PyTorch

    # a CLIP is unchanged: two graphs, one output each, and no decoder to ask for
    assert main(["export", "--model", "tiny-vit", "--out", str(tmp_path / "clip")]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["image.onnx", "text.onnx"]
    assert "2 files written" in printed and "decoder" not in printed
    image = ort.InferenceSession(str(tmp_path / "clip" / "image.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in image.get_outputs()] == ["features"]
    assert main(["export", "--model", "tiny-vit", "--out", str(tmp_path / "x"), "--towers", "decoder"]) == 2
    err = capsys.readouterr().err
    assert "no captioning decoder" in err and "tiny-vit" in err
    assert not (tmp_path / "x").exists()
