"""Inference fast paths: each must give the outputs of the plain model (or say how far it moves them)."""

from __future__ import annotations

import pytest
import torch
from test_models import build, images_for, make_tokens

from clipforge.bench import feature_agreement, realistic_captions, resolve_device, run_bench
from clipforge.errors import ConfigError
from clipforge.export import example_inputs, export_onnx, export_program
from clipforge.inference import encode_images, encode_texts, optimize_for_inference, trim_tokens
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config


def test_trim_tokens_keeps_up_to_last_eot() -> None:
    tokens = make_tokens(3, [4, 11, 7])
    assert trim_tokens(tokens).shape == (3, 11)
    assert torch.equal(trim_tokens(tokens), tokens[:, :11])
    assert trim_tokens(torch.zeros(0, 77, dtype=torch.long)).shape == (0, 77)


def test_encode_texts_buckets_and_restores_order() -> None:
    model = build("tiny-vit").eval()
    lengths = [30, 4, 17, 9, 77, 5, 12]
    tokens = make_tokens(len(lengths), lengths, seed=5)
    with torch.no_grad():
        model.text.trim = False
        reference = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        model.text.trim = True
    for bucket in (True, False):
        got = encode_texts(model, tokens, batch_size=3, bucket=bucket)
        assert got.shape == (7, 64) and (got - reference).abs().max() < 1e-5
    assert encode_texts(model, tokens[:0]).shape == (0, 64)


def test_encode_images_batches() -> None:
    model = build("tiny-rn").eval()
    images = images_for(model, batch=5)
    with torch.no_grad():
        reference = model.encode_image(images, normalize=True)
    got = encode_images(model, images, batch_size=2)
    assert (got - reference).abs().max() < 1e-5


def test_resnet_fused_channels_last_is_identical() -> None:
    model = build("tiny-rn")
    with torch.no_grad():  # non-trivial BatchNorm statistics so folding them is really tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.1)
    model.eval()
    fast = optimize_for_inference(model)
    assert fast is not model and isinstance(model.visual.bn1, torch.nn.BatchNorm2d)  # original untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.visual.modules())
    assert fast.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = images_for(model, batch=3)
    with torch.no_grad():
        ref = model.encode_image(images)
        got = fast.encode_image(images)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5


def test_bf16_weights_take_float32_pixels() -> None:
    model = build("tiny-vit").eval()
    half = optimize_for_inference(model, dtype=torch.bfloat16)
    assert (
        half.visual.conv1.weight.dtype == torch.bfloat16 and model.visual.conv1.weight.dtype == torch.float32
    )
    images = images_for(model, batch=3)
    got = encode_images(half, images)  # pixels are cast to the model's dtype
    assert got.dtype == torch.float32
    _, cos = feature_agreement(got, encode_images(model, images))
    assert cos > 0.99
    with pytest.raises(ConfigError, match="quantize or dtype"):
        optimize_for_inference(model, quantize=True, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_int8_quantisation_keeps_features_close(name: str) -> None:
    model = build(name).eval()
    quantized = optimize_for_inference(model, quantize=True)
    assert any(
        "Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in quantized.modules()
    )
    images, tokens = images_for(model, batch=4), make_tokens(4, [5, 9, 20, 33])
    with torch.no_grad():
        _, cos_image = feature_agreement(quantized.encode_image(images), model.encode_image(images))
        _, cos_text = feature_agreement(quantized.encode_text(tokens), model.encode_text(tokens))
    assert cos_image > 0.99 and cos_text > 0.99


def test_compiled_towers_match_eager() -> None:
    """Graph capture through dynamo + AOT autograd on a one-block model (cheap to trace).

    ``aot_eager`` runs the captured, functionalised graph without generating code: it checks
    what ``torch.compile`` changes about the model (tracing, trimming outside the graph, dynamic
    shapes) in seconds; inductor's code generation is PyTorch's to test.
    """
    torch._dynamo.reset()
    cfg = get_model_config("tiny-vit").replace(
        embed_dim=16,
        vision={"width": 32, "layers": 1, "head_width": 16, "image_size": 16},
        text={"width": 32, "heads": 2, "layers": 1, "context_length": 16, "vocab_size": 50000},
    )
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    compiled = optimize_for_inference(model, compile="aot_eager")
    images = images_for(model, batch=2)
    tokens = make_tokens(3, [5, 9, 14], context=16)
    with torch.no_grad():
        assert (compiled.encode_image(images) - model.encode_image(images)).abs().max() < 1e-6
        for rows in (tokens, tokens[:2], tokens[1:]):  # other batch sizes and trimmed lengths
            assert (compiled.encode_text(rows) - model.encode_text(rows)).abs().max() < 1e-6
    # One graph per tower: new batch sizes and lengths must not recompile.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert set(compiled.state_dict()) == set(model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_onnx_round_trip(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build(name).eval()
    result = export_onnx(model, tmp_path, verify=True, int8=True)  # ResNet: BatchNorm-folded convs stay float
    assert set(result.paths) == {"image", "text", "image-int8", "text-int8"}
    assert all(v < 1e-4 for v in result.max_abs_diff.values())
    assert all(0.99 <= v <= 1.0 + 1e-6 for v in result.min_cos.values()) and len(result.min_cos) == 2
    # Independent check: other batch sizes and a trimmed text length through the saved graphs.
    text = ort.InferenceSession(str(result.paths["text"]), providers=["CPUExecutionProvider"])
    tokens = make_tokens(4, [3, 8, 15, 6], seed=9)
    got = text.run(None, {"tokens": trim_tokens(tokens).numpy()})[0]
    with torch.no_grad():
        assert abs(got - model.encode_text(tokens).numpy()).max() < 1e-4
    image = ort.InferenceSession(str(result.paths["image"]), providers=["CPUExecutionProvider"])
    images = images_for(model, batch=5, seed=3)
    with torch.no_grad():
        assert (
            abs(image.run(None, {"images": images.numpy()})[0] - model.encode_image(images).numpy()).max()
            < 1e-4
        )


def test_torch_export_program(tmp_path) -> None:
    model = build("tiny-vit").eval()
    paths = export_program(model, tmp_path, towers=("text",)).paths
    program = torch.export.load(paths["text"]).module()
    tokens = example_inputs(model, "text", batch=3, length=20, seed=4)
    with torch.no_grad():
        assert (program(tokens) - model.encode_text(tokens)).abs().max() < 1e-5
    half = optimize_for_inference(model, dtype=torch.bfloat16)
    export_program(half, tmp_path / "bf16", towers=("text",))  # exports a float32 copy
    assert half.text.token_embedding.weight.dtype == torch.bfloat16


def test_export_command(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    from clipforge.cli import main

    torch.manual_seed(0)  # random weights: int8 cosine of a random tiny model varies (0.994-0.999)
    assert main(["export", "--model", "tiny-vit", "--out", str(tmp_path), "--towers", "text", "--int8"]) == 0
    assert (tmp_path / "text.onnx").exists() and not (tmp_path / "image.onnx").exists()
    assert (tmp_path / "text.int8.onnx").exists()
    out = capsys.readouterr().out
    assert "max abs diff" in out and "min cosine vs float32" in out
    assert main(["export", "--model", "tiny-vit", "--out", str(tmp_path), "--towers", "audio"]) == 2


def test_realistic_captions() -> None:
    captions = realistic_captions(200, seed=1)
    counts = [len(c.split()) for c in captions]
    assert min(counts) >= 5 and max(counts) <= 30 and len(set(counts)) > 10
    assert captions == realistic_captions(200, seed=1)


def test_bench_rows_compare_variants() -> None:
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = build("tiny-vit")
    rows = run_bench(model, variants=["open_clip", "clipforge", "int8"], batch_size=4, rounds=1, num_texts=8)
    assert [(r.kind, r.variant) for r in rows] == [
        ("image", "open_clip"), ("image", "clipforge"), ("image", "int8"),
        ("text", "open_clip"), ("text", "clipforge"), ("text", "int8"),
    ]  # fmt: skip
    by = {(r.kind, r.variant): r for r in rows}
    for kind in ("image", "text"):
        assert by[kind, "open_clip"].ratio == 1.0
        assert by[kind, "clipforge"].max_abs_diff < 1e-5 and by[kind, "clipforge"].items_per_s > 0
        assert by[kind, "int8"].min_cos > 0.99


def test_bench_command_rejects_bad_input() -> None:
    from clipforge.cli import main

    assert main(["bench", "--model", "tiny-vit", "--kinds", "audio"]) == 2
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_bench_command_prints_table(capsys) -> None:
    from clipforge.cli import main

    args = ["bench", "--model", "tiny-vit", "--kinds", "text", "--batch-size", "2", "--rounds", "1"]
    assert main([*args, "--int8", "--device", "cpu", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny-vit (random weights)  cpu (1 threads)  batch 2" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("text ")]
    assert [r[1] for r in rows] == ["clipforge", "int8"] and float(rows[0][3]) > 0
