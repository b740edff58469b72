"""``train(cfg)``: build the pieces with small named functions, then a short ``fit()`` loop.

Reading order: :func:`train` -> :func:`build_run` (``setup_distributed``, ``build_model``,
``build_data``, ``build_optimizer``, ``maybe_resume``) -> :func:`fit` -> :func:`train_step`.
Checkpointing lives in :mod:`clipforge.train.state`, the objective in
:mod:`clipforge.train.task`, the batch position in :mod:`clipforge.data.loader`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clipforge.data.loader import ResumableLoader
from clipforge.errors import ClipforgeError, ConfigError, DataError
from clipforge.train import state as ckpt
from clipforge.train.checkpointing import maybe_resume, save_training_checkpoint
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import (
    DistInfo,
    any_rank,
    cleanup_distributed,
    setup_distributed,
    sync_replicated_grads,
    wrap_model,
)
from clipforge.train.logger import RunLogger
from clipforge.train.optim import build_optimizer as make_optimizer
from clipforge.train.optim import build_scheduler
from clipforge.train.outputs import evaluate, save_final_model, save_model_config, write_summary
from clipforge.train.surgery import apply_lora, lock_towers
from clipforge.train.task import ContrastiveTask, TaskOutput, split_micro_batches

log = logging.getLogger(__name__)


class TrainingDivergedError(ClipforgeError):
    """Too many consecutive steps had a NaN/Inf loss or gradients."""


@dataclass
class TrainResult:
    output_dir: str
    final_model_dir: str | None
    last_checkpoint: str | None
    steps: int
    epochs: int
    final_loss: float | None
    skipped_steps: int
    skipped_samples: dict[str, int]
    samples_per_second: float
    wall_time_s: float
    interrupted: bool = False
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """Everything ``fit`` touches, built once by :func:`build_run`."""

    cfg: TrainConfig
    info: DistInfo
    model: nn.Module  # the raw CLIP (possibly with LoRA layers)
    task: ContrastiveTask
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: ResumableLoader
    tokenizer: Any
    preprocess_val: Any
    skips: Any
    total_steps: int
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    stop: threading.Event = field(default_factory=threading.Event)
    losses: list[float] = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"


# =================================================================================================
# build
# =================================================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_runtime(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


#: What ``clipforge train`` builds when given neither --model nor --pretrained.
DEFAULT_MODEL = "tiny-vit"


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Any, Any, Any]:
    """The CLIP to train, its train/val preprocessing and tokenizer, with locks/LoRA applied."""
    from clipforge.model.factory import create_model_and_transforms, get_tokenizer

    overrides = {"vision": {"patch_dropout": cfg.patch_dropout}} if cfg.patch_dropout is not None else {}
    # No --model: fine-tune the --pretrained checkpoint as it describes itself, else the tiny default.
    name = cfg.model or (None if cfg.pretrained else DEFAULT_MODEL)
    model, preprocess_train, preprocess_val = create_model_and_transforms(
        name, cfg.pretrained, image_alpha=cfg.image_alpha, **overrides
    )
    tokenizer = get_tokenizer(model)
    from clipforge.objectives.registry import get_spec

    if get_spec(cfg.loss).needs_bias and getattr(model, "logit_bias", None) is None:
        raise ConfigError(
            f"loss {cfg.loss!r} needs a model with a logit_bias (e.g. tiny-vit-siglip); {model.architecture} has none"
        )
    if cfg.loss == "coca" and getattr(model, "text_decoder", None) is None:
        raise ConfigError(
            f"loss 'coca' needs a CoCa model with a captioning decoder (e.g. tiny-coca, coca_ViT-B-32); "
            f"{model.architecture} has none"
        )
    lock_towers(
        model,
        lock_image=cfg.lock_image,
        image_unlocked_groups=cfg.lock_image_unlocked_groups,
        freeze_bn_stats=cfg.lock_image_freeze_bn_stats,
        lock_text=cfg.lock_text,
        text_unlocked_layers=cfg.lock_text_unlocked_layers,
    )
    if cfg.lora_rank:
        towers = [
            name for name, locked in (("visual", cfg.lock_image), ("text", cfg.lock_text)) if not locked
        ]
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, towers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device), preprocess_train, preprocess_val, tokenizer


def build_dataset(
    spec: str, *, transform: Any, tokenizer: Any, seed: int, skips: Any, cfg: TrainConfig, **extra: Any
) -> Any:
    """Resolve a data spec with ``clipforge.data.build_dataset`` (tables, folders, shards, synthetic)."""
    from clipforge.data.build import build_dataset as build

    options = {**cfg.table_kwargs(), **{k: v for k, v in extra.items() if v is not None}}
    return build(spec, transform=transform, tokenizer=tokenizer, seed=seed, skip_counter=skips, **options)


def build_data(
    cfg: TrainConfig, info: DistInfo, transform: Any, tokenizer: Any, skips: Any
) -> ResumableLoader:
    if not cfg.data:
        raise ConfigError("no training data: pass --data (a table, folder, shards or synthetic:shapes)")
    extra_keys = [k for k in [cfg.group_key, *_hard_negative_keys(cfg)] if k]
    dataset = build_dataset(
        cfg.data,
        transform=transform,
        tokenizer=tokenizer,
        seed=cfg.seed,
        skips=skips,
        cfg=cfg,
        rank=info.rank,
        world_size=info.world_size,
        extra_keys=tuple(extra_keys) or None,
    )
    from clipforge.data.cache import maybe_cache_images
    from clipforge.data.workers import auto_workers

    dataset = maybe_cache_images(cfg, info, dataset)
    workers = (
        cfg.workers if cfg.workers is not None else auto_workers(dataset, info.device.type, info.world_size)
    )
    dataset = wrap_objective_items(cfg, dataset)
    loader = ResumableLoader(
        dataset,
        batch_size=cfg.batch_size * cfg.accum_steps,
        num_workers=workers,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        steps_per_epoch=cfg.steps_per_epoch,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
    )
    if len(loader) < 1:
        size = f"has {len(dataset)} samples" if hasattr(dataset, "__len__") else "is an endless stream"
        raise DataError(
            f"the training data {size}: no full batch of {cfg.batch_size * cfg.accum_steps} per epoch on "
            f"{info.world_size} process(es); lower --batch-size (or set --steps-per-epoch for endless streams)"
        )
    return loader


def _hard_negative_keys(cfg: TrainConfig) -> list[str]:
    return [k.strip() for k in (cfg.hard_negative_key or "").split(",") if k.strip()]


def wrap_objective_items(cfg: TrainConfig, dataset: Any) -> Any:
    """Dict items (group ids, k captions, hard negatives, views, teacher features) when asked for.

    Only then: plain runs keep ``(image, tokens)`` items, with their exact data order.
    """
    wanted = (
        cfg.loss == "multipos"
        or cfg.captions_per_image > 1
        or cfg.group_key
        or cfg.hard_negative_key
        or cfg.image_ssl
        or cfg.distill_features
    )
    if not wanted:
        return dataset
    from clipforge.data.objective_items import ObjectiveItems, TeacherFeatures

    return ObjectiveItems(
        dataset,
        captions_per_image=cfg.captions_per_image,
        group_key=cfg.group_key,
        hard_negative_keys=_hard_negative_keys(cfg),
        hard_negatives=cfg.hard_negatives or 1,
        image_views=cfg.image_ssl is not None,
        teacher=TeacherFeatures(cfg.distill_features) if cfg.distill_features else None,
    )


def build_objective(cfg: TrainConfig, info: DistInfo, student: nn.Module) -> tuple[Any, Any]:
    """The loss callable from the registry (+ SSL and distillation terms) and the on-the-fly teacher."""
    from clipforge.objectives.combined import build_objective as make

    teacher, scale = None, cfg.distill_scale
    if cfg.distill_model:
        teacher = build_teacher(cfg, info.device, student)
        scale = scale if scale is not None else teacher.logit_scale
    distilling = bool(cfg.distill_model or cfg.distill_features)
    objective = make(
        cfg.loss,
        cfg.loss_options(),
        rank=info.rank,
        world_size=info.world_size,
        image_ssl=cfg.image_ssl,
        image_ssl_weight=1.0 if cfg.image_ssl_weight is None else cfg.image_ssl_weight,
        image_ssl_temperature=cfg.image_ssl_temperature or 0.1,
        distill_weight=(1.0 if cfg.distill_weight is None else cfg.distill_weight) if distilling else None,
        distill_scale=scale if scale is not None else 100.0,
    )
    return objective, teacher


def build_teacher(cfg: TrainConfig, device: torch.device, student: nn.Module) -> Any:
    """A frozen teacher (any model clipforge loads) that embeds the student's batches."""
    from clipforge.model.factory import create_model, get_tokenizer
    from clipforge.objectives.distill import OnTheFlyTeacher

    model = create_model(cfg.distill_model, cfg.distill_pretrained).to(device)
    ours, theirs = get_tokenizer(student), get_tokenizer(model)
    probe = ["a photo of a cat", "zebra crossing at night"]
    if not torch.equal(torch.as_tensor(ours(probe)), torch.as_tensor(theirs(probe))):
        raise ConfigError(
            f"--distill-model {cfg.distill_model}: its tokenizer differs from the student's; on-the-fly "
            "distillation reuses the batch's tokens (precompute teacher features with `clipforge embed` instead)"
        )
    s_pre, t_pre = student.preprocess_cfg, model.preprocess_cfg
    size = t_pre.image_size if isinstance(t_pre.image_size, int) else t_pre.image_size[0]
    return OnTheFlyTeacher(model, (s_pre.mean, s_pre.std), (t_pre.mean, t_pre.std), size)


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[Any, Any, torch.amp.GradScaler]:
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    scheduler = build_scheduler(
        optimizer,
        cfg.schedule,
        total_steps,
        cfg.warmup_steps,
        cfg.cooldown_steps,
        cfg.cooldown_power,
        cfg.min_lr,
    )
    use_scaler = cfg.precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    return optimizer, scheduler, scaler


def _new_skip_counter() -> Any:
    try:
        from clipforge.data.images import SkipCounter
    except ImportError:  # pragma: no cover
        return None
    return SkipCounter("train data")


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    if cfg.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("precision 'fp16' needs a CUDA device; use fp32 or bf16 on CPU")
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model, preprocess_train, preprocess_val, tokenizer = build_model(cfg, info.device)
    skips = _new_skip_counter()
    loader = build_data(cfg, info, preprocess_train, tokenizer, skips)
    total = cfg.max_steps or cfg.epochs * len(loader)
    strategy = {"auto": "ddp"}.get(cfg.distributed, cfg.distributed)
    wrapped = wrap_model(model, info, strategy)  # first: FSDP2 swaps in sharded parameters
    optimizer, scheduler, scaler = build_optimizer(cfg, model, total)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    loss_fn, teacher = build_objective(cfg, info, model)
    task = ContrastiveTask(
        wrapped, loss_fn, max_logit_scale=cfg.max_logit_scale, ema_decay=cfg.ema_decay, teacher=teacher
    )
    run = Run(
        cfg, info, model, task, optimizer, scheduler, scaler, loader, tokenizer, preprocess_val, skips, total
    )
    seed_everything(cfg.seed + info.rank)  # per-rank randomness (patch dropout) from here on
    maybe_resume(run)
    return run


# =================================================================================================
# =================================================================================================
# the loop
# =================================================================================================
def autocast_factory(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _grads_finite_norm(run: Run) -> Tensor:
    params = [p for p in run.model.parameters() if p.grad is not None]
    max_norm = run.cfg.grad_clip_norm if run.cfg.grad_clip_norm else float("inf")
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A loader batch as ``(images, tokens, extras)``: tuples for plain pairs, dicts for objective items."""
    if isinstance(batch, dict):
        extras = {k: v for k, v in batch.items() if k not in ("image", "tokens")}
        return batch["image"], batch["tokens"], extras
    images, tokens = batch[0], batch[1]
    return images, tokens, {}


def compute_gradients(
    run: Run,
    images: Tensor,
    tokens: Tensor,
    autocast=contextlib.nullcontext,
    extras: dict[str, Tensor] | None = None,
) -> TaskOutput:
    """Fill ``.grad`` with one step's (scaled) gradients: every micro-batch, in sync on every rank."""
    device = run.info.device
    images = images.to(device, non_blocking=True)
    tokens = tokens.to(device, non_blocking=True)
    extras = {k: v.to(device, non_blocking=True) for k, v in (extras or {}).items()}
    run.optimizer.zero_grad(set_to_none=True)
    out = run.task.forward_backward(
        split_micro_batches(images, tokens, run.cfg.accum_steps, extras),
        backward=lambda loss: run.scaler.scale(loss).backward(),
        autocast=autocast,
    )
    if run.info.distributed and run.cfg.distributed == "fsdp":
        sync_replicated_grads(run.model)
    return out


def train_step(
    run: Run, images: Tensor, tokens: Tensor, autocast, extras: dict[str, Tensor] | None = None
) -> dict[str, float] | None:
    """One optimiser step; returns metrics, or None if the step was skipped (NaN/Inf)."""
    out = compute_gradients(run, images, tokens, autocast, extras)
    run.scaler.unscale_(run.optimizer)
    grad_norm = _grads_finite_norm(run)
    loss_ok = math.isfinite(out.metrics["loss"])
    # With fp16 the scaler owns overflowing gradients (it skips and lowers the scale by design).
    grads_ok = run.scaler.is_enabled() or bool(torch.isfinite(grad_norm))
    bad = not (loss_ok and grads_ok)
    if run.info.distributed:
        bad = any_rank(bad, run.info.device)
    lr = run.optimizer.param_groups[0]["lr"]
    if bad:
        run.optimizer.zero_grad(set_to_none=True)
        if run.scaler.is_enabled():
            run.scaler.update()
    else:
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.task.after_step()
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()
    run.state.step += 1
    run.state.samples_seen += images.shape[0] * run.info.world_size
    if bad:
        return None
    return {**out.metrics, "lr": lr, "grad_norm": float(grad_norm)}


def _handle_bad_step(run: Run, rlog: RunLogger) -> None:
    run.state.bad_steps += 1
    run.state.bad_in_a_row += 1
    rlog.write(
        f"step {run.state.step}: non-finite loss or gradients; step skipped "
        f"({run.state.bad_in_a_row} in a row, {run.state.bad_steps} total)"
    )
    rlog.log(run.state.step, {"skipped": True, "bad_steps": run.state.bad_steps})
    if run.state.bad_in_a_row >= run.cfg.max_bad_steps:
        last = ckpt.list_checkpoints(run.ckpt_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingDivergedError(
            f"aborting at step {run.state.step}: {run.state.bad_in_a_row} consecutive steps had NaN/Inf loss or "
            f"gradients; {where}. Try a lower --lr, --grad-clip-norm 1.0, or --precision fp32"
        )


def _install_sigterm(run: Run) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing this step, writing a checkpoint, then exiting")
        run.stop.set()

    return signal.signal(signal.SIGTERM, handler)


def _end_of_epoch(run: Run, rlog: RunLogger, eval_metrics: dict[str, Any]) -> bool:
    """Periodic evaluation (into ``eval_metrics``) and epoch checkpoint; True if it evaluated."""
    cfg, state = run.cfg, run.state
    evaluated = bool(cfg.val_data and cfg.eval_every_epochs and state.epoch % cfg.eval_every_epochs == 0)
    if evaluated:
        eval_metrics.clear()
        eval_metrics.update(evaluate(run, rlog))
    if cfg.save_every_epochs and state.epoch % cfg.save_every_epochs == 0 and state.step < run.total_steps:
        save_training_checkpoint(run)
    return evaluated


def fit(run: Run) -> TrainResult:
    """Epochs of steps; checkpoints on schedule; stops cleanly on SIGTERM."""
    cfg, state = run.cfg, run.state
    autocast = autocast_factory(cfg, run.info.device)
    rlog = RunLogger(
        cfg.output_dir,
        enabled=run.info.is_main,
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
        total_steps=run.total_steps,
        initial_step=state.step,
    )
    previous_handler = _install_sigterm(run)
    eval_metrics: dict[str, Any] = {}  # the latest evaluation's
    eval_step = -1
    start, start_samples = time.perf_counter(), state.samples_seen
    window_t, window_samples = time.perf_counter(), state.samples_seen
    run.model.train()
    run.task.model.train()
    try:
        while not run.stop.is_set():
            if run.loader.epoch > state.epoch:  # an epoch ended (possibly just before a resume)
                state.epoch = run.loader.epoch
                if _end_of_epoch(run, rlog, eval_metrics):
                    eval_step = state.step
            if state.step >= run.total_steps or (not cfg.max_steps and state.epoch >= cfg.epochs):
                break  # max_steps, when given, overrides epochs
            for batch in run.loader:
                images, tokens, extras = unpack_batch(batch)
                metrics = train_step(run, images, tokens, autocast, extras)
                if metrics is None:
                    _handle_bad_step(run, rlog)
                else:
                    state.bad_in_a_row = 0
                    run.losses.append(metrics["loss"])
                now = time.perf_counter()
                sps = (state.samples_seen - window_samples) / max(now - window_t, 1e-9)
                if metrics is not None:
                    rlog.progress(
                        1, loss=f"{metrics['loss']:.4f}", sps=f"{sps:.1f}", lr=f"{metrics['lr']:.2e}"
                    )
                else:
                    rlog.progress(1)
                if metrics is not None and (state.step % cfg.log_every == 0 or state.step == run.total_steps):
                    rlog.log(state.step, {**metrics, "epoch": state.epoch, "samples_per_s": sps})
                    window_t, window_samples = now, state.samples_seen
                stop = (
                    any_rank(run.stop.is_set(), run.info.device)
                    if run.info.distributed
                    else run.stop.is_set()
                )
                if stop:
                    run.stop.set()
                    break
                if state.step >= run.total_steps:
                    break
                # No periodic checkpoint in the middle of a NaN streak: the last one stays the last good one.
                if cfg.save_every_steps and state.step % cfg.save_every_steps == 0 and not state.bad_in_a_row:
                    save_training_checkpoint(run)
        last = save_training_checkpoint(run)
        if run.stop.is_set():
            rlog.write(f"stopped by SIGTERM at step {state.step}; continue with --resume latest")
        elif cfg.val_data and eval_step != state.step:  # not evaluated at this very step yet
            eval_metrics = evaluate(run, rlog)
        final_dir = None if run.stop.is_set() else save_final_model(run)
    finally:
        rlog.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    wall = time.perf_counter() - start
    result = TrainResult(
        output_dir=str(cfg.output_dir),
        final_model_dir=str(final_dir) if final_dir else None,
        last_checkpoint=str(last) if last else None,
        steps=state.step,
        epochs=state.epoch,
        final_loss=run.losses[-1] if run.losses else None,
        skipped_steps=state.bad_steps,
        skipped_samples=run.skips.counts() if run.skips is not None else {},
        samples_per_second=(state.samples_seen - start_samples) / max(wall, 1e-9),
        wall_time_s=wall,
        interrupted=run.stop.is_set(),
        eval_metrics=eval_metrics,
        loss_history=list(run.losses),
    )
    if run.info.is_main:
        write_summary(run, result)
    return result


# =================================================================================================
# entry point
# =================================================================================================
def run_config_name() -> str:
    """``run_config.yaml``; JSON (which ``--config`` also reads) when PyYAML is not installed."""
    import importlib.util

    return "run_config.yaml" if importlib.util.find_spec("yaml") is not None else "run_config.json"


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or fine-tune) a CLIP model as described by ``cfg``; see :class:`TrainConfig`."""
    cfg.validate()
    configure_runtime(cfg)
    already = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = setup_distributed(cfg.device)
    owns_group = info.distributed and not already  # leave a caller's process group alone
    try:
        if info.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            cfg.save(Path(cfg.output_dir) / run_config_name())
        run = build_run(cfg, info)
        if info.is_main:
            save_model_config(run)
        return fit(run)
    finally:
        if owns_group:
            cleanup_distributed()
