"""Typed run configuration for training, in nested frozen sections.

Every field is a CLI flag and a key of a YAML/JSON run config under its *flat* name
(``--batch-size`` / ``batch_size`` for ``cfg.data.batch_size``). Flat names are unique across the
sections, so an old flat run config, a nested one (``optim: {lr: 0.001}``) and the flags all map
to one field. One set of dataclasses feeds the parser, the file loader and the effective config
saved next to the checkpoints, so the three can never drift apart.

Sections: top level (``model``, ``pretrained``, ``output_dir``), ``data``, ``optim``,
``objective``, ``surgery``, ``runtime``, ``checkpoints`` and ``logging``. A built config is frozen:
derive a changed one with :meth:`TrainConfig.replace` (flat keys) or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError
from clipforge.objectives.registry import LOSS_NAMES, LOSS_OPTIONS, flag, resolve_options
from clipforge.objectives.registry import LOSSES as LOSS_SPECS

SCHEDULES = ("cosine", "const", "const-cooldown")
PRECISIONS = ("fp32", "bf16", "fp16")
WEIGHT_DECAY_GROUPS = ("clipforge", "open_clip")  # clipforge.train.optim.param_groups' rules
LOSSES = LOSS_NAMES  # the objective registry's names (clipforge.objectives.registry)
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")

#: What every run config held before the objective registry (up to 3f1f61e), whatever its loss:
#: these options were plain fields with these defaults, so each saved ``run_config.yaml`` (and each
#: checkpoint's config) has them. For a loss that does not take one, that value means "not given".
LEGACY_LOSS_DEFAULTS: dict[str, Any] = {"chunk_size": 1024, "local_loss": False, "gather_with_grad": True}

log = logging.getLogger(__name__)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text (and ``flat=`` when its flat name differs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it."""

    train: str | None = _f(
        None,
        "training data spec: table (csv/tsv/json/jsonl/parquet), folder, shards or synthetic:shapes",
        flat="data",
    )
    val: str | None = _f(
        None, "validation data spec for retrieval (and zero-shot if it has classes)", flat="val_data"
    )
    steps_per_epoch: int | None = _f(None, "optimiser steps per epoch for sources without a length")
    batch_size: int = _f(64, "samples per micro-batch per process")
    workers: int | None = _f(
        None, "data loader worker processes (default: auto, clipforge.data.workers.auto_workers)"
    )
    cache_images: bool = _f(
        False, "decode every training image once into a memory-mapped uint8 cache (clipforge.data.cache)"
    )
    cache_dir: str | None = _f(None, "where the image cache lives (default: OUTPUT_DIR/image_cache)")
    captions_per_image: int = _f(
        1, "put k captions of each image in the batch (k positives; batch size % k == 0)"
    )
    group_key: str | None = _f(
        None, "table column whose equal values are positives of each other (e.g. product id)"
    )
    hard_negative_key: str | None = _f(
        None, "table column(s) of hard-negative captions, comma-separated (needs --loss multipos)"
    )
    hard_negatives: int | None = _f(None, "hard negatives drawn per row from --hard-negative-key (default 1)")
    caption_key: str | None = _f(
        None, "caption column(s) of a table, comma-separated (auto-detected)", aliases=("--csv-caption-key",)
    )
    image_key: str | None = _f(None, "image column of a table (auto-detected)", aliases=("--csv-img-key",))
    csv_separator: str | None = _f(
        None, "table field separator, e.g. '\\t' (default: sniffed from the header)"
    )
    data_root: str | None = _f(None, "folder relative image paths start from (default: the table's folder)")
    confine_paths: bool = _f(False, "skip table rows whose image path resolves outside the data root")

    def table_kwargs(self) -> dict[str, Any]:
        """How to read tables, as ``build_dataset`` keywords (the same for train and val data)."""
        kw = {
            "image_key": self.image_key,
            "caption_key": self.caption_key,
            "separator": self.csv_separator,
            "data_root": self.data_root,
            "confine": self.confine_paths or None,
        }
        return {k: v for k, v in kw.items() if v is not None}

    def hard_negative_keys(self) -> list[str]:
        """``--hard-negative-key a,b`` as its column names."""
        return [k.strip() for k in (self.hard_negative_key or "").split(",") if k.strip()]


@dataclass(frozen=True)
class OptimConfig:
    """How long to train and how each optimiser step moves the weights."""

    epochs: int = _f(1, "passes over the data (an epoch is `steps_per_epoch` steps for endless sources)")
    max_steps: int | None = _f(None, "stop after this many optimiser steps (overrides epochs)")
    accum_steps: int = _f(1, "micro-batches per optimiser step (features are cached: all negatives seen)")
    lr: float = _f(5e-4, "peak learning rate")
    weight_decay: float = _f(
        0.2, "AdamW weight decay (never applied to gains, biases, embeddings, logit_scale)"
    )
    weight_decay_groups: str = _f(
        "clipforge",
        "what weight decay skips: clipforge (gains, biases, embedding tables, positional embeddings, "
        "logit_scale) or open_clip (open_clip_train's rule: 1-D tensors and names containing bn, ln, "
        "bias or logit_scale; embeddings are decayed)",
        choices=WEIGHT_DECAY_GROUPS,
    )
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    schedule: str = _f("cosine", f"learning-rate schedule: {', '.join(SCHEDULES)}", choices=SCHEDULES)
    warmup_steps: int = _f(0, "linear warm-up steps")
    cooldown_steps: int = _f(0, "final cool-down steps for const-cooldown")
    cooldown_power: float = _f(1.0, "cool-down shape exponent (1 = linear)")
    min_lr: float = _f(0.0, "learning rate at the end of cosine / cool-down")
    grad_clip_norm: float | None = _f(None, "clip gradients to this global L2 norm")
    ema_decay: float | None = _f(None, "keep an exponential moving average of the weights (e.g. 0.999)")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss, its options (None = not given: the loss's own default) and the extra terms."""

    loss: str = _f("clip", f"contrastive loss: {', '.join(LOSSES)} (options: see each below)", choices=LOSSES)
    chunk_size: int | None = _f(
        None, "[chunked 1024, multipos: off] tile size: the B x B logits are never built"
    )
    local_loss: bool | None = _f(
        None, "[clip, chunked, multipos] each rank computes its own rows only (saves memory)"
    )
    gather_with_grad: bool | None = _f(
        None, "[all but siglip-neighbour] all-gather features with gradients (exact full-batch gradients)"
    )
    positives: str | None = _f(
        None, "[multipos] normalise each row over its positives: mean (default) or lse"
    )
    margin: float | None = _f(None, "[triplet] margin on cosine similarity (default 0.2)")
    mining: str | None = _f(None, "[triplet] in-batch negative: hardest (default) or semihard")
    siglip_exchange: str | None = _f(
        None, "[siglip] across ranks: neighbour (pass text chunks around, default) or gather"
    )
    pos_weight: float | None = _f(None, "[bce] weight of the positive pairs (default 1)")
    coca_caption_loss_weight: float | None = _f(
        None, "[coca] weight of the caption cross-entropy (default 2)"
    )
    coca_contrastive_loss_weight: float | None = _f(None, "[coca] weight of the contrastive loss (default 1)")
    image_ssl: str | None = _f(None, "add SLIP's image-image term over two augmented views: ntxent")
    image_ssl_weight: float | None = _f(None, "weight of the --image-ssl term (default 1)")
    image_ssl_temperature: float | None = _f(None, "temperature of the --image-ssl term (default 0.1)")
    distill_model: str | None = _f(
        None, "teacher for distillation, run on the fly: any --model clipforge loads"
    )
    distill_pretrained: str | None = _f(None, "the teacher's weights (with --distill-model)")
    distill_features: str | None = _f(
        None, "teacher features precomputed by `clipforge embed` (an embedding folder)"
    )
    distill_weight: float | None = _f(None, "weight of the distillation KL term (default 1)")
    distill_scale: float | None = _f(
        None, "teacher temperature (default: the teacher model's; 100 for features)"
    )
    max_logit_scale: float = _f(100.0, "temperature clamp: logit_scale.exp() never exceeds this")

    def __post_init__(self) -> None:
        """Old run configs keep working: see :func:`drop_legacy_loss_defaults`."""
        for name in drop_legacy_loss_defaults(self):
            object.__setattr__(self, name, None)  # still being built: frozen from here on

    def loss_options(self) -> dict[str, Any]:
        """The loss options that were given (non-None), for the objective registry."""
        return {name: getattr(self, name) for name in LOSS_OPTIONS if getattr(self, name) is not None}

    @property
    def distilling(self) -> bool:
        return bool(self.distill_model or self.distill_features)


@dataclass(frozen=True)
class SurgeryConfig:
    """What of the model trains: locked towers, LoRA adapters, patch dropout, alpha handling."""

    lock_image: bool = _f(False, "freeze the image tower (LiT)")
    lock_image_unlocked_groups: int = _f(0, "leave the last N groups of the locked image tower trainable")
    lock_image_freeze_bn_stats: bool = _f(False, "freeze BatchNorm statistics of a locked ResNet tower")
    lock_text: bool = _f(False, "freeze the text tower")
    lock_text_unlocked_layers: int = _f(0, "leave the last N layers of the locked text tower trainable")
    lora_rank: int = _f(0, "train LoRA adapters of this rank instead of the full model (0 = off)")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list[str] = _f(["in_proj", "out_proj", "c_fc", "c_proj"], "module names that get adapters")
    patch_dropout: float | None = _f(None, "drop this fraction of image patches while training (ViT)")
    image_alpha: str | None = _f(
        None,
        "transparent pixels: 'drop', 'composite' or 'composite:#RRGGBB' (default: the pretrained weights' "
        "convention; from scratch: composite on white). Saved with the trained model",
    )
    naflex: bool = _f(
        True,
        "train at native aspect ratio where the weights' preprocessing is NaFlex (a Siglip2Model folder "
        "with a Siglip2ImageProcessor, a checkpoint saved with naflex_max_patches); --no-naflex: at the "
        "model's fixed square size",
    )


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes: device, processes, precision, threads, seeds, kernels."""

    precision: str = _f(
        "fp32", f"numeric precision: {', '.join(PRECISIONS)} (fp16 only on CUDA)", choices=PRECISIONS
    )
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    distributed: str = _f(
        "auto", f"{', '.join(DISTRIBUTED)} (auto: DDP when launched by torchrun)", choices=DISTRIBUTED
    )
    threads: int | None = _f(None, "torch intra-op threads")
    seed: int = _f(0, "seed for weights, data order and augmentation")
    deterministic: bool = _f(False, "use deterministic kernels (needed for bit-exact resume on GPU)")
    max_bad_steps: int = _f(5, "abort after this many consecutive steps with NaN/Inf loss or gradients")


@dataclass(frozen=True)
class CheckpointConfig:
    """When training checkpoints are written and which one a run continues from."""

    save_every_steps: int | None = _f(None, "also checkpoint every N optimiser steps")
    save_every_epochs: int = _f(1, "checkpoint every N epochs (0 = only at the end)")
    keep_last: int = _f(3, "keep the last K checkpoints")
    resume: str | None = _f(None, "'latest' or a checkpoint path to continue from")


@dataclass(frozen=True)
class LoggingConfig:
    """What the run reports while it trains: metrics lines, progress bar, TensorBoard, evaluation."""

    log_every: int = _f(10, "write a metrics line every N steps")
    progress: bool = _f(True, "show a progress bar (rank 0)")
    tensorboard: bool = _f(False, "also log to TensorBoard in output_dir/tensorboard")
    eval_every_epochs: int = _f(0, "evaluate on val_data every N epochs (0 = only at the end if val_data)")
    zeroshot_templates: str = _f("simple", "prompt templates for zero-shot eval: simple, imagenet or a file")


#: The sections of a :class:`TrainConfig`, by attribute name (also their key in a nested config).
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "objective": ObjectiveConfig,
    "surgery": SurgeryConfig,
    "runtime": RuntimeConfig,
    "checkpoints": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; the saved copy of it reproduces the run.

    Build it nested (``TrainConfig(optim=OptimConfig(lr=1e-3))``), from flat keys
    (:meth:`from_flat`, as the CLI and old run configs spell them) or from a file (:meth:`load`).
    """

    model: str | None = _f(
        None,
        "architecture: a registered name (see `clipforge models`) or a model-config JSON file (clipforge's "
        "or open_clip's); default: the --pretrained checkpoint's own, else tiny-vit. The resolved config "
        "is saved as OUTPUT_DIR/model_config.json",
    )
    pretrained: str | None = _f(None, "initial weights: a file, a clipforge dir or hf-hub:org/name")
    output_dir: str = _f("./runs/clipforge", "where checkpoints, logs and the final model go")
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """A flat value in a section's place (``TrainConfig(data="x.csv")``) fails here, not mid-run."""
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"TrainConfig({name}=...) takes a {cls.__name__}, got {getattr(self, name)!r}; "
                    "for flat keys (data='x.csv', lr=1e-3) use TrainConfig.from_flat(...)"
                )

    # --- flat keys --------------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, **values: Any) -> TrainConfig:
        """Build from flat keywords (``batch_size=8``), as flags and old configs name them; not validated."""
        unknown = [key for key in values if key not in _FLAT]
        if unknown:
            raise ConfigError(_unknown_key_message(unknown[0], "TrainConfig.from_flat"))
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            section, name = _FLAT[key]
            (top if section is None else sections[section])[name] = value
        return cls(**top, **{name: SECTIONS[name](**kw) for name, kw in sections.items()})

    def flat(self) -> dict[str, Any]:
        """Every field under its flat name, in the order the flags and saved run configs list them."""
        out = {}
        for key in _FLAT_ORDER:
            section, name = _FLAT[key]
            value = getattr(self if section is None else getattr(self, section), name)
            out[key] = list(value) if isinstance(value, list) else value
        return out

    def replace(self, **overrides: Any) -> TrainConfig:
        """A validated copy with some flat keys changed (``cfg.replace(max_steps=2)``)."""
        return TrainConfig.from_flat(**{**self.flat(), **overrides}).validate()

    def loss_options(self) -> dict[str, Any]:
        """The loss options that were given (non-None), for the objective registry."""
        return self.objective.loss_options()

    # --- validation -------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> TrainConfig:
        """Reject impossible values early, naming the key, so a run never dies after an hour."""
        values = self.flat()
        _check_ranges(values, source)
        _check_choices(values, source)
        _check_objective(values, source)
        return self

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self, nested: bool = False) -> dict[str, Any]:
        """Every field (flat keys, as saved run configs and checkpoints hold them; or by section), but
        of the loss options only the chosen loss's: a saved run config must not carry options its loss
        rejects (a later ``--loss`` override would trip over them)."""
        spec = LOSS_SPECS.get(self.objective.loss)
        foreign = {n for n in LOSS_OPTIONS if n not in spec.options} if spec is not None else set()
        data = {key: value for key, value in self.flat().items() if key not in foreign}
        return nest(data) if nested else data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a flat or nested mapping, checking each key's name and type; errors name the key."""
        values = flatten(data, source)
        hints = _field_types()
        coerced = {key: coerce(value, hints[key], f"{source}: key {key!r}") for key, value in values.items()}
        return cls.from_flat(**coerced).validate(source)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML or JSON run config (flat or nested); flat ``overrides`` (explicit CLI flags) win."""
        data = flatten(read_run_config(path), str(path))
        data.update(overrides)
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path, nested: bool = False) -> Path:
        """Write the effective config (YAML if the suffix says so, else JSON) atomically."""
        from clipforge.atomic import atomic_write_text

        path = Path(path)
        data = self.to_dict(nested=nested)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        else:
            text = json.dumps(data, indent=2) + "\n"
        atomic_write_text(path, text)
        return path


#: Flat keys in the order of the flat dataclass this module held before the sections (the CLI's
#: ``--help`` and every saved ``run_config.yaml`` list them so; a test checks it covers every field).
_FLAT_ORDER = (
    "data", "val_data", "model", "pretrained", "output_dir",
    "epochs", "max_steps", "steps_per_epoch", "batch_size", "accum_steps", "workers", "cache_images",
    "cache_dir",
    "lr", "weight_decay", "weight_decay_groups", "beta1", "beta2", "eps", "schedule", "warmup_steps", "cooldown_steps",
    "cooldown_power", "min_lr", "grad_clip_norm", "precision",
    "loss", "chunk_size", "local_loss", "gather_with_grad", "positives", "margin", "mining",
    "siglip_exchange", "pos_weight", "coca_caption_loss_weight", "coca_contrastive_loss_weight",
    "captions_per_image", "group_key", "hard_negative_key", "hard_negatives", "image_ssl",
    "image_ssl_weight", "image_ssl_temperature", "distill_model", "distill_pretrained",
    "distill_features", "distill_weight", "distill_scale", "max_logit_scale", "ema_decay",
    "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats", "lock_text",
    "lock_text_unlocked_layers", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
    "patch_dropout", "image_alpha", "naflex", "grad_checkpointing", "compile",
    "device", "distributed", "threads", "seed", "deterministic", "max_bad_steps",
    "save_every_steps", "save_every_epochs", "keep_last", "resume",
    "log_every", "progress", "tensorboard", "eval_every_epochs", "zeroshot_templates", "caption_key",
    "image_key", "csv_separator", "data_root", "confine_paths",
)  # fmt: skip


def _index() -> tuple[dict[str, tuple[str | None, str]], dict[str, dataclasses.Field]]:
    """Flat key -> (section or None for the top level, field name), and flat key -> its field."""
    where: dict[str, tuple[str | None, str]] = {}
    fields: dict[str, dataclasses.Field] = {}
    holders = [(None, TrainConfig), *SECTIONS.items()]
    for section, cls in holders:
        for f in dataclasses.fields(cls):
            if section is None and f.name in SECTIONS:
                continue
            key = f.metadata.get("flat", f.name)
            if key in where:  # pragma: no cover - a programming error caught at import
                raise AssertionError(f"flat key {key!r} is defined twice")
            where[key], fields[key] = (section, f.name), f
    if set(where) != set(_FLAT_ORDER):  # pragma: no cover - a programming error caught at import
        raise AssertionError(f"_FLAT_ORDER out of date: {sorted(set(where) ^ set(_FLAT_ORDER))}")
    return where, fields


_FLAT, _FIELDS = _index()


def section_of(key: str) -> str | None:
    """The section a flat key lives in (None: the top level); KeyError for an unknown key."""
    return _FLAT[key][0]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat keys -> the nested form (top-level keys, then one mapping per section, by field name)."""
    out: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = _FLAT[key]
        if section is None:
            out[name] = value
        else:
            sections.setdefault(section, {})[name] = value
    return {**out, **{name: sections[name] for name in SECTIONS if name in sections}}


def flatten(data: Any, source: str = "config") -> dict[str, Any]:
    """A flat or nested run config (or a mix) as flat keys; unknown or repeated keys name the file.

    ``data`` is both a section and the flat key of the training data: a mapping there is the
    section, anything else the data spec.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        if key in SECTIONS and (isinstance(value, dict) or key != "data"):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping of keys, got {value!r}")
            pairs = [(_section_key(key, str(k).replace("-", "_"), source), v) for k, v in value.items()]
        elif key in _FLAT:
            pairs = [(key, value)]
        else:
            raise ConfigError(f"{source}: {_unknown_key_message(key)}")
        for flat_key, v in pairs:
            if flat_key in flat:
                raise ConfigError(f"{source}: key {flat_key!r} is given twice (flat and in its section)")
            flat[flat_key] = v
    return flat


def _section_key(section: str, name: str, source: str) -> str:
    """The flat key of ``name`` inside ``section`` (its field name, or its flat name)."""
    for key, (where, field_name) in _FLAT.items():
        if where == section and name in (field_name, key):
            return key
    home = _FLAT[name][0] if name in _FLAT else None
    if name in _FLAT:
        hint = f" (it belongs {'at the top level' if home is None else f'in {home!r}'})"
    else:
        names = [f for (s, f) in _FLAT.values() if s == section]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{source}: unknown key {section + '.' + name!r}{hint}")


def _unknown_key_message(key: str, where: str | None = None) -> str:
    close = difflib.get_close_matches(key, [*_FLAT, *SECTIONS], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where + ': ' if where else ''}unknown key {key!r}{hint}"


# --- validation (on flat keys: the messages name what the user typed) ----------------------------
_AT_LEAST_ONE = ("epochs", "batch_size", "accum_steps", "captions_per_image", "log_every", "keep_last")
_AT_LEAST_ONE_OR_NULL = (
    "max_steps",
    "steps_per_epoch",
    "save_every_steps",
    "threads",
    "chunk_size",
    "hard_negatives",
)
_NOT_NEGATIVE = ("warmup_steps", "cooldown_steps", "lora_rank", "weight_decay", "save_every_epochs")


def _check_ranges(v: dict[str, Any], source: str) -> None:
    for name in (*_AT_LEAST_ONE, "max_bad_steps"):
        if v[name] < 1:
            raise ConfigError(f"{source}: key {name!r} must be >= 1, got {v[name]!r}")
    for name in _AT_LEAST_ONE_OR_NULL:
        if v[name] is not None and v[name] < 1:
            raise ConfigError(f"{source}: key {name!r} must be >= 1 or null, got {v[name]!r}")
    for name in _NOT_NEGATIVE:
        if v[name] < 0:
            raise ConfigError(f"{source}: key {name!r} must be >= 0, got {v[name]!r}")
    if v["workers"] is not None and v["workers"] < 0:
        raise ConfigError(f"{source}: key 'workers' must be >= 0 or null (auto), got {v['workers']!r}")
    if v["lr"] <= 0:
        raise ConfigError(f"{source}: key 'lr' must be > 0, got {v['lr']!r}")
    if v["patch_dropout"] is not None and not 0.0 <= v["patch_dropout"] < 1.0:
        raise ConfigError(f"{source}: key 'patch_dropout' must be in [0, 1), got {v['patch_dropout']!r}")
    if v["ema_decay"] is not None and not 0.0 < v["ema_decay"] < 1.0:
        raise ConfigError(f"{source}: key 'ema_decay' must be in (0, 1), got {v['ema_decay']!r}")
    if v["max_logit_scale"] <= 1.0:
        raise ConfigError(f"{source}: key 'max_logit_scale' must be > 1, got {v['max_logit_scale']!r}")


def _check_choices(v: dict[str, Any], source: str) -> None:
    for name, allowed in (
        ("schedule", SCHEDULES),
        ("precision", PRECISIONS),
        ("loss", LOSSES),
        ("weight_decay_groups", WEIGHT_DECAY_GROUPS),
    ):
        if v[name] not in allowed:
            raise ConfigError(f"{source}: key {name!r} must be one of {list(allowed)}, got {v[name]!r}")
    if v["distributed"] not in DISTRIBUTED:
        raise ConfigError(f"{source}: key 'distributed' must be one of {list(DISTRIBUTED)}")


def _check_objective(v: dict[str, Any], source: str) -> None:
    """Options of the objective that do not fit the chosen loss or each other are errors."""
    try:
        resolve_options(v["loss"], {name: v[name] for name in LOSS_OPTIONS if v[name] is not None})
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    takes_negatives = [n for n, spec in LOSS_SPECS.items() if "hard_negatives" in spec.inputs]
    if v["hard_negative_key"] and v["loss"] not in takes_negatives:
        raise ConfigError(
            f"{source}: --hard-negative-key needs --loss {' or '.join(takes_negatives)} (got --loss {v['loss']})"
        )
    pairs = (
        ("hard_negatives", "hard_negative_key"),
        ("image_ssl_weight", "image_ssl"),
        ("image_ssl_temperature", "image_ssl"),
        ("distill_pretrained", "distill_model"),
    )
    for option, needs in pairs:
        if v[option] is not None and not v[needs]:
            raise ConfigError(f"{source}: {flag(option)} is given without {flag(needs)}")
    if v["image_ssl"] is not None and v["image_ssl"] != "ntxent":
        raise ConfigError(f"{source}: --image-ssl must be 'ntxent', got {v['image_ssl']!r}")
    if v["distill_model"] and v["distill_features"]:
        raise ConfigError(f"{source}: give --distill-model or --distill-features, not both")
    for option in ("distill_weight", "distill_scale"):
        if v[option] is not None and not (v["distill_model"] or v["distill_features"]):
            raise ConfigError(
                f"{source}: {flag(option)} is given without --distill-model or --distill-features"
            )
    if v["batch_size"] % v["captions_per_image"]:
        raise ConfigError(
            f"{source}: --batch-size {v['batch_size']} is not a multiple of --captions-per-image "
            f"{v['captions_per_image']} (an image's captions must share a micro-batch)"
        )


def drop_legacy_loss_defaults(objective: ObjectiveConfig) -> list[str]:
    """The options an old run config (or a flag) gives at their pre-registry default
    (:data:`LEGACY_LOSS_DEFAULTS`) for a loss that does not take them: to be read as not given.

    Why on construction: files, flags, ``replace`` and the Python API all build an
    :class:`ObjectiveConfig`, and each must read such a value as "not given" before validation
    rejects an option the loss lacks. Any other value is still given, so ``loss: clip`` with
    ``chunk_size: 256`` remains an error naming ``--chunk-size``. Logged at debug level only: the
    value never had an effect on that loss.
    """
    spec = LOSS_SPECS.get(objective.loss)
    if spec is None:  # an unknown loss: validate() names it
        return []
    dropped = []
    for name, old_default in LEGACY_LOSS_DEFAULTS.items():
        value = getattr(objective, name)
        if name in spec.options or value is None:
            continue
        if isinstance(value, bool) is isinstance(old_default, bool) and value == old_default:
            log.debug(
                "%s=%r (the default before the objective registry) is not an option of --loss %s; "
                "read as not given",
                name,
                value,
                objective.loss,
            )
            dropped.append(name)
    return dropped


def read_run_config(path: str | Path) -> dict[str, Any]:
    """Parse a YAML/JSON file into a dict, with line numbers in syntax errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a run config must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


@functools.cache
def _field_types() -> dict[str, Any]:
    """Flat key -> the field's resolved type (the annotations are strings under ``__future__``)."""
    hints = {None: typing.get_type_hints(TrainConfig)}
    hints.update({name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()})
    return {key: hints[section][name] for key, (section, name) in _FLAT.items()}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/JSON/CLI value to the field's type, or say which key and what was expected."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} expects a list, got {value!r}")
        return [coerce(v, typing.get_args(base)[0], where) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where} expects true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where} expects an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} expects an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} expects a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} expects a string, got {value!r}")
        return str(value)
    return value


def add_arguments(parser: Any) -> None:
    """One ``--flag`` per field; defaults are suppressed so only flags the user typed override a file."""
    import argparse

    for key in _FLAT_ORDER:
        f = _FIELDS[key]
        tp, _ = _unwrap_optional(_field_types()[key])
        flags = ["--" + key.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_text = (f.metadata.get("help") or "").replace("%", "%%")  # argparse formats help with %
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = key.upper()
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(*flags, **kw)


def config_from_args(args: Any) -> TrainConfig:
    """Merge ``--config FILE`` with explicitly given flags (flags win)."""
    given = {k: v for k, v in vars(args).items() if k in _FLAT}
    run_config = getattr(args, "config", None)
    if run_config:
        return TrainConfig.load(run_config, **given)
    return TrainConfig.from_dict(given, "command line")
