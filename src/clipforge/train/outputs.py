"""What a run leaves behind: the final model, validation metrics and the run summary."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipforge.train.checkpointing import full_state_dicts
from clipforge.train.distributed import barrier
from clipforge.train.logger import RunLogger
from clipforge.train.surgery import apply_lora, has_lora, merge_lora

if TYPE_CHECKING:
    from clipforge.train.trainer import Run, TrainResult

log = logging.getLogger(__name__)


MODEL_CONFIG_NAME = "model_config.json"


def save_model_config(run: Run) -> Path:
    """Write the resolved architecture to ``output_dir/model_config.json`` at the start of a run.

    ``run_config`` keeps what was asked for (``model: my-arch.json``, a name, or weights); this
    file keeps what that resolved to, so the run stays reproducible when the JSON is edited or
    moved. It is in the clipforge ``config.json`` form: ``--model RUN/model_config.json`` reads it.
    """
    from clipforge.atomic import atomic_write_text
    from clipforge.model.architecture import model_label

    document = {"architecture": model_label(run.model), "model_config": run.model.config.to_dict()}
    path = Path(run.cfg.output_dir) / MODEL_CONFIG_NAME
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def save_final_model(run: Run) -> Path | None:
    """Write ``output_dir/final`` (model.safetensors + config.json) from rank 0; LoRA is merged."""
    model = run.model
    if run.cfg.distributed == "fsdp" and run.info.distributed:
        model_sd, _ = full_state_dicts(run)
        if not run.info.is_main:
            return None
        from clipforge.model.clip import build_model

        model = build_model(run.model.config)  # an unsharded twin to hold the gathered weights
        model.preprocess_cfg = run.model.preprocess_cfg
        model.architecture = getattr(run.model, "architecture", None)
        if has_lora(run.model):
            c = run.cfg
            towers = [
                name for name, locked in (("visual", c.lock_image), ("text", c.lock_text)) if not locked
            ]
            apply_lora(model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets, towers)
        model.load_state_dict(model_sd)
    if not run.info.is_main:
        return None
    from clipforge.checkpoints.clipforge_format import save_pretrained

    out = Path(run.cfg.output_dir) / "final"
    export = merge_lora(copy.deepcopy(model)) if has_lora(model) else model
    save_pretrained(export, out)
    if run.task.ema is not None:
        ema = run.task.ema.module
        save_pretrained(
            merge_lora(copy.deepcopy(ema)) if has_lora(ema) else ema, Path(run.cfg.output_dir) / "final-ema"
        )
    return out


def evaluate(run: Run, rlog: RunLogger) -> dict[str, Any]:
    """Retrieval Recall@K (and zero-shot accuracy when ``val_data`` has classes) on rank 0."""
    metrics: dict[str, Any] = {}
    if run.info.is_main:
        from clipforge.eval.datasets import load_eval_dataset
        from clipforge.eval.runner import evaluate as run_eval

        model = run.task.ema.module if run.task.ema is not None else run.model
        common = {
            "device": run.info.device,
            "batch_size": max(64, run.cfg.batch_size),
            "model_name": run.cfg.model,
            "report_dir": Path(run.cfg.output_dir) / "eval",
        }
        table = run.cfg.table_kwargs()
        ds = load_eval_dataset(run.cfg.val_data, task="retrieval", transform=run.preprocess_val, **table)
        if ds.supports_retrieval:
            metrics.update(
                run_eval(model, run.tokenizer, run.preprocess_val, ds, task="retrieval", **common)["metrics"]
            )
        ds = load_eval_dataset(run.cfg.val_data, task="classification", transform=run.preprocess_val, **table)
        if ds.supports_classification:
            result = run_eval(
                model,
                run.tokenizer,
                run.preprocess_val,
                ds,
                task="zeroshot",
                templates=run.cfg.zeroshot_templates,
                **common,
            )
            metrics.update({f"zeroshot_{k}": v for k, v in result["metrics"].items()})
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        rlog.log(run.state.step, {**metrics, "epoch": run.state.epoch}, kind="eval")
        shown = {
            k: metrics[k]
            for k in ("image_retrieval_recall@1", "text_retrieval_recall@1", "zeroshot_acc1")
            if k in metrics
        }
        rlog.write(f"eval @ epoch {run.state.epoch}: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        run.model.train()
    barrier()
    return metrics


def write_summary(run: Run, result: TrainResult) -> None:
    summary = {k: v for k, v in result.to_dict().items() if k != "loss_history"}
    path = Path(run.cfg.output_dir) / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(path)
    skipped = sum(result.skipped_samples.values())
    lines = [
        f"run summary: {result.steps} steps, {result.epochs} epoch(s) in {result.wall_time_s:.1f}s "
        f"({result.samples_per_second:.1f} samples/s)",
        f"  final loss {result.final_loss:.4f}" if result.final_loss is not None else "  no completed step",
        f"  skipped: {result.skipped_steps} step(s) with NaN/Inf, {skipped} bad sample(s) {result.skipped_samples or ''}",
    ]
    if result.final_model_dir:
        lines.append(f"  model: {result.final_model_dir} (load with create_model(pretrained=...))")
    for line in lines:
        log.info(line)
