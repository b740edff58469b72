"""Trainer building blocks: config, optimiser groups, schedules, accumulation, locking, LoRA, faults, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipforge.errors import ConfigError
from clipforge.model.clip import CLIP
from clipforge.model.registry import get_model_config
from clipforge.train.config import TrainConfig, add_arguments, config_from_args
from clipforge.train.optim import build_optimizer, build_scheduler, param_groups
from clipforge.train.surgery import apply_lora, lock_towers, merge_lora
from clipforge.train.task import ContrastiveTask, build_loss, split_micro_batches


def small_config(name: str = "tiny-vit", **vision):
    """The registry's tiny model with a short context and small vocabulary: same structure, faster tests."""
    return get_model_config(name).replace(text={"vocab_size": 1000, "context_length": 16}, vision=vision)


def tiny_model(name: str = "tiny-vit", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(small_config(name))


def fake_batch(n: int, model: CLIP, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    ctx = model.config.text.context_length
    tokens = torch.zeros(n, ctx, dtype=torch.long)
    lengths = torch.randint(3, 12, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        tokens[i, 0] = 998
        tokens[i, 1 : L - 1] = torch.randint(1, 990, (L - 2,), generator=g)
        tokens[i, L - 1] = 999
    return images, tokens


# --- config ---------------------------------------------------------------------------------------
def test_config_roundtrip_and_yaml(tmp_path):
    cfg = TrainConfig.from_flat(data="x.csv", batch_size=8, lr=1e-3, lora_targets=["in_proj"])
    path = cfg.save(tmp_path / "run.yaml")
    loaded = TrainConfig.load(path)
    assert loaded == cfg
    (tmp_path / "run.json").write_text(json.dumps({"batch-size": 4, "precision": "bf16"}))
    assert TrainConfig.load(tmp_path / "run.json").data.batch_size == 4


@pytest.mark.parametrize(
    "content, needle",
    [
        ("bach_size: 8\n", "unknown key 'bach_size' (did you mean 'batch_size'?)"),
        ("lr: fast\n", "key 'lr' expects a number"),
        ("batch_size: 0\n", "key 'batch_size' must be >= 1"),
        ("schedule: linear\n", "key 'schedule' must be one of"),
        ("weight_decay_groups: timm\n", "key 'weight_decay_groups' must be one of"),
        ("epochs: 1.5\n", "key 'epochs' expects an integer"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("lr: [\n", "invalid YAML at line"),
    ],
)
def test_config_errors_name_the_key(tmp_path, content, needle):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        TrainConfig.load(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_run_config_falls_back_to_json_without_pyyaml(tmp_path, monkeypatch):
    import importlib.util

    from clipforge.train.trainer import run_config_name

    assert run_config_name() == "run_config.yaml"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else real(name, *a)
    )
    assert run_config_name() == "run_config.json"
    cfg = TrainConfig.from_flat(data="synthetic:shapes", batch_size=12, output_dir=str(tmp_path))
    assert TrainConfig.load(cfg.save(tmp_path / run_config_name())).data.batch_size == 12


def test_cli_flags_override_config_file(tmp_path):
    import argparse

    (tmp_path / "run.yaml").write_text("batch_size: 32\nlr: 0.01\nlock_image: true\n")
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--lr", "0.5", "--no-lock-image"])
    cfg = config_from_args(args)
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.surgery.lock_image) == (32, 0.5, False)


# --- optimiser ------------------------------------------------------------------------------------
def test_param_groups_exclude_gains_biases_embeddings_and_scale():
    model = tiny_model()
    groups = param_groups(model, weight_decay=0.2)
    decay = set(groups[0]["names"])
    no_decay = set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    for name in (
        "logit_scale",
        "visual.class_embedding",
        "visual.positional_embedding",
        "text.positional_embedding",
        "text.token_embedding.weight",
        "visual.ln_pre.weight",
        "text.ln_final.bias",
        "visual.transformer.resblocks.0.attn.in_proj.bias",
        "text.transformer.resblocks.1.ln_2.weight",
    ):
        assert name in no_decay, name
    for name in (
        "visual.conv1.weight",
        "visual.proj",
        "text.text_projection",
        "visual.transformer.resblocks.0.attn.in_proj.weight",
        "text.transformer.resblocks.1.mlp.c_fc.weight",
    ):
        assert name in decay, name
    assert decay.isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_open_clip_weight_decay_groups_decay_embeddings_like_open_clip_train():
    """``--weight-decay-groups open_clip``: open_clip_train's rule, which decays the token table and
    the positional embeddings that clipforge's own rule leaves alone; the trainer passes it on."""
    import argparse

    from clipforge.train.trainer import build_optimizer as trainer_optimizer

    model = tiny_model()
    groups = param_groups(model, weight_decay=0.2, groups="open_clip")
    decay, no_decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    moved = {"visual.positional_embedding", "text.positional_embedding", "text.token_embedding.weight"}
    assert moved <= decay
    ours = param_groups(model, weight_decay=0.2)
    assert set(ours[0]["names"]) | moved == decay and set(ours[1]["names"]) - moved == no_decay
    for name in ("logit_scale", "visual.class_embedding", "visual.ln_pre.weight", "text.ln_final.bias"):
        assert name in no_decay, name
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--weight-decay-groups", "open_clip"]))
    assert cfg.optim.weight_decay_groups == "open_clip"
    optimizer = trainer_optimizer(cfg, model, 10)[0]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.text.token_embedding.weight) in decayed
    with pytest.raises(ConfigError, match="weight decay groups"):
        param_groups(model, 0.2, groups="timm")


def test_optimizer_skips_frozen_parameters():
    model = tiny_model()
    lock_towers(model, lock_image=True)
    opt = build_optimizer(model, lr=1e-3)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(not p.requires_grad for p in model.visual.parameters())


def _lrs(kind: str, total: int, **kw) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, kind, total, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_with_warmup():
    lrs = _lrs("cosine", 20, warmup_steps=5, min_lr=0.1)
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0)
    mid = 5 + 15 // 2
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 5) / 15)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] > 0.1


def test_const_and_const_cooldown_schedules():
    assert _lrs("const", 6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])
    lrs = _lrs("const-cooldown", 10, warmup_steps=0, cooldown_steps=4)
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ConfigError):
        _lrs("const-cooldown", 10)


def test_scheduler_state_dict_resumes():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, "cosine", 50, warmup_steps=3)
    for _ in range(17):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, "cosine", 50, warmup_steps=3)
    sched2.load_state_dict(state)
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(opt2.param_groups[0]["lr"])


# --- accumulation ---------------------------------------------------------------------------------
def _grads_and_update(model_name: str, loss_kind: str, accum: int) -> tuple[dict, dict]:
    model = tiny_model(model_name).double()
    images, tokens = fake_batch(16, model)
    task = ContrastiveTask(model, build_loss(loss_kind))
    out = task.forward_backward(split_micro_batches(images.double(), tokens, accum))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=1e-2)
    opt.step()
    task.after_step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": out.loss, **grads}, params


@pytest.mark.parametrize(
    "model_name, loss_kind", [("tiny-vit", "clip"), ("tiny-vit-siglip", "siglip"), ("tiny-vit", "chunked")]
)
def test_accumulation_with_feature_cache_equals_full_batch(model_name, loss_kind):
    full_grads, full_params = _grads_and_update(model_name, loss_kind, accum=1)
    acc_grads, acc_params = _grads_and_update(model_name, loss_kind, accum=4)
    for name, g in full_grads.items():
        torch.testing.assert_close(acc_grads[name], g, atol=1e-5, rtol=0, msg=name)
    for name, p in full_params.items():
        torch.testing.assert_close(acc_params[name], p, atol=1e-5, rtol=0, msg=name)


def test_accumulation_replays_patch_dropout_rng():
    """With stochastic layers the recomputed micro-batch must see the same mask as the cached one."""
    torch.manual_seed(0)
    model = CLIP(small_config(patch_dropout=0.5)).double()
    images, tokens = fake_batch(8, model)
    task = ContrastiveTask(model, build_loss("clip"))
    micro = split_micro_batches(images.double(), tokens, 2)
    seen = []
    orig = task.encode

    def spy(i, t, model=None):
        f = orig(i, t, model=model)
        seen.append(f.image.detach().clone())
        return f

    task.encode = spy
    task.forward_backward(micro)
    # calls: cached mb0, cached mb1, grad mb0, grad mb1
    torch.testing.assert_close(seen[2], seen[0])
    torch.testing.assert_close(seen[3], seen[1])


def test_logit_scale_clamped_after_step():
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    ContrastiveTask(model, build_loss("clip"), max_logit_scale=100.0).after_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_ema_tracks_weights():
    model = tiny_model()
    task = ContrastiveTask(model, build_loss("clip"), ema_decay=0.5)
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    before = task.ema.module.visual.proj.clone()
    task.after_step()
    torch.testing.assert_close(task.ema.module.visual.proj, 0.5 * before + 0.5 * model.visual.proj)


# --- model surgery --------------------------------------------------------------------------------
def test_lit_lock_with_unlocked_groups():
    model = tiny_model()
    lock_towers(model, lock_image=True, image_unlocked_groups=1)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert trainable == {"proj"}
    assert all(p.requires_grad for p in model.text.parameters())
    model2 = tiny_model()
    lock_towers(model2, lock_text=True)
    assert not any(p.requires_grad for p in model2.text.parameters())
    assert all(p.requires_grad for p in model2.visual.parameters())


def test_lora_attaches_and_only_adapters_train():
    model = tiny_model()
    images, tokens = fake_batch(4, model)
    model.eval()
    with torch.no_grad():
        reference = model(images, tokens)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("visual.transformer.resblocks.0.attn.in_proj.lora_A" in n for n in trainable)
    assert any("text.transformer.resblocks.1.mlp.c_proj.lora_B" in n for n in trainable)
    # Fresh adapters are a no-op (B = 0).
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens).image_features, reference.image_features)
    model.train()
    task = ContrastiveTask(model, build_loss("clip"))
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        task.forward_backward([(images, tokens)])
        opt.step()
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(p, base[key], msg=name)
    model.eval()
    with torch.no_grad():
        adapted = model(images, tokens).image_features
    assert not torch.allclose(adapted, reference.image_features, atol=1e-4)
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(base) | {k for k in merged.state_dict() if k not in base}
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(images, tokens).image_features, adapted, atol=1e-5, rtol=1e-4)


def test_lora_unknown_target_is_a_clear_error():
    with pytest.raises(ConfigError, match="match no nn.Linear"):
        apply_lora(tiny_model(), rank=2, targets=["q_proj"])


# --- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_run_on_synthetic_data_produces_loadable_model(tmp_path, capsys, keep_threads):
    from clipforge.cli import main
    from clipforge.factory import create_model
    from clipforge.train.state import list_checkpoints, load_checkpoint_state

    (tmp_path / "run.yaml").write_text(
        "data: synthetic:shapes?n=48&image_size=32\nmodel: tiny-vit\nbatch_size: 4\nepochs: 1\n"
        "lr: 0.001\nthreads: 1\nprogress: false\nschedule: const-cooldown\ncooldown_steps: 2\n"
    )
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "run.yaml"),
            "--batch-size",
            "8",
            "--accum-steps",
            "2",
            "--output-dir",
            str(tmp_path / "out"),
            "--ema-decay",
            "0.9",
        ]
    )
    assert code == 0
    assert "model saved to" in capsys.readouterr().out
    out = tmp_path / "out"
    saved = TrainConfig.load(out / "run_config.yaml")  # the effective config, next to the checkpoints
    assert (saved.data.batch_size, saved.optim.accum_steps, saved.optim.schedule, saved.optim.ema_decay) == (
        8,
        2,
        "const-cooldown",
        0.9,
    )
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    state = load_checkpoint_state(ckpt)
    assert state["train_state"]["step"] == 3  # 48 samples // (8 x 2)
    model = create_model(pretrained=str(out / "final"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state["model"][name], msg=name)
    assert (out / "final-ema" / "model.safetensors").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "samples_per_s", "logit_scale"} <= set(records[-1])
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_lora_and_lit_runs_save_a_plain_merged_model(tmp_path, keep_threads):
    from clipforge.factory import create_model
    from clipforge.train.trainer import train

    result = train(
        TrainConfig.from_flat(
            data="synthetic:shapes?n=16&image_size=32",
            model="tiny-vit",
            batch_size=8,
            max_steps=2,
            lora_rank=4,
            lock_image=True,
            lr=1e-2,
            threads=1,
            progress=False,
            output_dir=str(tmp_path),
        )
    )
    model = create_model(pretrained=result.final_model_dir)
    assert not any("lora" in k for k in model.state_dict())
    torch.manual_seed(0)  # the trainer seeds with cfg.seed before building: same initial weights
    initial = create_model("tiny-vit").state_dict()
    trained = model.state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], initial[k])}
    assert changed, "adapters were merged into the base weights"
    assert all(
        k.startswith("text.") and k.rsplit(".", 2)[-2] in ("in_proj", "out_proj", "c_fc", "c_proj")
        for k in changed
    ), sorted(changed)[:5]
    assert not any(k.startswith("visual.") for k in changed)  # LiT: the locked tower has no adapters
