"""Objectives in the trainer: options checked against the chosen loss, the k-captions sampler with
exact resume, table columns for group ids and hard negatives, and accumulation with the feature
cache giving the full-batch gradients for every extra input (ids, hard negatives, views, teacher)."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
import torch
from PIL import Image
from test_train import fake_batch, tiny_model

from clipforge.data.loader import EpochSampler, ResumableLoader
from clipforge.data.objective_items import ObjectiveItems
from clipforge.data.pairs import PairsDataset
from clipforge.errors import ConfigError, DataError
from clipforge.objectives.combined import build_objective
from clipforge.train.config import TrainConfig, add_arguments, config_from_args
from clipforge.train.task import ContrastiveTask, split_micro_batches


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_an_option_the_loss_does_not_take_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--local-loss is not an option of --loss siglip"):
        parse(["--loss", "siglip", "--local-loss"])
    with pytest.raises(ConfigError, match=r"--chunk-size is not an option of --loss clip"):
        parse(["--loss", "clip", "--chunk-size", "256"])
    with pytest.raises(ConfigError, match=r"--margin is not an option of --loss multipos.*'triplet'"):
        TrainConfig.from_dict({"loss": "multipos", "margin": 0.1})
    with pytest.raises(ConfigError, match="--hard-negative-key needs --loss multipos"):
        parse(["--loss", "clip", "--hard-negative-key", "neg"])
    with pytest.raises(ConfigError, match="--image-ssl-weight is given without --image-ssl"):
        parse(["--image-ssl-weight", "0.5"])
    with pytest.raises(ConfigError, match="not a multiple of --captions-per-image"):
        parse(["--batch-size", "6", "--captions-per-image", "4"])
    cfg = parse(["--loss", "multipos", "--positives", "lse", "--chunk-size", "64", "--local-loss"])
    assert cfg.loss_options() == {"positives": "lse", "chunk_size": 64, "local_loss": True}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the saved run config reads back


def test_grouped_sampler_keeps_images_whole_across_ranks_and_resumes() -> None:
    k, n = 3, 3 * 10
    ranks = [
        EpochSampler(
            n, rank=r, world_size=2, seed=5, epoch=1, shuffle=True, drop_last=True, group=k
        ).indices()
        for r in range(2)
    ]
    for idx in ranks:
        assert len(idx) == 15
        runs = [idx[i : i + k] for i in range(0, len(idx), k)]
        assert all(r == list(range(r[0], r[0] + k)) and r[0] % k == 0 for r in runs)
    assert not set(ranks[0]) & set(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == n
    resumed = EpochSampler(
        n, rank=1, world_size=2, seed=5, epoch=1, shuffle=True, drop_last=True, group=k, start=6
    )
    assert list(resumed) == ranks[1][6:] and len(resumed) == 9
    with pytest.raises(DataError, match="groups of 4"):
        EpochSampler(n, rank=0, world_size=1, seed=0, epoch=0, shuffle=True, drop_last=True, group=4)


def write_table(tmp_path, rows: int = 8) -> str:
    """A CSV with 3 caption columns, a product column (pairs of rows) and 0-2 hard negatives."""
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filepath", "c1", "c2", "c3", "product", "neg1", "neg2"])
        for i in range(rows):
            Image.new("RGB", (20, 20), (30 * i % 255, 10, 200)).save(tmp_path / f"{i}.png")
            negs = [f"not {i}", f"never {i}"][: i % 3]
            w.writerow(
                [
                    f"{i}.png",
                    f"cap {i} a",
                    f"cap {i} b",
                    f"cap {i} c",
                    f"p{i // 2}",
                    *negs,
                    *[""] * (2 - len(negs)),
                ]
            )
    return str(path)


def test_objective_items_from_table_columns(tmp_path) -> None:
    table = write_table(tmp_path)
    base = PairsDataset(
        table,
        caption_key="c1,c2,c3",
        extra_keys=("product", "neg1", "neg2"),
        tokenizer=lambda s: torch.tensor([sum(map(ord, s))]),
        transform=lambda im: torch.tensor(im.getpixel((0, 0))),
    )
    items = ObjectiveItems(
        base, captions_per_image=3, group_key="product", hard_negative_keys=("neg1", "neg2"), hard_negatives=2
    )
    assert len(items) == 24 and items.sampler_group == 3
    drawn = [items[3 * 5 + j] for j in range(3)]  # image 5's three draws: three different captions
    assert len({int(d["tokens"][0]) for d in drawn}) == 3
    assert {int(d["ids"]) for d in drawn} == {int(items[3 * 4]["ids"])}  # rows 4 and 5: product p2
    assert int(items[0]["ids"]) != int(items[3 * 2]["ids"])
    assert items[3 * 5]["hard_negatives_valid"].tolist() == [True, True]  # 5 % 3 = 2 negatives
    assert items[3 * 3]["hard_negatives_valid"].tolist() == [False, False]  # row 3 has none
    loader = ResumableLoader(items, batch_size=6, seed=1)
    batch = next(iter(loader))
    assert batch["ids"].view(2, 3).eq(batch["ids"].view(2, 3)[:, :1]).all()  # k draws per image together
    with pytest.raises(DataError, match="column 'nope' not found"):
        PairsDataset(table, caption_key="c1", extra_keys=("nope",))


def test_trainer_step_with_every_extra(tmp_path) -> None:
    from clipforge.train.distributed import DistInfo
    from clipforge.train.trainer import build_run, compute_gradients, unpack_batch

    cfg = TrainConfig.from_flat(
        data=write_table(tmp_path),
        caption_key="c1,c2,c3",
        model="tiny-vit",
        batch_size=4,
        accum_steps=2,
        loss="multipos",
        positives="lse",
        chunk_size=3,
        captions_per_image=2,
        group_key="product",
        hard_negative_key="neg1,neg2",
        image_ssl="ntxent",
        image_ssl_weight=0.5,
        output_dir=str(tmp_path / "run"),
        threads=1,
        progress=False,
    ).validate()
    run = build_run(cfg, DistInfo())
    images, tokens, extras = unpack_batch(next(iter(run.loader)))
    assert set(extras) == {"ids", "hard_negative_tokens", "hard_negatives_valid", "image_views"}
    out = compute_gradients(run, images, tokens, extras=extras)
    assert torch.isfinite(out.loss) and {"loss_main", "loss_image_ssl"} <= set(out.metrics)
    assert all(torch.isfinite(p.grad).all() for p in run.model.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss", ["multipos", "siglip", "triplet", "ntxent", "bce"])
def test_accumulation_equals_full_batch_with_extras(loss: str) -> None:
    """K micro-batches with the feature cache = one batch, for ids, hard negatives, views, teacher."""
    name = "tiny-vit-siglip" if loss in ("siglip", "bce") else "tiny-vit"
    model = tiny_model(name).double()
    images, tokens = fake_batch(8, model)
    views, neg_tokens = fake_batch(8, model, seed=2)[0], fake_batch(16, model, seed=3)[1].view(8, 2, -1)
    g = torch.Generator().manual_seed(4)
    extras = {
        "ids": torch.tensor([0, 0, 1, 2, 2, 3, 4, 4]),
        "image_views": views.double(),
        "teacher_image": torch.nn.functional.normalize(
            torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1
        ),
        "teacher_text": torch.nn.functional.normalize(
            torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1
        ),
    }
    if loss == "multipos":
        extras["hard_negative_tokens"] = neg_tokens
        extras["hard_negatives_valid"] = torch.tensor([[1, 0], [1, 1]] * 4, dtype=torch.bool)
    options = {"chunk_size": 3} if loss == "multipos" else {}
    results = []
    for accum in (1, 2, 4):
        model.zero_grad(set_to_none=True)
        objective = build_objective(loss, options, image_ssl="ntxent", distill_weight=0.7, distill_scale=20.0)
        task = ContrastiveTask(model, objective)
        out = task.forward_backward(split_micro_batches(images.double(), tokens, accum, extras))
        results.append(
            (out.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    for loss_value, grads in results[1:]:
        torch.testing.assert_close(loss_value, results[0][0], atol=1e-10, rtol=0)
        assert grads.keys() == results[0][1].keys()
        for n, grad in grads.items():
            torch.testing.assert_close(
                grad, results[0][1][n], atol=1e-6, rtol=1e-6, msg=n
            )  # model LayerNorms run in fp32


def _one_caption_table(tmp_path) -> str:
    path = tmp_path / "one.csv"
    rows = ["filepath,caption"]
    for i in range(8):
        Image.new("RGB", (20, 20), (25 * i, 100, 40)).save(tmp_path / f"d{i}.png")
        rows.append(f"d{i}.png,a shape number {i}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["features", "model"])
def test_distillation_from_embed_folder_or_live_teacher(tmp_path, source: str) -> None:
    from clipforge.factory import create_model_and_transforms, get_tokenizer
    from clipforge.search.embed import embed_images
    from clipforge.train.distributed import DistInfo
    from clipforge.train.trainer import build_run, compute_gradients, unpack_batch

    table = _one_caption_table(tmp_path)
    cfg = dict(data=table, model="tiny-vit", batch_size=4, accum_steps=2, output_dir=str(tmp_path / "run"))
    cfg.update(threads=1, progress=False, distill_weight=0.5)
    if source == "features":
        teacher, _, preprocess = create_model_and_transforms("tiny-vit")
        out = tmp_path / "emb"
        embed_images(teacher, preprocess, table, out, batch_size=4, num_workers=0, dtype="float32",
                     tokenizer=get_tokenizer(teacher), progress=False)  # fmt: skip
        cfg.update(distill_features=str(out), distill_scale=50.0)
    else:
        cfg.update(distill_model="tiny-vit")
    run = build_run(TrainConfig.from_flat(**cfg).validate(), DistInfo())
    images, tokens, extras = unpack_batch(next(iter(run.loader)))
    if source == "features":
        assert set(extras) == {"ids", "teacher_image", "teacher_text"}
        assert torch.allclose(extras["teacher_image"].norm(dim=-1), torch.ones(4 * 2), atol=1e-3)
    else:
        assert run.task.teacher is not None and not extras
    metrics = compute_gradients(run, images, tokens, extras=extras).metrics
    assert metrics["loss_distill"] > 0 and math.isclose(
        metrics["loss"], metrics["loss_main"] + 0.5 * metrics["loss_distill"], rel_tol=1e-5
    )
    with pytest.raises(ConfigError, match="--distill-weight is given without"):
        TrainConfig.from_flat(distill_weight=1.0).validate()
