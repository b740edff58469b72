"""The one objective registry: every ``--loss NAME``, the options it declares and its defaults.

Why a table and not ``inspect.signature``: an option the chosen loss does not take must be an
error that names it (``--local-loss`` with ``--loss siglip`` used to be dropped silently), and
``clipforge train --help`` / config validation must know the options without importing torch.
Loss options are ``TrainConfig`` fields whose default is ``None`` ("not given"); the registry
fills in each loss's own default.

``inputs`` are the per-sample batch tensors a loss can use besides the features: ``ids`` (group
ids: several positives per query) and ``hard_negatives`` (extra text columns).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from clipforge.errors import ConfigError


@dataclass(frozen=True)
class LossSpec:
    name: str
    target: str  # "module:Class", imported only when the loss is built
    summary: str
    options: dict[str, Any]  # option (TrainConfig field) -> default
    inputs: tuple[str, ...] = ()
    needs_bias: bool = False
    renames: dict[str, str] = field(default_factory=dict)  # option -> constructor keyword


_GATHER = {"local_loss": False, "gather_with_grad": True}

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "clip", "clipforge.losses:ClipLoss", "symmetric InfoNCE (CLIP), labels arange(B)", dict(_GATHER)
        ),
        LossSpec(
            "chunked",
            "clipforge.losses:ChunkedClipLoss",
            "InfoNCE in square tiles: same value and gradients, never holds B x B",
            {"chunk_size": 1024, **_GATHER},
        ),
        LossSpec(
            "multipos",
            "clipforge.objectives.multipos:MultiPositiveLoss",
            "InfoNCE whose positives are all items with the query's group id; hard negatives in the "
            "image->text denominator; chunked when chunk_size is set",
            {"positives": "mean", "chunk_size": None, **_GATHER},
            inputs=("ids", "hard_negatives"),
        ),
        LossSpec(
            "siglip",
            "clipforge.objectives.siglip:SigLip",
            "pairwise sigmoid loss with learned bias; across ranks by neighbour exchange (default) or gather",
            {"siglip_exchange": "neighbour", "gather_with_grad": True},
            inputs=("ids",),
            needs_bias=True,
            renames={"siglip_exchange": "exchange"},
        ),
        LossSpec(
            "triplet",
            "clipforge.objectives.pairwise:TripletLoss",
            "relu(margin + s(a,n) - s(a,p)) on cosine similarity, negatives mined in the batch",
            {"margin": 0.2, "mining": "hardest", "gather_with_grad": True},
            inputs=("ids",),
        ),
        LossSpec(
            "ntxent",
            "clipforge.objectives.pairwise:NTXentLoss",
            "SimCLR's NT-Xent over images and texts together (same-side items are negatives too)",
            {"gather_with_grad": True},
            inputs=("ids",),
        ),
        LossSpec(
            "bce",
            "clipforge.objectives.pairwise:ContrastiveBCELoss",
            "binary cross-entropy of sigmoid(scale*s + bias) vs [same id], mean over all pairs",
            {"pos_weight": 1.0, "gather_with_grad": True},
            inputs=("ids",),
        ),
        LossSpec(
            "coca",
            "clipforge.objectives.coca:CoCaLoss",
            "CoCa: contrastive InfoNCE plus caption cross-entropy (open_clip's CoCaLoss; needs a CoCa model)",
            {"coca_caption_loss_weight": 2.0, "coca_contrastive_loss_weight": 1.0, **_GATHER},
            inputs=("caption_nll", "caption_tokens"),
            renames={
                "coca_caption_loss_weight": "caption_loss_weight",
                "coca_contrastive_loss_weight": "clip_loss_weight",
            },
        ),
    )
}

LOSS_NAMES = tuple(LOSSES)
LOSS_OPTIONS = tuple(dict.fromkeys(o for spec in LOSSES.values() for o in spec.options))


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def takers(option: str) -> list[str]:
    return [name for name, spec in LOSSES.items() if option in spec.options]


def get_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")
    return LOSSES[name]


def resolve_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The loss's options: its defaults, overridden by the given (non-None) values.

    An option the loss does not declare is a :class:`ConfigError` naming the flag and the losses
    that do take it.
    """
    spec = get_spec(name)
    given = {k: v for k, v in given.items() if v is not None}
    for option in given:
        if option not in spec.options:
            who = takers(option)
            where = f"it is an option of {', '.join(repr(w) for w in who)}" if who else "no loss takes it"
            raise ConfigError(
                f"{flag(option)} is not an option of --loss {name} ({where}); options of {name!r}: "
                f"{', '.join(flag(o) for o in spec.options) or 'none'}"
            )
    return {**spec.options, **given}


def build(name: str, given: dict[str, Any] | None = None, *, rank: int = 0, world_size: int = 1) -> Any:
    """Instantiate loss ``name`` with its resolved options and the distributed placement."""
    spec = get_spec(name)
    options = resolve_options(name, given or {})
    module, _, cls = spec.target.partition(":")
    loss_cls = getattr(importlib.import_module(module), cls)
    kwargs = {spec.renames.get(k, k): v for k, v in options.items()}
    return loss_cls(rank=rank, world_size=world_size, **kwargs)


def describe() -> list[tuple[str, str, str]]:
    """``(name, options with defaults, summary)`` rows, for docs and ``--help``."""
    rows = []
    for spec in LOSSES.values():
        opts = ", ".join(f"{flag(k)} {v}" for k, v in spec.options.items())
        rows.append((spec.name, opts, spec.summary))
    return rows
