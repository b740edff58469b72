"""Hugging Face text encoders as CLIP text towers (open_clip's ``HFTextEncoder`` layout).

Module names follow open_clip's adapter (``transformer`` = the Hugging Face encoder, ``proj`` =
the projection into the joint space), so open_clip checkpoints of such models load with their
own keys (``text.transformer.*``, ``text.proj.*``). Only the architecture comes from
``hf_model_name`` (its ``config.json``); the weights come from the CLIP checkpoint.

Encoder-decoder models (mT5, NLLB/M2M100, BART-like) contribute their encoder only, built without
the decoder; the encoder's keys are what open_clip's ``AutoModel(...).encoder`` would have.
transformers is imported only when such a tower is built.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.errors import ClipforgeError, ConfigError
from clipforge.model.config import TextConfig
from clipforge.model.layers import set_requires_grad
from clipforge.model.text import TextOutput

logger = logging.getLogger(__name__)

#: Poolers (open_clip's names without ``_pooler``). ``cls`` uses the model's own pooler layer
#: (BERT's dense + tanh) when it has one, as open_clip's ``cls_pooler``; ``cls_last_hidden_state``
#: always reads the first token's last hidden state.
POOLERS = ("mean", "max", "cls", "cls_last_hidden_state")
PROJECTIONS = ("linear", "mlp", "none")
#: Attribute paths of the per-layer module lists, for ``lock(unlocked_groups=n)``.
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "encoder.block", "layers", "layer", "block", "h")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "this model's text tower needs 'transformers': pip install 'clipforge[hf]'"
        ) from None
    return transformers


def resolve_hf_config(name: str) -> Any:
    """The ``PretrainedConfig`` of ``name``: a local folder, else a hub id from the hub cache.

    Only ``config.json`` is needed. A hub id not in the cache is fetched when the hub is
    reachable; offline (or unreachable) the error says which file is missing and where the
    cache expects it, instead of a download traceback.
    """
    transformers = _transformers()
    path = Path(name).expanduser()
    if path.is_dir():
        folder = path
        if not (folder / "config.json").is_file():
            raise ConfigError(f"text.hf_model_name={name!r}: the folder has no config.json")
    elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ConfigError(f"text.hf_model_name={name!r}: no such folder (nor a hub id 'org/name')")
    else:
        folder = _hub_config_folder(name)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:  # unknown model_type, remote code, bad JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"text.hf_model_name={name!r}: cannot read {folder / 'config.json'}: {first}"
        ) from None


def _hub_config_folder(repo_id: str) -> Path:
    """Snapshot folder holding ``repo_id``'s config.json (cache first, see model.hub_files)."""
    from clipforge.model.hub_files import hub_file

    try:
        return hub_file(repo_id, "config.json").parent
    except ClipforgeError as e:
        raise ConfigError(f"text.hf_model_name={repo_id!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - invalid repo ids are huggingface_hub validation errors
        raise ConfigError(f"text.hf_model_name={repo_id!r}: {type(e).__name__}: {e}") from None


def build_hf_encoder(config: Any, with_pooler: bool) -> nn.Module:
    """The encoder of ``config``, randomly initialised: the model itself, or the encoder half of
    an encoder-decoder (built without its decoder where transformers has a class for that)."""
    transformers = _transformers()
    if getattr(config, "is_encoder_decoder", False):
        return _encoder_of(transformers, config)
    try:
        model_cls = transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(f"transformers has no model class for model_type {config.model_type!r}") from None
    params = inspect.signature(model_cls.__init__).parameters
    kwargs = {"add_pooling_layer": with_pooler} if "add_pooling_layer" in params else {}
    return model_cls(config, **kwargs)


def _encoder_of(transformers: Any, config: Any) -> nn.Module:
    """mT5/T5/UMT5: ``*EncoderModel.encoder``; M2M100/NLLB/BART: the module's ``*Encoder`` class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    name = MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(config.model_type)
    if name is not None and hasattr(transformers, name):
        return getattr(transformers, name)(config).encoder
    model_cls = transformers.AutoModel._model_mapping.get(type(config), None)
    if model_cls is not None:
        module = inspect.getmodule(model_cls)
        encoder_cls = getattr(module, model_cls.__name__.removesuffix("Model") + "Encoder", None)
        if encoder_cls is not None and len(inspect.signature(encoder_cls.__init__).parameters) >= 2:
            try:
                return encoder_cls(config)
            except TypeError:
                pass
        return model_cls(config).get_encoder()
    raise ConfigError(f"transformers has no encoder class for model_type {config.model_type!r}")


def _width(config: Any) -> int:
    for attr in ("hidden_size", "d_model", "dim", "n_embd"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the hidden width of Hugging Face model_type {config.model_type!r}")


def build_projection(kind: str, width: int, embed_dim: int, bias: bool) -> nn.Module:
    """open_clip's HF projections: ``linear``, ``mlp`` (Linear-GELU-Linear through the mean
    width) or ``none`` (identity; the encoder width must already be ``embed_dim``)."""
    if kind == "linear":
        return nn.Linear(width, embed_dim, bias=bias)
    if kind == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(
            nn.Linear(width, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, embed_dim, bias=bias)
        )
    if kind == "none":
        if width != embed_dim:
            raise ConfigError(
                f"text.hf_proj_type='none' needs the encoder width ({width}) == embed_dim ({embed_dim})"
            )
        return nn.Identity()
    raise ConfigError(f"text.hf_proj_type must be one of {list(PROJECTIONS)}, got {kind!r}")


class HFTextTower(nn.Module):
    """Hugging Face encoder + pooler + projection (architecture from ``hf_model_name``)."""

    def __init__(self, cfg: TextConfig, embed_dim: int) -> None:
        super().__init__()
        if cfg.hf_pooler_type not in POOLERS:
            raise ConfigError(
                f"text.hf_pooler_type must be one of {list(POOLERS)}, got {cfg.hf_pooler_type!r}"
            )
        config = resolve_hf_config(cfg.hf_model_name)
        self.pooler_type = cfg.hf_pooler_type
        # open_clip adds BERT's pooler layer only for its "cls_pooler"; its keys follow from that.
        self.transformer = build_hf_encoder(config, with_pooler=self.pooler_type == "cls")
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = cfg.pad_id if pad is None else int(pad)
        self.width = _width(config)
        self.proj = build_projection(cfg.hf_proj_type, self.width, embed_dim, cfg.proj_bias)
        self.context_length = cfg.context_length
        self.vocab_size = getattr(config, "vocab_size", cfg.vocab_size)
        self.output_dim = embed_dim

    def _pool(self, out: Any, mask: torch.Tensor) -> torch.Tensor:
        hidden = out.last_hidden_state
        if self.pooler_type == "cls":
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else hidden[:, 0]
        if self.pooler_type == "cls_last_hidden_state":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooler_type == "max":  # padding never wins (open_clip 3.3's max pooler cannot run)
            return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)

    def _run(self, tokens: torch.Tensor, hidden_states: bool) -> tuple[Any, torch.Tensor]:
        mask = (tokens != self.pad_id).long()
        out = self.transformer(input_ids=tokens, attention_mask=mask, output_hidden_states=hidden_states)
        return out, mask

    def forward_hidden(self, tokens: torch.Tensor, pad_to_context: bool = False) -> TextOutput:
        """Pooled features and every layer's token states (``pad_to_context`` is accepted for the
        tower contract; the encoder masks padding, so the given length is what runs)."""
        out, mask = self._run(tokens, hidden_states=True)
        hidden = list(out.hidden_states)
        pooled = self.proj(self._pool(out, mask))
        penultimate = hidden[-2] if len(hidden) > 1 else hidden[-1]
        return TextOutput(
            pooled=pooled, last_hidden=out.last_hidden_state, hidden_states=hidden, penultimate=penultimate
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, mask = self._run(tokens, hidden_states=False)
        return self.proj(self._pool(out, mask))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.transformer.gradient_checkpointing_enable()
        else:
            self.transformer.gradient_checkpointing_disable()

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the encoder except its last ``unlocked_groups`` layers; the projection stays trainable."""
        set_requires_grad(self.transformer, False)
        layers = _encoder_layers(self.transformer)
        if unlocked_groups and layers is not None:
            set_requires_grad(list(layers[-unlocked_groups:]), True)

    def no_weight_decay(self) -> set[str]:
        return set()


def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The encoder's list of layers (BERT ``encoder.layer``, M2M100 ``layers``, T5 ``block``, GPT ``h``)."""
    for path in _LAYER_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    return None
