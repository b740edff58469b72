"""The CoCa decoder (full-prefix forward) exports to ONNX with both exporters, as ``clipforge export`` writes it.

``export_onnx(..., towers=("decoder",))`` with the TorchScript and the dynamo exporter at
``clipforge export``'s opsets: dynamic batch and prefix length, pads included, equal to ONNX
Runtime to 1e-4 (``export_onnx`` verifies on its own inputs; this checks on hand-made prefixes).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import seeded_model

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("dynamo", [False, True])
def test_coca_decoder_exports_and_matches_onnx_runtime(tmp_path, dynamo):
    from clipforge.export import export_onnx

    model = seeded_model("tiny-coca")
    result = export_onnx(model, tmp_path, towers=("decoder",), dynamo=dynamo)
    assert set(result.paths) == {"decoder"} and result.max_abs_diff["decoder"] < 1e-4
    with torch.no_grad():
        _, image_tokens = model.encode_image_tokens(torch.randn(2, 3, 32, 32))
    session = ort.InferenceSession(str(result.paths["decoder"]), providers=["CPUExecutionProvider"])
    example = torch.tensor([[49406, 320, 1000, 2000, 3000], [49406, 330, 1100, 0, 0]])
    other = torch.tensor([[49406, 500, 600, 700, 800, 900, 1000, 49407, 0, 0]] * 3)
    for images, tokens in (
        (image_tokens, example),
        (image_tokens[:1], example[:1, :3]),
        (image_tokens[[0, 1, 0]], other),
    ):
        with torch.no_grad():
            want = model.caption_logits(images, tokens).numpy()
        got = session.run(None, {"image_tokens": images.numpy(), "tokens": tokens.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
