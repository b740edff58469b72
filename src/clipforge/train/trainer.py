"""``train(cfg)``: build the pieces with small named functions, then a short ``fit()`` loop.

Reading order: :func:`train` -> :func:`build_run` (``setup_distributed``, ``build_model``,
``build_data``, ``build_optimizer``, ``resume_training``) -> :func:`fit` -> :func:`train_step`.
Checkpoint layout and restore live in :mod:`clipforge.train.checkpointing` (over a mapping of
stateful objects), the objective in :mod:`clipforge.train.task`, the batch position in
:mod:`clipforge.data.loader`, what a run leaves behind in :mod:`clipforge.train.outputs` and
throughput metering in :mod:`clipforge.train.logger`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from clipforge.data.loader import ResumableLoader
from clipforge.errors import ClipforgeError, ConfigError, DataError
from clipforge.naflex_transforms import batch_length, images_to
from clipforge.train import state as ckpt
from clipforge.train.checkpointing import resume_training, save_training_checkpoint, training_states
from clipforge.train.config import TrainConfig
from clipforge.train.distributed import (
    DistInfo,
    any_rank,
    barrier,
    cleanup_distributed,
    setup_distributed,
    sync_replicated_grads,
    wrap_model,
)
from clipforge.train.logger import RunLogger
from clipforge.train.optim import build_optimizer as make_optimizer
from clipforge.train.optim import build_scheduler
from clipforge.train.outputs import (
    EvalSetup,
    evaluate,
    save_final_model,
    save_model_config,
    unsharded_twin,
    write_summary,
)
from clipforge.train.surgery import apply_run_lora, lock_towers
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
    """What the loop steps, built once by :func:`build_run`.

    Only this module sees it: checkpointing gets :meth:`states` (a mapping of stateful objects),
    evaluation gets a model and :attr:`eval_setup`, the final export a model and a folder.
    """

    cfg: TrainConfig
    info: DistInfo
    model: nn.Module  # the raw CLIP (possibly with LoRA layers)
    task: ContrastiveTask
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: ResumableLoader
    total_steps: int  # fixed at build: a stream's length is recomputed (and re-seeded) on each len()
    eval_setup: EvalSetup | None = None
    skips: Any = None
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "checkpoints"

    @property
    def sharded(self) -> bool:
        """FSDP2: parameters (and their optimiser state) are split across ranks."""
        return self.info.distributed and self.cfg.runtime.distributed == "fsdp"

    def states(self) -> dict[str, Any]:
        """The checkpoint's stateful objects, by name (see :func:`~clipforge.train.checkpointing.training_states`)."""
        return training_states(
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            ema=self.task.ema,
            loader=self.loader,
            skips=self.skips,
            train_state=self.state,
            sharded=self.sharded,
        )


# =================================================================================================
# build
# =================================================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def configure_runtime(cfg: TrainConfig) -> None:
    rt = cfg.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    if rt.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


#: What ``clipforge train`` builds when given neither --model nor --pretrained.
DEFAULT_MODEL = "tiny-vit"


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Any, Any, Any]:
    """The CLIP to train, its train/val preprocessing and tokenizer, with locks/LoRA applied."""
    from clipforge.factory import create_model_and_transforms, get_tokenizer

    surgery = cfg.surgery
    overrides = (
        {"vision": {"patch_dropout": surgery.patch_dropout}} if surgery.patch_dropout is not None else {}
    )
    # No --model: fine-tune the --pretrained checkpoint as it describes itself, else the tiny default.
    name = cfg.model or (None if cfg.pretrained else DEFAULT_MODEL)
    model, preprocess_train, preprocess_val = create_model_and_transforms(
        name,
        cfg.pretrained,
        image_alpha=surgery.image_alpha,
        image_naflex=None if surgery.naflex else False,
        **overrides,
    )
    tokenizer = get_tokenizer(model)
    _check_model_fits_loss(model, cfg.objective.loss)
    _refuse_naflex_options(cfg, model)
    lock_towers(
        model,
        lock_image=surgery.lock_image,
        image_unlocked_groups=surgery.lock_image_unlocked_groups,
        freeze_bn_stats=surgery.lock_image_freeze_bn_stats,
        lock_text=surgery.lock_text,
        text_unlocked_layers=surgery.lock_text_unlocked_layers,
    )
    if surgery.lora_rank:
        apply_run_lora(model, surgery)
    if cfg.runtime.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(device), preprocess_train, preprocess_val, tokenizer


def _refuse_naflex_options(cfg: TrainConfig, model: nn.Module) -> None:
    """Options that cannot work on NaFlex batches (padded patch dicts), refused before the first step.

    The image cache stores fixed-size crops, the on-the-fly teacher resizes square pixel batches
    and the NaFlex forward has no patch dropout (its patch mask pads, it does not drop): failing
    inside the first step would say none of that.
    """
    pre = model.preprocess_cfg
    if pre.naflex_max_patches is None:
        return
    dropout = cfg.surgery.patch_dropout
    dropout = getattr(model.config.vision, "patch_dropout", 0.0) if dropout is None else dropout
    refused = [
        ("--cache-images", cfg.data.cache_images, "its cache stores fixed-size square crops"),
        ("--patch-dropout", bool(dropout), "the NaFlex forward does not drop patches"),
        ("--distill-model", bool(cfg.objective.distill_model),
         "the on-the-fly teacher takes square pixel batches (precompute with --distill-features)"),
    ]  # fmt: skip
    for option, asked, why in refused:
        if asked:
            raise ConfigError(
                f"{option} cannot be used with NaFlex preprocessing (naflex_max_patches="
                f"{pre.naflex_max_patches}): {why}"
            )


def naflex_collate_for(transform: Any) -> Any:
    """The loader's collate for a NaFlex train transform (pads patch dicts), else None (torch's)."""
    from clipforge.naflex_transforms import NaFlexCollate, NaFlexTransform

    return NaFlexCollate(transform.max_num_patches) if isinstance(transform, NaFlexTransform) else None


def _check_model_fits_loss(model: nn.Module, loss: str) -> None:
    """SigLIP-style losses need a logit bias, coca a captioning decoder: say so before training."""
    from clipforge.objectives.registry import get_spec

    if get_spec(loss).needs_bias and getattr(model, "logit_bias", None) is None:
        raise ConfigError(
            f"loss {loss!r} needs a model with a logit_bias (e.g. tiny-vit-siglip); {model.architecture} has none"
        )
    if loss == "coca" and getattr(model, "text_decoder", None) is None:
        raise ConfigError(
            f"loss 'coca' needs a CoCa model with a captioning decoder (e.g. tiny-coca, coca_ViT-B-32); "
            f"{model.architecture} has none"
        )


def build_dataset(
    spec: str, *, transform: Any, tokenizer: Any, seed: int, skips: Any, cfg: TrainConfig, **extra: Any
) -> Any:
    """Resolve a data spec with ``clipforge.data.build_dataset`` (tables, folders, shards, synthetic)."""
    from clipforge.data.build import build_dataset as build

    options = {**cfg.data.table_kwargs(), **{k: v for k, v in extra.items() if v is not None}}
    return build(spec, transform=transform, tokenizer=tokenizer, seed=seed, skip_counter=skips, **options)


def build_data(
    cfg: TrainConfig, info: DistInfo, transform: Any, tokenizer: Any, skips: Any
) -> ResumableLoader:
    data = cfg.data
    if not data.train:
        raise ConfigError("no training data: pass --data (a table, folder, shards or synthetic:shapes)")
    extra_keys = [k for k in [data.group_key, *data.hard_negative_keys()] if k]
    dataset = build_dataset(
        data.train,
        transform=transform,
        tokenizer=tokenizer,
        seed=cfg.runtime.seed,
        skips=skips,
        cfg=cfg,
        rank=info.rank,
        world_size=info.world_size,
        extra_keys=tuple(extra_keys) or None,
    )
    from clipforge.data.cache import maybe_cache_images
    from clipforge.data.workers import auto_workers

    cache = SimpleNamespace(
        cache_images=data.cache_images, cache_dir=data.cache_dir, output_dir=cfg.output_dir
    )
    dataset = maybe_cache_images(cache, info, dataset)
    workers = (
        data.workers if data.workers is not None else auto_workers(dataset, info.device.type, info.world_size)
    )
    dataset = wrap_objective_items(cfg, dataset)
    per_step = data.batch_size * cfg.optim.accum_steps
    loader = ResumableLoader(
        dataset,
        batch_size=per_step,
        num_workers=workers,
        seed=cfg.runtime.seed,
        rank=info.rank,
        world_size=info.world_size,
        steps_per_epoch=data.steps_per_epoch,
        pin_memory=info.device.type == "cuda",
        drop_last=True,
        collate_fn=naflex_collate_for(transform),
    )
    if len(loader) < 1:
        size = f"has {len(dataset)} samples" if hasattr(dataset, "__len__") else "is an endless stream"
        raise DataError(
            f"the training data {size}: no full batch of {per_step} per epoch on "
            f"{info.world_size} process(es); lower --batch-size (or set --steps-per-epoch for endless streams)"
        )
    return loader


def wrap_objective_items(cfg: TrainConfig, dataset: Any) -> Any:
    """Dict items (group ids, k captions, hard negatives, views, teacher features) when asked for.

    Only then: plain runs keep ``(image, tokens)`` items, with their exact data order.
    """
    data, objective = cfg.data, cfg.objective
    wanted = (
        objective.loss == "multipos"
        or data.captions_per_image > 1
        or data.group_key
        or data.hard_negative_key
        or objective.image_ssl
        or objective.distill_features
    )
    if not wanted:
        return dataset
    from clipforge.data.objective_items import ObjectiveItems, TeacherFeatures

    return ObjectiveItems(
        dataset,
        captions_per_image=data.captions_per_image,
        group_key=data.group_key,
        hard_negative_keys=data.hard_negative_keys(),
        hard_negatives=data.hard_negatives or 1,
        image_views=objective.image_ssl is not None,
        teacher=TeacherFeatures(objective.distill_features) if objective.distill_features else None,
    )


def build_objective(cfg: TrainConfig, info: DistInfo, student: nn.Module) -> tuple[Any, Any]:
    """The loss callable from the registry (+ SSL and distillation terms) and the on-the-fly teacher."""
    from clipforge.objectives.combined import build_objective as make

    o = cfg.objective
    teacher, scale = None, o.distill_scale
    if o.distill_model:
        teacher = build_teacher(cfg, info.device, student)
        scale = scale if scale is not None else teacher.logit_scale
    objective = make(
        o.loss,
        o.loss_options(),
        rank=info.rank,
        world_size=info.world_size,
        image_ssl=o.image_ssl,
        image_ssl_weight=1.0 if o.image_ssl_weight is None else o.image_ssl_weight,
        image_ssl_temperature=o.image_ssl_temperature or 0.1,
        distill_weight=(1.0 if o.distill_weight is None else o.distill_weight) if o.distilling else None,
        distill_scale=scale if scale is not None else 100.0,
    )
    return objective, teacher


def build_teacher(cfg: TrainConfig, device: torch.device, student: nn.Module) -> Any:
    """A frozen teacher (any model clipforge loads) that embeds the student's batches."""
    from clipforge.factory import create_model, get_tokenizer
    from clipforge.objectives.distill import OnTheFlyTeacher

    o = cfg.objective
    model = create_model(o.distill_model, o.distill_pretrained).to(device)
    ours, theirs = get_tokenizer(student), get_tokenizer(model)
    probe = ["a photo of a cat", "zebra crossing at night"]
    if not torch.equal(torch.as_tensor(ours(probe)), torch.as_tensor(theirs(probe))):
        raise ConfigError(
            f"--distill-model {o.distill_model}: its tokenizer differs from the student's; on-the-fly "
            "distillation reuses the batch's tokens (precompute teacher features with `clipforge embed` instead)"
        )
    s_pre, t_pre = student.preprocess_cfg, model.preprocess_cfg
    size = t_pre.image_size if isinstance(t_pre.image_size, int) else t_pre.image_size[0]
    return OnTheFlyTeacher(model, (s_pre.mean, s_pre.std), (t_pre.mean, t_pre.std), size)


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, total_steps: int
) -> tuple[Any, Any, torch.amp.GradScaler]:
    o = cfg.optim
    optimizer = make_optimizer(
        model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, groups=o.weight_decay_groups
    )
    scheduler = build_scheduler(
        optimizer, o.schedule, total_steps, o.warmup_steps, o.cooldown_steps, o.cooldown_power, o.min_lr
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.runtime.precision == "fp16")
    return optimizer, scheduler, scaler


def build_eval_setup(cfg: TrainConfig, info: DistInfo, tokenizer: Any, preprocess: Any) -> EvalSetup | None:
    """How ``--val-data`` is evaluated during and after training (None without validation data)."""
    if not cfg.data.val:
        return None
    return EvalSetup(
        val_data=cfg.data.val,
        tokenizer=tokenizer,
        preprocess=preprocess,
        device=info.device,
        batch_size=max(64, cfg.data.batch_size),
        model_name=cfg.model,
        report_dir=Path(cfg.output_dir) / "eval",
        table=cfg.data.table_kwargs(),
        templates=cfg.logging.zeroshot_templates,
    )


def _new_skip_counter() -> Any:
    try:
        from clipforge.data.images import SkipCounter
    except ImportError:  # pragma: no cover
        return None
    return SkipCounter("train data")


def build_run(cfg: TrainConfig, info: DistInfo) -> Run:
    rt = cfg.runtime
    if rt.precision == "fp16" and info.device.type != "cuda":
        raise ConfigError("precision 'fp16' needs a CUDA device; use fp32 or bf16 on CPU")
    seed_everything(rt.seed)  # identical initial weights on every rank
    model, preprocess_train, preprocess_val, tokenizer = build_model(cfg, info.device)
    skips = _new_skip_counter()
    loader = build_data(cfg, info, preprocess_train, tokenizer, skips)
    total = cfg.optim.max_steps or cfg.optim.epochs * len(loader)
    strategy = {"auto": "ddp"}.get(rt.distributed, rt.distributed)
    wrapped = wrap_model(model, info, strategy)  # first: FSDP2 swaps in sharded parameters
    optimizer, scheduler, scaler = build_optimizer(cfg, model, total)
    if rt.compile:
        wrapped = torch.compile(wrapped)
    loss_fn, teacher = build_objective(cfg, info, model)
    task = ContrastiveTask(
        wrapped,
        loss_fn,
        max_logit_scale=cfg.objective.max_logit_scale,
        ema_decay=cfg.optim.ema_decay,
        teacher=teacher,
    )
    eval_setup = build_eval_setup(cfg, info, tokenizer, preprocess_val)
    run = Run(cfg, info, model, task, optimizer, scheduler, scaler, loader, total, eval_setup, skips)
    seed_everything(rt.seed + info.rank)  # per-rank randomness (patch dropout) from here on
    resume_training(
        run.states(), resume=cfg.checkpoints.resume, directory=run.ckpt_dir, info=info, config=cfg.flat()
    )
    return run


# =================================================================================================
# one step
# =================================================================================================
def autocast_factory(cfg: TrainConfig, device: torch.device):
    precision = cfg.runtime.precision
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def _grads_finite_norm(run: Run) -> Tensor:
    params = [p for p in run.model.parameters() if p.grad is not None]
    clip = run.cfg.optim.grad_clip_norm
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))


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
    images = images_to(images, device, non_blocking=True)  # a pixel tensor or a NaFlex patch dict
    tokens = tokens.to(device, non_blocking=True)
    extras = {k: images_to(v, device, non_blocking=True) for k, v in (extras or {}).items()}
    run.optimizer.zero_grad(set_to_none=True)
    out = run.task.forward_backward(
        split_micro_batches(images, tokens, run.cfg.optim.accum_steps, extras),
        backward=lambda loss: run.scaler.scale(loss).backward(),
        autocast=autocast,
    )
    if run.sharded:
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
    run.state.samples_seen += batch_length(images) * run.info.world_size
    if bad:
        return None
    return {**out.metrics, "lr": lr, "grad_norm": float(grad_norm)}


# =================================================================================================
# the loop
# =================================================================================================
def save_checkpoint(run: Run) -> Path | None:
    """A training checkpoint of ``run`` now (all ranks call it; rank 0 writes)."""
    return save_training_checkpoint(
        run.states(),
        info=run.info,
        directory=run.ckpt_dir,
        step=run.state.step,
        keep_last=run.cfg.checkpoints.keep_last,
        config=run.cfg.to_dict(),
    )


def run_evaluation(run: Run, rlog: RunLogger) -> dict[str, Any]:
    """Evaluate the EMA weights (if kept, else the model) on rank 0; the others wait."""
    metrics: dict[str, Any] = {}
    if run.info.is_main and run.eval_setup is not None:
        model = run.task.ema.module if run.task.ema is not None else run.model
        metrics = evaluate(model, run.eval_setup)
        rlog.evaluation(run.state.step, run.state.epoch, metrics)
        run.model.train()
    barrier()
    return metrics


def export_final_model(run: Run) -> Path | None:
    """``output_dir/final`` (and ``final-ema``) from rank 0; an FSDP run gathers the weights first."""
    model = run.model
    if run.sharded:
        full = run.states()["model"].state_dict()  # collective: every rank takes part
        if not run.info.is_main:
            return None
        model = unsharded_twin(run.model, full, run.cfg.surgery)
    if not run.info.is_main:
        return None
    ema = run.task.ema.module if run.task.ema is not None else None
    return save_final_model(model, run.cfg.output_dir, ema)


def _handle_bad_step(run: Run, rlog: RunLogger) -> None:
    state = run.state
    state.bad_steps += 1
    state.bad_in_a_row += 1
    rlog.write(
        f"step {state.step}: non-finite loss or gradients; step skipped "
        f"({state.bad_in_a_row} in a row, {state.bad_steps} total)"
    )
    rlog.log(state.step, {"skipped": True, "bad_steps": state.bad_steps})
    if state.bad_in_a_row >= run.cfg.runtime.max_bad_steps:
        last = ckpt.list_checkpoints(run.ckpt_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
        raise TrainingDivergedError(
            f"aborting at step {state.step}: {state.bad_in_a_row} consecutive steps had NaN/Inf loss or "
            f"gradients; {where}. Try a lower --lr, --grad-clip-norm 1.0, or --precision fp32"
        )


def _install_sigterm(stop: threading.Event) -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: finishing this step, writing a checkpoint, then exiting")
        stop.set()

    return signal.signal(signal.SIGTERM, handler)


def _end_of_epoch(run: Run, rlog: RunLogger, eval_metrics: dict[str, Any]) -> bool:
    """Periodic evaluation (into ``eval_metrics``) and epoch checkpoint; True if it evaluated."""
    cfg, state = run.cfg, run.state
    every = cfg.logging.eval_every_epochs
    evaluated = bool(cfg.data.val and every and state.epoch % every == 0)
    if evaluated:
        eval_metrics.clear()
        eval_metrics.update(run_evaluation(run, rlog))
    save_every = cfg.checkpoints.save_every_epochs
    if save_every and state.epoch % save_every == 0 and state.step < run.total_steps:
        save_checkpoint(run)
    return evaluated


def _finished(run: Run) -> bool:
    """All steps taken, or all epochs (``max_steps``, when given, overrides epochs)."""
    optim, state = run.cfg.optim, run.state
    return state.step >= run.total_steps or (not optim.max_steps and state.epoch >= optim.epochs)


def _train_epoch(
    run: Run, rlog: RunLogger, autocast: Any, stop: threading.Event, losses: list[float]
) -> None:
    """Steps until the loader's epoch ends, the run is done or a SIGTERM arrived (on any rank)."""
    state, every = run.state, run.cfg.checkpoints.save_every_steps
    for batch in run.loader:
        images, tokens, extras = unpack_batch(batch)
        metrics = train_step(run, images, tokens, autocast, extras)
        if metrics is None:
            _handle_bad_step(run, rlog)
        else:
            state.bad_in_a_row = 0
            losses.append(metrics["loss"])
        rlog.step(state.step, state.samples_seen, metrics, state.epoch)
        if any_rank(stop.is_set(), run.info.device) if run.info.distributed else stop.is_set():
            stop.set()
            return
        if state.step >= run.total_steps:
            return
        # No periodic checkpoint in the middle of a NaN streak: the last one stays the last good one.
        if every and state.step % every == 0 and not state.bad_in_a_row:
            save_checkpoint(run)


def _result(
    run: Run,
    rlog: RunLogger,
    losses: list[float],
    eval_metrics: dict[str, Any],
    *,
    last: Path | None,
    final_dir: Path | None,
    interrupted: bool,
) -> TrainResult:
    """What ``fit`` returns (and ``summary.json`` holds)."""
    state = run.state
    sps, wall = rlog.samples_per_second(state.samples_seen)
    return TrainResult(
        output_dir=str(run.cfg.output_dir),
        final_model_dir=str(final_dir) if final_dir else None,
        last_checkpoint=str(last) if last else None,
        steps=state.step,
        epochs=state.epoch,
        final_loss=losses[-1] if losses else None,
        skipped_steps=state.bad_steps,
        skipped_samples=run.skips.counts() if run.skips is not None else {},
        samples_per_second=sps,
        wall_time_s=wall,
        interrupted=interrupted,
        eval_metrics=eval_metrics,
        loss_history=losses,
    )


def fit(run: Run) -> TrainResult:
    """Epochs of steps; checkpoints on schedule; stops cleanly on SIGTERM."""
    cfg, state = run.cfg, run.state
    rlog = RunLogger(
        cfg.output_dir,
        enabled=run.info.is_main,
        tensorboard=cfg.logging.tensorboard,
        progress=cfg.logging.progress,
        total_steps=run.total_steps,
        initial_step=state.step,
        log_every=cfg.logging.log_every,
        initial_samples=state.samples_seen,
    )
    stop, losses = threading.Event(), []
    previous_handler = _install_sigterm(stop)
    autocast = autocast_factory(cfg, run.info.device)
    eval_metrics: dict[str, Any] = {}  # the latest evaluation's
    eval_step = -1
    run.model.train()
    run.task.model.train()
    try:
        while not stop.is_set():
            if run.loader.epoch > state.epoch:  # an epoch ended (possibly just before a resume)
                state.epoch = run.loader.epoch
                if _end_of_epoch(run, rlog, eval_metrics):
                    eval_step = state.step
            if _finished(run):
                break
            _train_epoch(run, rlog, autocast, stop, losses)
        last = save_checkpoint(run)
        if stop.is_set():
            rlog.write(f"stopped by SIGTERM at step {state.step}; continue with --resume latest")
        elif cfg.data.val and eval_step != state.step:  # not evaluated at this very step yet
            eval_metrics = run_evaluation(run, rlog)
        final_dir = None if stop.is_set() else export_final_model(run)
    finally:
        rlog.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    result = _result(
        run, rlog, losses, eval_metrics, last=last, final_dir=final_dir, interrupted=stop.is_set()
    )
    if run.info.is_main:
        write_summary(result, cfg.output_dir)
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
    info = setup_distributed(cfg.runtime.device)
    owns_group = info.distributed and not already  # leave a caller's process group alone
    try:
        if info.is_main:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            cfg.save(Path(cfg.output_dir) / run_config_name())
        run = build_run(cfg, info)
        if info.is_main:
            save_model_config(run.model, cfg.output_dir)
        return fit(run)
    finally:
        if owns_group:
            cleanup_distributed()
