"""What the CPU fast paths cost in accuracy: zero-shot and retrieval of the demo model, per variant.

    clipforge demo --quick --out /tmp/perf-demo          # trains the model (a few minutes on 2 cores)
    python benchmarks/fast_path_accuracy.py --model-dir /tmp/perf-demo/train/final

Without ``--model-dir`` the quick demo is trained into ``--demo-out`` first (skipped when its
model is already there). The evaluation is the demo's own: zero-shot top-1 on held-out
(shape, colour) combinations for three label sets, and text->image / image->text R@1 on the
held-out and seen ("val") splits of the synthetic shapes data, through ``clipforge.eval``.

Variants, all on the same weights: ``float32`` (``optimize_for_inference``, the reference),
``int8`` (PyTorch dynamic int8 linear layers), ``bf16`` (weights in bfloat16), ``onnx``
(ONNX Runtime float32) and ``onnx-int8`` (onnxruntime dynamic int8 quantisation). Also
printed: the cosine similarity of each variant's image/text features to float32's (min and
mean over the evaluation images / captions).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.demo import QUICK, zero_shot_templates
from clipforge.eval.datasets import load_eval_dataset
from clipforge.eval.runner import evaluate
from clipforge.factory import create_model_from_pretrained, get_tokenizer
from clipforge.inference import optimize_for_inference, trim_tokens

warnings.filterwarnings("ignore")
IMAGE_SIZE = 32


class OnnxCLIP(nn.Module):
    """``encode_image``/``encode_text`` served by onnxruntime sessions of exported towers.

    Holds one dummy float32 parameter so ``clipforge.eval`` finds a device and dtype.
    """

    def __init__(self, model: nn.Module, out_dir: Path, int8: bool, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        from clipforge.export import export_onnx

        paths = export_onnx(model, out_dir, int8=int8).paths
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.sessions = {
            tower: ort.InferenceSession(
                str(paths[f"{tower}-int8" if int8 else tower]), opts, providers=["CPUExecutionProvider"]
            )  # fmt: skip
            for tower in ("image", "text")
        }
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)

    def _run(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        session = self.sessions[tower]
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self._run("image", images.float())
        return nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self._run("text", trim_tokens(tokens))
        return nn.functional.normalize(out, dim=-1) if normalize else out


def variants(model: nn.Module, names: list[str], tmp: Path, threads: int) -> dict[str, nn.Module]:
    built: dict[str, nn.Module] = {}
    for name in names:
        if name == "float32":
            built[name] = optimize_for_inference(model)
        elif name == "int8":
            built[name] = optimize_for_inference(model, quantize=True)
        elif name == "bf16":
            built[name] = optimize_for_inference(model, dtype=torch.bfloat16)
        elif name in ("onnx", "onnx-int8"):
            built[name] = OnnxCLIP(model, tmp / name, int8=name == "onnx-int8", threads=threads)
        else:
            raise SystemExit(f"unknown variant {name!r}")
    return built


def feature_cosines(models: dict[str, nn.Module], images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per variant: (min, mean) cosine to float32 for image features and for text features."""
    unit = nn.functional.normalize  # in float32: a bf16 norm is not 1 to float32 precision
    with torch.inference_mode():
        feats = {
            k: (
                unit(m.encode_image(images.to(next(m.parameters()).dtype)).float(), dim=-1),
                unit(m.encode_text(tokens).float(), dim=-1),
            )
            for k, m in models.items()
        }
    ref_i, ref_t = feats["float32"]
    out = {}
    for k, (img, txt) in feats.items():
        ci, ct = (img * ref_i).sum(-1), (txt * ref_t).sum(-1)
        out[k] = (float(ci.min()), float(ci.mean()), float(ct.min()), float(ct.mean()))
    return out


def evaluate_variant(model: nn.Module, tokenizer: Any, preprocess: Any, n_zs: int, n_ret: int) -> dict:
    metrics: dict[str, float] = {}
    for label in ("colour_shape", "shape", "colour"):
        spec = f"synthetic:shapes?split=heldout&n={n_zs}&label={label}&image_size={IMAGE_SIZE}"
        result = evaluate(model, tokenizer, preprocess, spec, task="zeroshot",
                          templates=zero_shot_templates(label))  # fmt: skip
        metrics[f"zs {label}"] = result["metrics"]["acc1"]
    for split in ("heldout", "val"):
        spec = f"synthetic:shapes?split={split}&n={n_ret}&image_size={IMAGE_SIZE}"
        dataset = load_eval_dataset(spec, task="retrieval", transform=preprocess)
        m = evaluate(model, tokenizer, preprocess, dataset, task="retrieval")["metrics"]
        metrics[f"t2i R@1 {split}"] = m["image_retrieval_recall@1"]
        metrics[f"i2t R@1 {split}"] = m["text_retrieval_recall@1"]
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="a trained demo model (train/final of a demo run)")
    p.add_argument("--demo-out", default="/tmp/perf-demo", help="where to train the quick demo if needed")
    p.add_argument("--variants", default="float32,int8,bf16,onnx,onnx-int8")
    p.add_argument("--zs-images", type=int, default=600, help="held-out images per zero-shot task")
    p.add_argument("--retrieval-images", type=int, default=200, help="images (and captions) per split")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model_dir = args.model_dir
    if model_dir is None:
        model_dir = str(Path(args.demo_out) / "train" / "final")
        if not Path(model_dir).is_dir():
            from clipforge.demo import run_demo

            print(f"training the quick demo into {args.demo_out} ({QUICK.train_samples} samples) ...")
            model_dir = run_demo(args.demo_out, quick=True, progress=False, threads=args.threads).model_dir
    model, preprocess = create_model_from_pretrained(pretrained=model_dir)
    model.eval()
    tokenizer = get_tokenizer(model)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if names[0] != "float32":
        names.insert(0, "float32")
    print(f"model {model_dir}; zero-shot on {args.zs_images} held-out images per label set, retrieval on "
          f"{args.retrieval_images} images per split; threads={args.threads}")  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="clipforge-fastpath-") as tmp:
        models = variants(model, names, Path(tmp), args.threads)
        probe = load_eval_dataset(f"synthetic:shapes?split=heldout&n=256&image_size={IMAGE_SIZE}",
                                  task="retrieval", transform=preprocess)  # fmt: skip
        images = torch.stack([probe[i][0] for i in range(len(probe))])
        tokens = tokenizer([c[0] if isinstance(c, list) else c for c in probe.captions])
        cosines = feature_cosines(models, images, tokens)
        results = {k: evaluate_variant(m, tokenizer, preprocess, args.zs_images, args.retrieval_images)
                   for k, m in models.items()}  # fmt: skip

    keys = list(results["float32"])
    print(f"\n{'variant':10s} " + " ".join(f"{k:>20s}" for k in keys))
    for name, metrics in results.items():
        cells = []
        for k in keys:
            delta = metrics[k] - results["float32"][k]
            cells.append(
                f"{100 * metrics[k]:6.1f}%" + (f" ({100 * delta:+5.1f})" if name != "float32" else " " * 8)
            )
        print(f"{name:10s} " + " ".join(f"{c:>20s}" for c in cells))
    print("\nfeature cosine to float32 on 256 held-out images / their captions: "
          "image min / mean, text min / mean")  # fmt: skip
    for name, (imin, imean, tmin, tmean) in cosines.items():
        print(f"  {name:10s} image {imin:.5f} / {imean:.5f}   text {tmin:.5f} / {tmean:.5f}")


if __name__ == "__main__":
    main()
