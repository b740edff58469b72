"""Training on NaFlex batches: SigLIP 2 at native aspect ratio through ``clipforge train``.

The zoo's tiny SigLIP 2 saved with NaFlex preprocessing (8 px patches, at most 16), trained on
real Adwaita icons cropped to square, wide and tall boxes, so every batch mixes patch counts
and needs the padded collate; the first-step and accumulation checks also run on a tiny timm
``NaFlexVit`` trunk (what open_clip main's named NaFlex models are built on). Oracles: the library's own ``encode_image`` on each image alone
(unpadded) and ``encode_text``, the same run without accumulation, and an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli, threads_kept
from PIL import Image
from realdata import concept, icons
from safetensors.torch import load_file

import clipforge.train.trainer as trainer
from clipforge.naflex_transforms import (
    NaFlexCollate,
    NaFlexTrainTransform,
    NaFlexTransform,
    chunk_images,
    naflex_collate,
)
from clipforge.train.config import TrainConfig

pytest.importorskip("timm")

PATCH, MOST = 8, 16


def _boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Square, wide, tall and a wide middle band: four patch grids from one icon."""
    return [(0, 0, w, h), (0, 0, w, h // 3), (0, 0, w // 2, h), (0, h // 4, w, 3 * h // 4)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(NaFlex checkpoint, caption folder of 16 icon crops of mixed aspect ratios)."""
    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model
    from clipforge.transforms import PreprocessConfig

    root = tmp_path_factory.mktemp("naflex_train")
    torch.manual_seed(0)
    model = create_model("tiny-siglip2")
    pre = PreprocessConfig.from_dict(
        {**model.preprocess_cfg.to_dict(), "naflex_max_patches": MOST, "naflex_patch_size": PATCH}
    )
    save_pretrained(model, root / "ckpt", preprocess_cfg=pre)
    folder = root / "data"
    folder.mkdir()
    for i, p in enumerate(icons("48x48")[:16]):
        with Image.open(p) as im:
            im.crop(_boxes(*im.size)[i % 4]).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(concept(p))
    return root / "ckpt", folder


@pytest.fixture(scope="module")
def naflexvit_setup(setup, tmp_path_factory) -> tuple[Path, Path]:
    """The same, on timm's ``NaFlexVit`` trunk (open_clip main's SigLIP 2 NaFlex models), shrunk."""
    import dataclasses

    from clipforge.checkpoints.clipforge_format import save_pretrained
    from clipforge.factory import create_model
    from clipforge.model.zoo_tiny import tiny_configs
    from clipforge.transforms import PreprocessConfig

    cfg = tiny_configs()["tiny-siglip2"]
    shrink = {"patch_size": PATCH, "embed_dim": 64, "depth": 2, "num_heads": 2, "pos_embed_grid_size": (4, 4)}
    vision = dataclasses.replace(
        cfg.vision, timm_model_name="naflexvit_base_patch16_siglip", timm_kwargs=shrink
    )
    torch.manual_seed(0)
    model = create_model(dataclasses.replace(cfg, vision=vision))
    assert type(model.visual.trunk).__name__ == "NaFlexVit"
    pre = PreprocessConfig.from_dict(
        {**model.preprocess_cfg.to_dict(), "naflex_max_patches": MOST, "naflex_patch_size": PATCH}
    )
    ckpt = tmp_path_factory.mktemp("naflexvit") / "ckpt"
    save_pretrained(model, ckpt, preprocess_cfg=pre)
    return ckpt, setup[1]


def _setup_for(request: pytest.FixtureRequest, trunk: str) -> tuple[Path, Path]:
    return request.getfixturevalue("setup" if trunk == "siglip" else "naflexvit_setup")


def _cfg(setup: tuple[Path, Path], out: Path, **options: object) -> TrainConfig:
    ckpt, folder = setup
    flat = dict(data=str(folder), pretrained=str(ckpt), batch_size=8, max_steps=1, loss="siglip", workers=0,
                progress=False, threads=1, log_every=1, lr=1e-3, seed=5)  # fmt: skip
    return TrainConfig.from_flat(output_dir=str(out), **{**flat, **options})


def _train(cfg: TrainConfig):
    with threads_kept():
        return trainer.train(cfg)


def _photo_crops() -> list[Image.Image]:
    with Image.open(icons("96x96")[0]) as im:
        return [im.crop(box) for box in _boxes(*im.size)]


# --- the train transform ------------------------------------------------------------------------
def test_train_transform_is_a_random_crop_at_native_aspect_then_the_eval_resize():
    from clipforge.transforms import PreprocessConfig, image_transform

    cfg = PreprocessConfig.from_dict({"naflex_max_patches": 64, "naflex_patch_size": PATCH})
    evaluate, train = image_transform(cfg), image_transform(cfg, is_train=True)
    assert isinstance(train, NaFlexTrainTransform) and train.scale == (0.9, 1.0)
    assert train.ratio == pytest.approx((0.75, 4 / 3))
    whole = image_transform(cfg, is_train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = image_transform(cfg, is_train=True, hflip=1.0)
    crops = 0
    for im in _photo_crops():
        assert torch.equal(whole(im)["patches"], evaluate(im)["patches"])  # no crop: the eval patches
        for seed in range(6):
            torch.manual_seed(seed)
            box = train.crop_box(*im.size)
            torch.manual_seed(seed)
            got = train(im)
            assert torch.equal(got["patches"], evaluate(im.crop(box))["patches"])
            torch.manual_seed(seed)  # flip draws after the crop: the same box, mirrored
            mirrored = im.crop(box).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            assert torch.equal(flipped(im)["patches"], evaluate(mirrored)["patches"])
            w, h = box[2] - box[0], box[3] - box[1]
            if (w, h) != im.size:
                crops += 1
                assert 0.9 - 0.1 <= w * h / (im.size[0] * im.size[1]) <= 1.0
                slack = 2 / min(w, h)  # rounding the sides to pixels
                assert abs(math.log((w / h) / (im.size[0] / im.size[1]))) <= math.log(4 / 3) + slack
            rows, cols = got["spatial_shape"].tolist()
            if w >= 1.5 * h or h >= 1.5 * w:  # a wide crop stays wide, a tall one tall
                assert (cols > rows) == (w > h) and rows != cols
    assert crops >= 6  # the crop is random, not the whole image every time


def test_collate_pads_every_naflex_field_to_the_maximum():
    transform = NaFlexTransform(PATCH, MOST)
    items = [(transform(im), torch.tensor([i, i])) for i, im in enumerate(_photo_crops())]
    images, tokens = NaFlexCollate(MOST)(items)
    ref = naflex_collate([it[0] for it in items], MOST)
    assert all(torch.equal(images[k], ref[k]) for k in ref) and images["patches"].shape[1] == MOST
    assert torch.equal(tokens, torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]]))
    counts = images["patch_mask"].sum(1).tolist()
    assert len(set(counts)) >= 3 and counts == [int(it[0]["patches"].shape[0]) for it in items]
    dicts = NaFlexCollate(MOST)(
        [{"image": it[0], "image_views": it[0], "ids": torch.tensor(1)} for it in items]
    )
    assert torch.equal(dicts["image_views"]["patches"], ref["patches"]) and dicts["ids"].tolist() == [1] * 4
    halves = chunk_images(images, 2)
    assert [h["patches"].shape[0] for h in halves] == [2, 2]
    assert torch.equal(torch.cat([h["spatial_shapes"] for h in halves]), images["spatial_shapes"])


def test_grad_checkpointing_recomputes_naflex_blocks_with_the_same_gradients(monkeypatch):
    import clipforge.model.naflex as naflex
    from clipforge.factory import create_model

    batch = NaFlexTransform(PATCH, MOST).batch(_photo_crops())
    grads = []
    calls = []
    real = naflex.checkpoint
    monkeypatch.setattr(naflex, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for recompute in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny-siglip2")
        model.set_grad_checkpointing(recompute)
        model.encode_image(batch).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == 2  # two blocks, recomputed in the second model only
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=0, msg=name)


# --- the trainer --------------------------------------------------------------------------------
def _spy_first_step(monkeypatch) -> dict:
    """Record the first step's batch, the model before it and the metrics it returned."""
    seen: dict = {}
    real = trainer.train_step

    def step(run, images, tokens, autocast, extras=None):
        if not seen:
            seen.update(model=copy.deepcopy(run.model), images=images, tokens=tokens)
        metrics = real(run, images, tokens, autocast, extras)
        seen.setdefault("metrics", metrics)
        return metrics

    monkeypatch.setattr(trainer, "train_step", step)
    return seen


@pytest.mark.parametrize("trunk", ["siglip", "naflexvit"])
def test_first_step_loss_equals_the_hand_computed_sigmoid_loss(request, trunk, tmp_path, monkeypatch):
    setup = _setup_for(request, trunk)
    seen = _spy_first_step(monkeypatch)
    result = _train(_cfg(setup, tmp_path / "run"))
    assert result.steps == 1
    images, tokens, model = seen["images"], seen["tokens"], seen["model"]
    assert images["patches"].shape == (8, MOST, PATCH * PATCH * 3)
    counts = images["patch_mask"].sum(1)
    rows, cols = images["spatial_shapes"].T
    assert torch.equal(counts, rows * cols) and len(set(counts.tolist())) >= 2
    assert bool((cols > rows).any()) and bool((rows > cols).any())  # wide and tall in one batch
    with torch.no_grad():
        feats = []
        for i, k in enumerate(counts.tolist()):  # each image alone, unpadded
            one = {"patches": images["patches"][i : i + 1, :k], "patch_mask": torch.ones(1, k, dtype=torch.int32),
                   "spatial_shapes": images["spatial_shapes"][i : i + 1]}  # fmt: skip
            feats.append(model.encode_image(one, normalize=True))
        text = model.encode_text(tokens, normalize=True)
        logits = model.logit_scale.exp() * torch.cat(feats) @ text.T + model.logit_bias
        signs = 2 * torch.eye(8) - 1
        want = float(-F.logsigmoid(signs * logits).sum() / 8)
    assert seen["metrics"]["loss"] == pytest.approx(want, abs=1e-5)
    assert result.loss_history[0] == seen["metrics"]["loss"]


def _one_step(setup, out: Path, monkeypatch, **options) -> tuple[dict, dict]:
    """Gradients of the first step and the weights after it."""
    grads: dict = {}
    real = trainer.compute_gradients

    def spy(run, *a, **kw):
        out_ = real(run, *a, **kw)
        grads.update({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
        return out_

    with monkeypatch.context() as m:
        m.setattr(trainer, "compute_gradients", spy)
        _train(_cfg(setup, out, **options))
    return grads, load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize(
    ("trunk", "objective"),
    [("siglip", {}), ("siglip", {"image_ssl": "ntxent"}), ("naflexvit", {})],
    ids=["siglip", "siglip+ssl-views", "naflexvit"],
)
def test_accumulation_equals_the_full_batch(request, trunk, tmp_path, monkeypatch, objective):
    """--accum-steps 2 over micro-batches of 4 patch dicts: the batch-8 gradients and update.

    AdamW's first update is ``lr * g / (|g| + eps)``: with the default eps it turns gradients that
    are pure rounding noise (an attention key bias has none in exact arithmetic) into +-lr, so
    eps 1 keeps the update proportional to the gradient and the comparison meaningful.
    """
    setup = _setup_for(request, trunk)
    objective = {**objective, "eps": 1.0}
    full_grads, full = _one_step(setup, tmp_path / "full", monkeypatch, **objective)
    acc_grads, acc = _one_step(setup, tmp_path / "acc", monkeypatch, batch_size=4, accum_steps=2, **objective)
    assert full_grads.keys() == acc_grads.keys() and len(full_grads) > 10
    for name, g in full_grads.items():  # fp32 sums in another order: 1e-5 of the largest entry
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(acc_grads[name], g, atol=1e-5 * scale, rtol=0, msg=name)
    for name, w in full.items():
        torch.testing.assert_close(acc[name], w, atol=1e-5, rtol=0, msg=name)
    start = load_file(str(setup[0] / "model.safetensors"))
    assert any(not torch.equal(full[n], start[n]) for n in full if n.startswith("visual"))  # it trained


def test_loss_falls_over_a_few_steps(setup, tmp_path):
    result = _train(_cfg(setup, tmp_path / "run", max_steps=6))
    losses = result.loss_history
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2


@pytest.mark.slow  # bf16 matmuls are slow on CPU
def test_bf16_autocast_gives_the_fp32_first_loss_within_bf16_rounding(setup, tmp_path):
    """The patch dict's float patches meet bf16 weights under autocast; the master weights stay fp32."""
    fp32 = _train(_cfg(setup, tmp_path / "fp32"))
    bf16 = _train(_cfg(setup, tmp_path / "bf16", precision="bf16"))
    assert bf16.loss_history[0] != fp32.loss_history[0]  # autocast did run in bf16
    assert bf16.loss_history[0] == pytest.approx(fp32.loss_history[0], rel=2e-2)
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


class _Crash(Exception):
    pass


def test_resume_after_a_crash_gives_identical_weights(setup, tmp_path, monkeypatch):
    """Random crops are a property of (seed, epoch, sample): a resumed run sees the same pixels."""
    options = dict(max_steps=6, save_every_steps=2)
    ref = _train(_cfg(setup, tmp_path / "ref", **options))
    assert ref.steps == 6
    real = trainer.train_step

    def crashing(run, *a, **kw):
        if run.state.step == 3:
            raise _Crash
        return real(run, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_step", crashing)
        with pytest.raises(_Crash):
            _train(_cfg(setup, tmp_path / "run", **options))
    resumed = _train(_cfg(setup, tmp_path / "run", resume="latest", **options))
    assert resumed.steps == 6 and resumed.loss_history == ref.loss_history[2:]
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the CLI ------------------------------------------------------------------------------------
def test_cli_trains_a_naflex_checkpoint_and_saves_one_that_reloads_as_naflex(setup, tmp_path):
    from clipforge.factory import create_model_and_transforms

    ckpt, folder = setup
    out = tmp_path / "run"
    rc = run_cli(["train", "--data", str(folder), "--pretrained", str(ckpt), "--batch-size", "4",
                  "--max-steps", "2", "--loss", "siglip", "--workers", "1", "--no-progress", "--lr", "1e-3",
                  "--output-dir", str(out), "--device", "cpu", "--threads", "1"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002.pt"]
    model, train, val = create_model_and_transforms(pretrained=str(out / "final"))
    assert isinstance(train, NaFlexTrainTransform) and type(val) is NaFlexTransform
    assert (val.patch_size, val.max_num_patches) == (train.patch_size, train.max_num_patches) == (PATCH, MOST)
    trained, start = model.state_dict(), load_file(str(ckpt / "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the saved weights are the trained ones
    with torch.no_grad():
        feats = model.eval().encode_image(val.batch(_photo_crops()), normalize=True)
    assert feats.shape == (4, model.config.embed_dim) and bool(torch.isfinite(feats).all())


@pytest.mark.parametrize(
    "option", [["--cache-images"], ["--patch-dropout", "0.5"], ["--distill-model", "tiny-siglip2"]]
)
def test_cli_refuses_options_naflex_batches_cannot_serve(setup, tmp_path, capsys, option):
    ckpt, folder = setup
    rc = run_cli(["train", "--data", str(folder), "--pretrained", str(ckpt), "--batch-size", "4", "--max-steps",
                  "1", "--loss", "siglip", "--workers", "0", "--no-progress", "--output-dir", str(tmp_path / "run"),
                  "--device", "cpu", *option])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "NaFlex" in err and option[0] in err and "naflex_max_patches=16" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- DDP ----------------------------------------------------------------------------------------
def _first_step_grads(cfg: TrainConfig, info) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Build the run as ``train`` does and take the gradients of its first batch (a patch dict)."""
    run = trainer.build_run(cfg, info)
    images, tokens = next(iter(run.loader))
    run.task.model.train()
    trainer.compute_gradients(run, images, tokens)
    return {n: p.grad.detach().clone() for n, p in run.model.named_parameters()}, images


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, ckpt: str, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    from clipforge.train.distributed import setup_distributed

    info = setup_distributed("cpu")
    cfg = _cfg((Path(ckpt), Path(folder)), Path(out_dir) / "run", batch_size=4)
    grads, images = _first_step_grads(cfg, info)
    torch.save({"grads": grads, "images": images}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_gloo_ranks_of_naflex_batches_match_one_process_with_double_batch(setup, tmp_path):
    from forking import start_ranks

    from clipforge.train.distributed import DistInfo

    ranks = start_ranks(_ddp_worker, tmp_path, str(setup[0]), str(setup[1]))
    with threads_kept(1):
        single, images = _first_step_grads(_cfg(setup, tmp_path / "single"), DistInfo())
    a, b = ranks[0]["images"]["patches"], ranks[1]["images"]["patches"]
    assert a.shape[0] == b.shape[0] == 4 and images["patches"].shape[0] == 8

    def rows(t: torch.Tensor) -> list[bytes]:
        return sorted(x.numpy().tobytes() for x in t)

    assert rows(torch.cat([a, b])) == rows(images["patches"])  # the ranks split its batch between them
    for name, g in single.items():
        scale = max(1.0, float(g.abs().max()))
        torch.testing.assert_close(
            ranks[0]["grads"][name], ranks[1]["grads"][name], atol=1e-6 * scale, rtol=0
        )
        torch.testing.assert_close(ranks[0]["grads"][name], g, atol=1e-5 * scale, rtol=0, msg=name)


@pytest.mark.slow  # dynamo traces each image's position grid
def test_compile_option_trains_naflex_batches_through_the_compiled_module(setup, tmp_path, monkeypatch):
    """``--compile`` (the eager backend, as tests/test_train_options.py does): the patch dict goes in."""
    wrapped = []
    real = torch.compile

    def compile_eager(model, **kw):
        wrapped.append(model)
        return real(model, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_eager)
    seen = _spy_first_step(monkeypatch)
    result = _train(_cfg(setup, tmp_path / "run", compile=True, max_steps=2))
    assert wrapped and result.steps == 2 and all(math.isfinite(v) for v in result.loss_history)
    assert isinstance(seen["images"], dict)


def test_no_naflex_trains_a_naflex_checkpoint_at_its_fixed_square_size(setup, tmp_path):
    """``--no-naflex``: the fixed-size transforms (a stacked tensor batch), so the options NaFlex refuses
    are accepted, and the trained model is saved without NaFlex preprocessing."""
    from clipforge.factory import create_model_and_transforms

    cfg = _cfg(setup, tmp_path / "run", naflex=False, max_steps=2, cache_images=True, batch_size=4)
    model, train_tf, val_tf, _ = trainer.build_model(cfg, torch.device("cpu"))
    assert (
        not isinstance(train_tf, (NaFlexTrainTransform, NaFlexTransform))
        and type(val_tf) is not NaFlexTransform
    )
    assert model.preprocess_cfg.naflex_max_patches is None
    _train(cfg)
    _, train_back, val_back = create_model_and_transforms(pretrained=str(tmp_path / "run" / "final"))
    assert type(val_back) is not NaFlexTransform and not isinstance(train_back, NaFlexTrainTransform)
    size = model.config.vision.image_size
    assert tuple(val_back(_photo_crops()[1]).shape) == (3, size, size)
