"""``--loss coca``: value and gradients against open_clip's ``CoCaLoss``, exact accumulation, training runs."""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.objectives.coca import CoCaLoss, caption_inputs
from clipforge.train.task import ContrastiveTask, split_micro_batches

open_clip_loss = pytest.importorskip("open_clip.loss")


def batch(model: torch.nn.Module, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    context = model.context_length
    tokens = torch.zeros(n, context, dtype=torch.long)
    for i in range(n):
        length = 4 + (5 * i) % (context - 4)
        tokens[i, 0], tokens[i, length - 1] = 49406, 49407
        tokens[i, 1 : length - 1] = torch.randint(1, 49405, (length - 2,), generator=gen)
    tokens[0, 2] = 0  # "!" is id 0 = the pad id: ignored by the caption CE, as in open_clip
    return images, tokens


def grads_of(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 0.0)])
def test_coca_loss_equals_open_clip_in_value_and_gradients(weights):
    caption_w, clip_w = weights
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-coca").double()
    images, tokens = batch(model, 6)
    out = model(images.double(), tokens)
    ref = open_clip_loss.CoCaLoss(caption_loss_weight=caption_w, clip_loss_weight=clip_w)
    ref_terms = ref(out.image_features, out.text_features, out.logits, out.labels, out.logit_scale)
    ref_loss = ref_terms[0] + ref_terms[1]
    ref_grads = grads_of(model, ref_loss)

    out = model(images.double(), tokens)
    ours = CoCaLoss(caption_loss_weight=caption_w, clip_loss_weight=clip_w)
    loss = ours(out.image_features, out.text_features, out.logit_scale, **caption_inputs(out, 6))
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=0)
    assert ours.last_terms["caption_loss"] == pytest.approx(float(ref_terms[1].detach()), abs=1e-12)
    got = grads_of(model, loss)
    assert set(got) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-12, rtol=0, msg=name)


def test_accumulation_with_caption_terms_equals_full_batch():
    from clipforge.objectives.combined import build_objective

    def run(accum: int) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = clipforge.create_model("tiny-coca").double()
        images, tokens = batch(model, 8, seed=1)
        task = ContrastiveTask(model, build_objective("coca"))
        out = task.forward_backward(split_micro_batches(images.double(), tokens, accum))
        assert "caption_loss" in out.metrics and "contrastive_loss" in out.metrics
        return out.metrics["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}

    full_loss, full = run(1)
    acc_loss, acc = run(4)
    assert acc_loss == pytest.approx(full_loss, abs=1e-6)
    # clipforge's LayerNorm computes in float32 even for float64 inputs: float32-level agreement.
    for name, g in full.items():
        torch.testing.assert_close(acc[name], g, atol=1e-6, rtol=0, msg=name)


def test_coca_loss_on_a_clip_model_is_refused():
    from clipforge.errors import ConfigError
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train

    with pytest.raises(ConfigError, match="needs a CoCa model"):
        train(
            TrainConfig.from_flat(
                data="synthetic:shapes?n=8&image_size=32", model="tiny-vit", loss="coca", progress=False
            )
        )


def held_caption_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """Caption cross-entropy of a fixed batch (no gradient): the term ``--loss coca`` trains."""
    from clipforge.objectives.coca import caption_terms

    model.eval()
    with torch.no_grad():
        out = model(images, tokens)
        nll, count = caption_terms(out.logits, out.labels)
    return float(nll.sum() / count.sum())


def test_a_few_coca_training_steps_on_shapes_reduce_the_caption_loss(tmp_path):
    """clipforge train --model tiny-coca --loss coca on synthetic:shapes: 6 steps of batch 8."""
    from clipforge.data.synthetic import SyntheticShapes
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train
    from clipforge.transforms import image_transform

    cfg = TrainConfig.from_flat(
        data="synthetic:shapes?n=48&split=train&image_size=32", model="tiny-coca", loss="coca",
        output_dir=str(tmp_path / "run"), max_steps=6, batch_size=8, lr=2e-3, warmup_steps=0,
        schedule="const", seed=0, workers=0, progress=False, save_every_epochs=0, log_every=1,
    )  # fmt: skip
    torch.manual_seed(cfg.runtime.seed)
    initial = clipforge.create_model("tiny-coca")  # untrained, as training starts
    train(cfg)
    final = clipforge.create_model(pretrained=str(tmp_path / "run" / "final"))
    held = SyntheticShapes(16, split="val", seed=5, image_size=32)
    preprocess = image_transform(final.preprocess_cfg, is_train=False)
    images = torch.stack([preprocess(held.get_image(i)) for i in range(len(held))])
    tokens = clipforge.get_tokenizer(final)([held.caption_for(i) for i in range(len(held))])
    before, after = held_caption_loss(initial, images, tokens), held_caption_loss(final, images, tokens)
    assert before > 9.0  # about ln(49408) = 10.8 for an untrained 49k-token head
    print(f"held-out caption CE {before:.2f} -> {after:.2f}")
    assert after < before - 2.0, (before, after)
