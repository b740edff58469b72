"""The CoCa decoder (full-prefix forward) exports to ONNX the way ``clipforge export`` exports towers.

Not wired into ``clipforge export`` yet: this pins down that the graph exports and runs in ONNX
Runtime with dynamic batch and prefix length, pads included, so a ``--tower decoder`` is plumbing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import clipforge

ort = pytest.importorskip("onnxruntime")


class CaptionDecoder(nn.Module):
    """(image tokens ``[B, Q-1, E]``, caption prefix ``[B, T]``) -> next-token logits ``[B, T, V]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.caption_logits(image_tokens, tokens)


@pytest.mark.parametrize("dynamo", [False, True])
def test_coca_decoder_exports_and_matches_onnx_runtime(tmp_path, dynamo):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-coca").eval()
    with torch.no_grad():
        _, image_tokens = model.encode_image_tokens(torch.randn(2, 3, 32, 32))
    example = torch.tensor([[49406, 320, 1000, 2000, 3000], [49406, 330, 1100, 0, 0]])
    path = tmp_path / "decoder.onnx"
    names = {"input_names": ["image_tokens", "tokens"], "output_names": ["logits"]}
    with torch.no_grad():
        if dynamo:
            batch, length = torch.export.Dim("batch", max=1024), torch.export.Dim("length", min=2, max=32)
            shapes = ({0: batch}, {0: batch, 1: length})
            torch.onnx.export(CaptionDecoder(model), (image_tokens, example), path, dynamo=True,
                              dynamic_shapes=shapes, opset_version=18, **names)  # fmt: skip
        else:
            axes = {
                "image_tokens": {0: "batch"},
                "tokens": {0: "batch", 1: "length"},
                "logits": {0: "batch", 1: "length"},
            }
            torch.onnx.export(CaptionDecoder(model), (image_tokens, example), path, dynamo=False,
                              dynamic_axes=axes, opset_version=17, **names)  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.tensor([[49406, 500, 600, 700, 800, 900, 1000, 49407, 0, 0]] * 3)
    for images, tokens in (
        (image_tokens, example),
        (image_tokens[:1], example[:1, :3]),
        (image_tokens[[0, 1, 0]], other),
    ):
        want = model.caption_logits(images, tokens).detach().numpy()
        got = session.run(None, {"image_tokens": images.detach().numpy(), "tokens": tokens.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
