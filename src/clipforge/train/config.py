"""Typed run configuration for training.

Every field of :class:`TrainConfig` is a CLI flag (``--batch-size`` for ``batch_size``) and a key of a
YAML/JSON run config. One dataclass feeds the parser, the file loader and the effective config
saved next to the checkpoints, so the three can never drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
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
LOSSES = LOSS_NAMES  # the objective registry's names (clipforge.objectives.registry)
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")

#: What every run config held before the objective registry (up to 3f1f61e), whatever its loss:
#: these options were plain fields with these defaults, so each saved ``run_config.yaml`` (and each
#: checkpoint's config) has them. For a loss that does not take one, that value means "not given".
LEGACY_LOSS_DEFAULTS: dict[str, Any] = {"chunk_size": 1024, "local_loss": False, "gather_with_grad": True}

log = logging.getLogger(__name__)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs; the saved copy of it reproduces the run."""

    # --- what to train on and what to train -------------------------------------------------------
    data: str | None = _f(
        None, "training data spec: table (csv/tsv/json/jsonl/parquet), folder, shards or synthetic:shapes"
    )
    val_data: str | None = _f(None, "validation data spec for retrieval (and zero-shot if it has classes)")
    model: str | None = _f(
        None,
        "architecture: a registered name (see `clipforge models`) or a model-config JSON file (clipforge's "
        "or open_clip's); default: the --pretrained checkpoint's own, else tiny-vit. The resolved config "
        "is saved as OUTPUT_DIR/model_config.json",
    )
    pretrained: str | None = _f(None, "initial weights: a file, a clipforge dir or hf-hub:org/name")
    output_dir: str = _f("./runs/clipforge", "where checkpoints, logs and the final model go")
    # --- length and batch -------------------------------------------------------------------------
    epochs: int = _f(1, "passes over the data (an epoch is `steps_per_epoch` steps for endless sources)")
    max_steps: int | None = _f(None, "stop after this many optimiser steps (overrides epochs)")
    steps_per_epoch: int | None = _f(None, "optimiser steps per epoch for sources without a length")
    batch_size: int = _f(64, "samples per micro-batch per process")
    accum_steps: int = _f(1, "micro-batches per optimiser step (features are cached: all negatives seen)")
    workers: int | None = _f(
        None, "data loader worker processes (default: auto, clipforge.data.workers.auto_workers)"
    )
    cache_images: bool = _f(
        False, "decode every training image once into a memory-mapped uint8 cache (clipforge.data.cache)"
    )
    cache_dir: str | None = _f(None, "where the image cache lives (default: OUTPUT_DIR/image_cache)")
    # --- optimisation -----------------------------------------------------------------------------
    lr: float = _f(5e-4, "peak learning rate")
    weight_decay: float = _f(
        0.2, "AdamW weight decay (never applied to gains, biases, embeddings, logit_scale)"
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
    precision: str = _f(
        "fp32", f"numeric precision: {', '.join(PRECISIONS)} (fp16 only on CUDA)", choices=PRECISIONS
    )
    # --- objective --------------------------------------------------------------------------------
    loss: str = _f("clip", f"contrastive loss: {', '.join(LOSSES)} (options: see each below)", choices=LOSSES)
    # Loss options: None = not given (the loss's own default); one the chosen loss lacks is an error.
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
    # --- batch composition and extra terms --------------------------------------------------------
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
    ema_decay: float | None = _f(None, "keep an exponential moving average of the weights (e.g. 0.999)")
    # --- model surgery ----------------------------------------------------------------------------
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
    grad_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    compile: bool = _f(False, "torch.compile the model")
    # --- runtime ----------------------------------------------------------------------------------
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")
    distributed: str = _f(
        "auto", f"{', '.join(DISTRIBUTED)} (auto: DDP when launched by torchrun)", choices=DISTRIBUTED
    )
    threads: int | None = _f(None, "torch intra-op threads")
    seed: int = _f(0, "seed for weights, data order and augmentation")
    deterministic: bool = _f(False, "use deterministic kernels (needed for bit-exact resume on GPU)")
    max_bad_steps: int = _f(5, "abort after this many consecutive steps with NaN/Inf loss or gradients")
    # --- checkpoints ------------------------------------------------------------------------------
    save_every_steps: int | None = _f(None, "also checkpoint every N optimiser steps")
    save_every_epochs: int = _f(1, "checkpoint every N epochs (0 = only at the end)")
    keep_last: int = _f(3, "keep the last K checkpoints")
    resume: str | None = _f(None, "'latest' or a checkpoint path to continue from")
    # --- observability ----------------------------------------------------------------------------
    log_every: int = _f(10, "write a metrics line every N steps")
    progress: bool = _f(True, "show a progress bar (rank 0)")
    tensorboard: bool = _f(False, "also log to TensorBoard in output_dir/tensorboard")
    eval_every_epochs: int = _f(0, "evaluate on val_data every N epochs (0 = only at the end if val_data)")
    zeroshot_templates: str = _f("simple", "prompt templates for zero-shot eval: simple, imagenet or a file")
    caption_key: str | None = _f(
        None, "caption column(s) of a table, comma-separated (auto-detected)", aliases=("--csv-caption-key",)
    )
    image_key: str | None = _f(None, "image column of a table (auto-detected)", aliases=("--csv-img-key",))
    csv_separator: str | None = _f(
        None, "table field separator, e.g. '\\t' (default: sniffed from the header)"
    )
    data_root: str | None = _f(None, "folder relative image paths start from (default: the table's folder)")
    confine_paths: bool = _f(False, "skip table rows whose image path resolves outside the data root")

    def __post_init__(self) -> None:
        """Old run configs keep working: see :func:`drop_legacy_loss_defaults`."""
        drop_legacy_loss_defaults(self)

    # ----------------------------------------------------------------------------------------------
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

    # ----------------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> TrainConfig:
        """Reject impossible values early, naming the key, so a run never dies after an hour."""
        positive = (
            "epochs",
            "batch_size",
            "accum_steps",
            "captions_per_image",
            "log_every",
            "keep_last",
            "max_bad_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: key {name!r} must be >= 1, got {getattr(self, name)!r}")
        for name in (
            "max_steps",
            "steps_per_epoch",
            "save_every_steps",
            "threads",
            "chunk_size",
            "hard_negatives",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{source}: key {name!r} must be >= 1 or null, got {value!r}")
        for name in (
            "warmup_steps",
            "cooldown_steps",
            "lora_rank",
            "weight_decay",
            "save_every_epochs",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{source}: key {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"{source}: key 'workers' must be >= 0 or null (auto), got {self.workers!r}")
        if self.lr <= 0:
            raise ConfigError(f"{source}: key 'lr' must be > 0, got {self.lr!r}")
        for name, allowed in (("schedule", SCHEDULES), ("precision", PRECISIONS), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{source}: key {name!r} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"{source}: key 'distributed' must be one of {list(DISTRIBUTED)}")
        if self.patch_dropout is not None and not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"{source}: key 'patch_dropout' must be in [0, 1), got {self.patch_dropout!r}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{source}: key 'ema_decay' must be in (0, 1), got {self.ema_decay!r}")
        if self.max_logit_scale <= 1.0:
            raise ConfigError(f"{source}: key 'max_logit_scale' must be > 1, got {self.max_logit_scale!r}")
        self._validate_objective(source)
        return self

    def loss_options(self) -> dict[str, Any]:
        """The loss options that were given (non-None), for the objective registry."""
        return {name: getattr(self, name) for name in LOSS_OPTIONS if getattr(self, name) is not None}

    def _validate_objective(self, source: str) -> None:
        """Options of the objective that do not fit the chosen loss or each other are errors."""
        try:
            resolve_options(self.loss, self.loss_options())
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        takes_negatives = [n for n, spec in LOSS_SPECS.items() if "hard_negatives" in spec.inputs]
        if self.hard_negative_key and self.loss not in takes_negatives:
            raise ConfigError(
                f"{source}: --hard-negative-key needs --loss {' or '.join(takes_negatives)} (got --loss {self.loss})"
            )
        pairs = (
            ("hard_negatives", "hard_negative_key"),
            ("image_ssl_weight", "image_ssl"),
            ("image_ssl_temperature", "image_ssl"),
            ("distill_pretrained", "distill_model"),
        )
        for option, needs in pairs:
            if getattr(self, option) is not None and not getattr(self, needs):
                raise ConfigError(f"{source}: {flag(option)} is given without {flag(needs)}")
        if self.image_ssl is not None and self.image_ssl != "ntxent":
            raise ConfigError(f"{source}: --image-ssl must be 'ntxent', got {self.image_ssl!r}")
        if self.distill_model and self.distill_features:
            raise ConfigError(f"{source}: give --distill-model or --distill-features, not both")
        for option in ("distill_weight", "distill_scale"):
            if getattr(self, option) is not None and not (self.distill_model or self.distill_features):
                raise ConfigError(
                    f"{source}: {flag(option)} is given without --distill-model or --distill-features"
                )
        if self.batch_size % self.captions_per_image:
            raise ConfigError(
                f"{source}: --batch-size {self.batch_size} is not a multiple of --captions-per-image "
                f"{self.captions_per_image} (an image's captions must share a micro-batch)"
            )

    # --- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, but of the loss options only the chosen loss's: a saved run config must not
        carry options its loss rejects (a later ``--loss`` override would trip over them)."""
        data = dataclasses.asdict(self)
        spec = LOSS_SPECS.get(self.loss)
        if spec is not None:
            for name in LOSS_OPTIONS:
                if name not in spec.options:
                    data.pop(name, None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping, checking each key's name and type; errors name the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
        values = {key.replace("-", "_"): value for key, value in data.items()}
        hints = _field_types()
        for key in values:
            if key not in hints:
                close = difflib.get_close_matches(key, list(hints), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        coerced = {key: coerce(value, hints[key], f"{source}: key {key!r}") for key, value in values.items()}
        return cls(**coerced).validate(source)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a YAML or JSON run config; ``overrides`` (e.g. explicit CLI flags) win."""
        data = read_run_config(path)
        data.update(overrides)
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> Path:
        """Write the effective config (YAML if the suffix says so, else JSON) atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    def replace(self, **overrides: Any) -> TrainConfig:
        return dataclasses.replace(self, **overrides).validate()


def drop_legacy_loss_defaults(cfg: TrainConfig) -> None:
    """Unset the options an old run config (or a flag) gives at their pre-registry default
    (:data:`LEGACY_LOSS_DEFAULTS`) for a loss that does not take them.

    Why here, on construction: files, flags, ``dataclasses.replace`` and the Python API all build
    a ``TrainConfig``, and each must read such a value as "not given" before validation rejects an
    option the loss lacks. Any other value is still given, so ``loss: clip`` with
    ``chunk_size: 256`` remains an error naming ``--chunk-size``. Logged at debug level only: the
    value never had an effect on that loss.
    """
    spec = LOSS_SPECS.get(cfg.loss)
    if spec is None:  # an unknown loss: validate() names it
        return
    for name, old_default in LEGACY_LOSS_DEFAULTS.items():
        value = getattr(cfg, name)
        if name in spec.options or value is None:
            continue
        if isinstance(value, bool) is isinstance(old_default, bool) and value == old_default:
            log.debug(
                "%s=%r (the default before the objective registry) is not an option of --loss %s; "
                "read as not given",
                name,
                value,
                cfg.loss,
            )
            setattr(cfg, name, None)


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


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


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

    for f in dataclasses.fields(TrainConfig):
        tp, _ = _unwrap_optional(_field_types()[f.name])
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_text = (f.metadata.get("help") or "").replace("%", "%%")  # argparse formats help with %
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = f.name.upper()
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(*flags, **kw)


def config_from_args(args: Any) -> TrainConfig:
    """Merge ``--config FILE`` with explicitly given flags (flags win)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    run_config = getattr(args, "config", None)
    if run_config:
        return TrainConfig.load(run_config, **given)
    return TrainConfig.from_dict(given, "command line")
