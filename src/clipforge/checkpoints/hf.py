"""Hugging Face ``transformers.CLIPModel`` folders <-> clipforge.

The math is the same CLIP; only the names differ, plus three layout choices:
1. HF keeps separate ``q_proj``/``k_proj``/``v_proj``; clipforge fuses them into one ``in_proj``
   (concatenated in q, k, v order along the output dimension, as ``nn.MultiheadAttention`` does).
2. HF projections are ``nn.Linear`` (``[embed, width]``); clipforge's are matrices applied as
   ``x @ proj`` (``[width, embed]``), so they are transposed.
3. HF calls the pre-transformer LayerNorm ``pre_layrnorm`` (sic).
HF has no modified ResNet, LayerScale, logit bias or projection bias, so such models cannot be
exported to this format; we say so rather than write a folder that silently differs.

``transformers`` is not needed to read or write these folders.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from clipforge.atomic import atomic_write_text
from clipforge.checkpoints.io import load_safetensors, safe_torch_load, save_safetensors
from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Index files ``save_pretrained`` writes when it splits large weights into shards.
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_CLIP_EOT_ID = 49407

# Per-block renames (HF suffix -> clipforge suffix), shared by both towers.
_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
# Whole-key renames outside the blocks.
_ROOT = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text.text_projection"}
_TOWERS = {"vision_model": "visual", "text_model": "text"}
_HF_BLOCK_RE = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CF_BLOCK_RE = re.compile(r"^(visual|text)\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


# --- state dicts ----------------------------------------------------------------------------------
def hf_to_clipforge(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a ``CLIPModel`` state dict to clipforge names, fusing q/k/v and transposing projections."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a persistent buffer in old transformers versions; clipforge computes it
        if key in _ROOT:
            out[_ROOT[key]] = value.reshape(()) if key == "logit_scale" else value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _HF_BLOCK_RE.match(key)
        if m is None:
            raise CheckpointError(f"unexpected key {key!r} in a Hugging Face CLIPModel state dict")
        tower, idx, name, kind = m.groups()
        prefix = f"{_TOWERS[tower]}.transformer.resblocks.{idx}."
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((prefix, kind, ""), {})[name[10]] = value
        elif name in _BLOCK:
            out[f"{prefix}{_BLOCK[name]}.{kind}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Hugging Face CLIPModel state dict")
    for (prefix, kind, _), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(
                f"{prefix}attn: Hugging Face checkpoint lacks {', '.join(missing)}_proj.{kind}"
            )
        out[f"{prefix}attn.in_proj.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def clipforge_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_clipforge`; refuses weights HF's ``CLIPModel`` has no place for."""
    root = {v: k for k, v in _ROOT.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in root:
            out[root[key]] = value
            continue
        if key in transposed:
            out[transposed[key]] = value.t().contiguous()
            continue
        m = _CF_BLOCK_RE.match(key)
        name = m.group(3) if m else None
        if m is None or (name not in block and name != "attn.in_proj"):
            raise ConfigError(
                f"{key!r} has no equivalent in Hugging Face CLIPModel (it supports ViT image towers without "
                "LayerScale, logit bias or projection bias); save in clipforge or open_clip format instead"
            )
        tower, idx, _, kind = m.groups()
        prefix = f"{towers[tower]}.encoder.layers.{idx}."
        if name == "attn.in_proj":
            q, k, v = value.chunk(3, dim=0)
            for part, tensor in zip("qkv", (q, k, v)):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = tensor.contiguous()
        else:
            out[f"{prefix}{block[name]}.{kind}"] = value
    return out


# --- configs --------------------------------------------------------------------------------------
def mlp_ratio_of(width: int, hidden: int) -> float:
    """An mlp_ratio with ``int(width * ratio) == hidden`` despite float rounding."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def config_from_hf(data: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
    """A ``CLIPConfig`` from a transformers ``CLIPConfig`` dict (``config.json``); Siglip(2) dicts
    are read by :func:`clipforge.checkpoints.hf_siglip.config_from_hf_siglip` (which builds on this
    module, so callers that take either dispatch with ``hf_siglip.siglip_kind``)."""
    if data.get("model_type") not in (None, "clip"):
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not a CLIP model")
    v = dict(data.get("vision_config") or {})
    t = dict(data.get("text_config") or {})
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) > 1:
        raise CheckpointError(f"{source}: image and text towers use different activations {sorted(acts)}")
    act = acts.pop()
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{source}: activation {act!r} is not supported (quick_gelu or gelu)")
    v_width, t_width = v.get("hidden_size", 768), t.get("hidden_size", 512)
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        width=v_width,
        layers=v.get("num_hidden_layers", 12),
        head_width=v_width // v.get("num_attention_heads", 12),
        mlp_ratio=mlp_ratio_of(v_width, v.get("intermediate_size", 3072)),
    )
    text = TextConfig(
        context_length=t.get("max_position_embeddings", 77),
        vocab_size=t.get("vocab_size", 49408),
        width=t_width,
        heads=t.get("num_attention_heads", 8),
        layers=t.get("num_hidden_layers", 12),
        mlp_ratio=mlp_ratio_of(t_width, t.get("intermediate_size", 2048)),
    )
    cfg = CLIPConfig(
        embed_dim=data.get("projection_dim", 512),
        vision=vision,
        text=text,
        quick_gelu=act == "quick_gelu",
        init_logit_scale=float(data.get("logit_scale_init_value", 2.6592)),
    )
    return cfg.validate()


def check_hf_compatible(cfg: CLIPConfig) -> None:
    v, t = cfg.vision, cfg.text
    problems = []
    if v.is_resnet or v.timm_model_name:
        problems.append("the image tower is not a ViT")
    if t.hf_model_name:
        problems.append("the text tower is a Hugging Face encoder, not CLIP's")
    if v.ls_init_value is not None or t.ls_init_value is not None:
        problems.append("LayerScale")
    if v.pool_type != "tok" or v.final_ln_after_pool or v.no_ln_pre:
        problems.append("non-standard image pooling / LayerNorm placement")
    if t.pool_type != "argmax" or t.proj_bias:
        problems.append("non-standard text pooling / projection bias")
    if cfg.init_logit_bias is not None:
        problems.append("a logit bias (SigLIP-style)")
    if problems:
        raise ConfigError(f"transformers.CLIPModel cannot represent this model: {', '.join(problems)}")


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    """A transformers ``CLIPConfig`` dict equivalent to ``cfg`` (refuses what HF cannot express)."""
    check_hf_compatible(cfg)
    v, t = cfg.vision, cfg.text
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    # HF pools the first EOT id; with eos_token_id == 2 it falls back to argmax, which is what CLIP
    # does and the only equivalent choice when the vocabulary is not CLIP's.
    eos = _CLIP_EOT_ID if t.vocab_size == _CLIP_EOT_ID + 1 else 2
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": eos,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "projection_dim": cfg.embed_dim,
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "num_channels": 3,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
    }


# --- folders --------------------------------------------------------------------------------------
def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("model_type") == "clip" or "vision_config" in data)


def load_hf_config(path: str | Path) -> CLIPConfig:
    """The config of a ``CLIPModel`` folder (a Siglip folder: ``hf_siglip.load_siglip_config``)."""
    config_path = Path(path) / "config.json"
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read Hugging Face config: {e}") from None
    return config_from_hf(data, str(config_path))


def load_hf_dir(path: str | Path) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """clipforge-named weights and config from a ``CLIPModel`` ``save_pretrained`` folder
    (``SiglipModel`` / ``Siglip2Model`` folders: ``hf_siglip.load_siglip_dir``)."""
    path = Path(path)
    cfg = load_hf_config(path)
    weights = next((path / n for n in HF_WEIGHT_FILES + HF_INDEX_FILES if (path / n).is_file()), None)
    if weights is None:
        expected = " or ".join(HF_WEIGHT_FILES + HF_INDEX_FILES)
        raise CheckpointError(f"{path}: no {expected} next to config.json")
    if weights.name in HF_INDEX_FILES:
        sd = load_sharded(weights)
    else:
        sd = load_weight_file(weights)
    try:
        return hf_to_clipforge(sd), cfg
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None


def load_weight_file(weights: Path) -> Mapping[str, torch.Tensor]:
    sd = load_safetensors(weights)[0] if weights.suffix == ".safetensors" else safe_torch_load(weights)
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{weights}: expected a state dict, got {type(sd).__name__}")
    return sd


def shard_names(index_path: str | Path) -> list[str]:
    """Shard files an ``*.index.json`` refers to, in first-use order (its ``weight_map`` values)."""
    return list(dict.fromkeys(_weight_map(Path(index_path)).values()))


def _weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a readable shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    escaping = sorted({n for n in weight_map.values() if Path(n).name != n})
    if escaping:
        raise CheckpointError(f"{index_path}: shard names must be plain file names, got {escaping[:3]}")
    return weight_map


def load_sharded(index_path: str | Path) -> dict[str, torch.Tensor]:
    """Merge the shards of a sharded ``save_pretrained`` folder, checking the index is satisfied.

    Large checkpoints (ViT-bigG on the Hub) are split this way; every tensor the index names
    must come from the shard it names, so a partly downloaded folder fails here, by file name.
    """
    index_path = Path(index_path)
    weight_map = _weight_map(index_path)
    merged: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {name} is missing (expected at {shard})")
        merged.update(load_weight_file(shard))
    missing = sorted(set(weight_map) - set(merged))
    if missing:
        raise CheckpointError(
            f"{index_path}: tensors listed in the index are absent from the shards: {missing[:5]}"
        )
    return merged


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def read_processor_json(file: Path) -> dict[str, Any]:
    """A ``preprocessor_config.json`` as a dict; unreadable or not an object is a CheckpointError."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the image processor config: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_preprocessor_config(path: str | Path, image_size: int) -> dict[str, Any]:
    """``PreprocessConfig`` fields reproducing the folder's ``CLIPImageProcessor``.

    A folder without ``preprocessor_config.json`` gets ``CLIPImageProcessor``'s defaults at the
    model's image size, which is what ``CLIPImageProcessor()`` would do for it.
    """
    from clipforge.transforms import PreprocessConfig

    file = Path(path) / PREPROCESSOR_CONFIG
    if not file.is_file():
        return PreprocessConfig.defaults_for("hf", image_size)
    data = read_processor_json(file)
    try:
        return PreprocessConfig.from_hf_processor(data, image_size, str(file)).to_dict()
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def save_hf(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write a folder ``transformers.CLIPModel.from_pretrained`` loads (config.json + model.safetensors),
    with the ``preprocessor_config.json`` of the model's preprocessing (exact for HF-origin models)."""
    from clipforge.transforms import PreprocessConfig

    directory = Path(directory)
    cfg: CLIPConfig = model.config
    hf_config = config_to_hf(cfg)
    sd = clipforge_to_hf({k: v for k, v in model.state_dict().items()})
    pre = getattr(model, "preprocess_cfg", None) or PreprocessConfig.defaults_for("hf", cfg.vision.image_size)
    processor = PreprocessConfig.coerce(pre).to_hf_processor()
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, directory / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(directory / PREPROCESSOR_CONFIG, json.dumps(processor, indent=2) + "\n")
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return directory
