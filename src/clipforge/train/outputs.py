"""What a run leaves behind: the final model, validation metrics and the run summary.

Each function takes what it writes or measures (a model, a folder, the validation setup), not the
trainer's run, so it can be called on its own (and tested without building a run).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from clipforge.atomic import atomic_write_text
from clipforge.train.surgery import apply_run_lora, has_lora, merge_lora

if TYPE_CHECKING:
    import torch

    from clipforge.train.config import SurgeryConfig
    from clipforge.train.trainer import TrainResult

log = logging.getLogger(__name__)


MODEL_CONFIG_NAME = "model_config.json"


def save_model_config(model: nn.Module, output_dir: str | Path) -> Path:
    """Write the resolved architecture to ``output_dir/model_config.json`` at the start of a run.

    ``run_config`` keeps what was asked for (``model: my-arch.json``, a name, or weights); this
    file keeps what that resolved to, so the run stays reproducible when the JSON is edited or
    moved. It is in the clipforge ``config.json`` form: ``--model RUN/model_config.json`` reads it.
    """
    from clipforge.model.architecture import model_label

    document = {"architecture": model_label(model), "model_config": model.config.to_dict()}
    path = Path(output_dir) / MODEL_CONFIG_NAME
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path


def unsharded_twin(model: nn.Module, full_state: dict[str, Any], surgery: SurgeryConfig) -> nn.Module:
    """A plain copy of an FSDP2-sharded ``model`` holding its gathered ``full_state`` (for export)."""
    from clipforge.model.build import build_model

    twin = build_model(model.config)
    twin.preprocess_cfg = model.preprocess_cfg
    twin.architecture = getattr(model, "architecture", None)
    if has_lora(model):
        apply_run_lora(twin, surgery)
    twin.load_state_dict(full_state)
    return twin


def save_final_model(model: nn.Module, output_dir: str | Path, ema: nn.Module | None = None) -> Path:
    """Write ``output_dir/final`` (model.safetensors + config.json), and ``final-ema``; LoRA is merged."""
    from clipforge.checkpoints.clipforge_format import save_pretrained

    out = Path(output_dir) / "final"
    save_pretrained(merge_lora(copy.deepcopy(model)) if has_lora(model) else model, out)
    if ema is not None:
        save_pretrained(
            merge_lora(copy.deepcopy(ema)) if has_lora(ema) else ema, Path(output_dir) / "final-ema"
        )
    return out


@dataclass(frozen=True)
class EvalSetup:
    """What evaluation during training reads, fixed for the run: the validation data and its encoding."""

    val_data: str
    tokenizer: Any
    preprocess: Any
    device: torch.device
    batch_size: int
    model_name: str | None
    report_dir: Path
    table: dict[str, Any]
    templates: str


def evaluate(model: nn.Module, setup: EvalSetup) -> dict[str, float]:
    """Retrieval Recall@K (and zero-shot accuracy when the validation data has classes) of ``model``."""
    from clipforge.eval.datasets import load_eval_dataset
    from clipforge.eval.runner import evaluate as run_eval

    metrics: dict[str, Any] = {}
    common = {
        "device": setup.device,
        "batch_size": setup.batch_size,
        "model_name": setup.model_name,
        "report_dir": setup.report_dir,
    }
    pre, table = setup.preprocess, setup.table
    ds = load_eval_dataset(setup.val_data, task="retrieval", transform=pre, **table)
    if ds.supports_retrieval:
        metrics.update(run_eval(model, setup.tokenizer, pre, ds, task="retrieval", **common)["metrics"])
    ds = load_eval_dataset(setup.val_data, task="classification", transform=pre, **table)
    if ds.supports_classification:
        result = run_eval(
            model, setup.tokenizer, pre, ds, task="zeroshot", templates=setup.templates, **common
        )
        metrics.update({f"zeroshot_{k}": v for k, v in result["metrics"].items()})
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def write_summary(result: TrainResult, output_dir: str | Path) -> None:
    summary = {k: v for k, v in result.to_dict().items() if k != "loss_history"}
    atomic_write_text(Path(output_dir) / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
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
