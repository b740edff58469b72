"""What to train: locked towers (LiT), LoRA adapters, and folding adapters back for export.

Our attention layers are plain ``nn.Linear`` modules (``in_proj``/``out_proj``) and the MLPs are
``c_fc``/``c_proj``, so ``peft`` can wrap them directly; open_clip's ``nn.MultiheadAttention``
hides its projections from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import nn

from clipforge.errors import ConfigError
from clipforge.model import prepack

if TYPE_CHECKING:
    from clipforge.train.config import SurgeryConfig

log = logging.getLogger(__name__)


def lock_towers(
    model: nn.Module,
    *,
    lock_image: bool = False,
    image_unlocked_groups: int = 0,
    freeze_bn_stats: bool = False,
    lock_text: bool = False,
    text_unlocked_layers: int = 0,
) -> None:
    """Freeze whole towers (LiT locks the image side) except their last N groups."""
    if lock_image:
        model.visual.lock(unlocked_groups=image_unlocked_groups, freeze_bn_stats=freeze_bn_stats)
    if lock_text:
        model.text.lock(unlocked_groups=text_unlocked_layers)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("in_proj", "out_proj", "c_fc", "c_proj"),
    towers: Sequence[str] | None = None,
) -> nn.Module:
    """Inject LoRA adapters in place and freeze everything else; returns the same module.

    ``towers`` (e.g. ``["text"]`` when the image tower is locked) limits adapters to those
    submodules, so a locked tower stays exactly as loaded.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("LoRA needs the 'peft' package: pip install 'clipforge[train]'") from e
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(
            f"lora_targets {missing} match no nn.Linear in the model; available: {sorted(present)}"
        )
    target: list[str] | str = list(targets)
    if towers is not None:
        if not towers:
            raise ConfigError("LoRA with both towers locked leaves nothing to adapt; unlock one tower")
        # peft full-matches a string target as a regex against the module path
        target = rf"^({'|'.join(towers)})\..*\.({'|'.join(targets)})$"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, bias="none")
    inject_adapter_in_model(config, model)
    n_train = 0
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
        n_train += param.numel() if param.requires_grad else 0
    log.info(
        "LoRA r=%d on %s of %s: %d trainable parameters",
        rank,
        list(targets),
        towers or "both towers",
        n_train,
    )
    return model


def apply_run_lora(model: nn.Module, surgery: SurgeryConfig) -> nn.Module:
    """LoRA as a run config asks for it, on the towers it leaves unlocked.

    The one place the run's adapter layout is derived: training and the unsharded twin that
    exports an FSDP run must get the very same adapters, or the gathered weights would not load.
    """
    towers = [
        name for name, locked in (("visual", surgery.lock_image), ("text", surgery.lock_text)) if not locked
    ]
    return apply_lora(
        model, surgery.lora_rank, surgery.lora_alpha, surgery.lora_dropout, surgery.lora_targets, towers
    )


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold adapters into the base weights and put the plain ``nn.Linear`` back (in place).

    The result has the original state-dict keys, so ``save_pretrained`` writes a normal model.
    """
    from peft.tuners.lora import LoraLayer

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
                replaced += 1
    for param in model.parameters():
        param.requires_grad_(True)
    prepack.forget(model)  # peft merges through weight.data, which no version counter sees
    log.debug("merged %d LoRA layers", replaced)
    return model
