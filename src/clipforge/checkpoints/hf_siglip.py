"""Hugging Face ``SiglipModel`` / ``Siglip2Model`` folders <-> clipforge SigLIP models.

A clipforge SigLIP is what open_clip builds for its ``*-SigLIP*`` configs: a timm
``vit_*_siglip_*`` trunk (no class token, MAP attention-pool head, ``timm_proj: none``) under
``visual.trunk.``, a bidirectional text transformer pooled at the last token with a biased
projection under ``text.``, and scalar ``logit_scale`` / ``logit_bias``. The layouts differ in:

1. HF keeps separate ``q_proj``/``k_proj``/``v_proj``; timm fuses them into ``attn.qkv``, and
   clipforge's text blocks into ``attn.in_proj`` (q, k, v order along the output dimension).
2. HF's MAP head is an ``nn.MultiheadAttention`` (one ``in_proj`` of q, k, v); timm's
   ``AttentionPoolLatent`` has ``q`` and a fused ``kv`` (k then v): the same rows, split 1 : 2.
3. Siglip2 (NaFlex) embeds patches with a Linear over patches flattened as (row, column,
   channel) and resizes its square position table per image. A fixed-resolution model is the
   case where the image is the table's own grid: the Linear becomes timm's conv (weights
   reordered to ``[out, channel, row, column]``), the table is used as is (HF's resize at scale
   1 is the identity) and the image size is ``sqrt(num_patches) * patch_size``. Its
   ``Siglip2ImageProcessor`` (native aspect ratio, at most ``max_num_patches`` patches) is what
   a load preprocesses with by default, as transformers does (:mod:`clipforge.model.naflex` runs
   that forward); ``image_naflex=False`` / ``--no-naflex`` gives the fixed square size instead.
4. HF stores the logit scalars as ``[1]`` tensors, clipforge as 0-d ones.
5. timm's ``NaFlexVit`` (open_clip main's ``*-SigLIP2-naflex`` towers) already has Siglip2's
   layout: ``embeds.proj`` is the same Linear over (row, column, channel) patches, and its
   ``(1, rows, columns, C)`` table flattens row-major to HF's square ``position_embedding``. It
   is written as a ``Siglip2Model`` only (a ``SiglipModel`` has one fixed image size), and reads
   back as the fixed-resolution trunk of item 3, which computes the same NaFlex features.

What has no fixed-resolution timm equivalent (``vision_use_head: false``, another activation
or LayerNorm epsilon in the image tower, a non-square Siglip2 table) is refused by name, as is
what a NaFlexVit has and a Siglip2Model lacks (prefix tokens, RoPE or factorized positions,
another position resize, a non-square table).
``transformers`` is not needed to read or write these folders; timm is (the trunk's
hyper-parameters are read from a meta-device instance, never guessed from names).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.atomic import atomic_write_text
from clipforge.checkpoints import hf
from clipforge.checkpoints.io import save_safetensors
from clipforge.errors import CheckpointError, ClipforgeError, ConfigError
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.model.naflex import is_naflexvit

log = logging.getLogger(__name__)

#: model_type -> the ``architectures`` entry transformers writes for it.
ARCHITECTURES = {"siglip": "SiglipModel", "siglip2": "Siglip2Model"}
#: Files of a Hugging Face tokenizer, copied along when a model is written back.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
#: The label a Siglip2 load gives the model (``model.architecture``); writing back reads it.
SIGLIP2_LABEL = "custom (from Siglip2Model)"
_HF_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF hidden_act -> timm act_layer
_TEXT_APPROX = {"gelu": "none", "gelu_pytorch_tanh": "tanh"}  # HF hidden_act -> TextConfig field
# timm's siglip families by (width, depth, heads, MLP width); others use the base name + kwargs.
_FAMILIES = {
    (768, 12, 12, 3072): "base",
    (1024, 24, 16, 4096): "large",
    (1152, 27, 16, 4304): "so400m",
    (1536, 40, 16, 6144): "giantopt",
}
_BASE_TRUNK = "vit_base_patch16_siglip_224"

# HF suffix (under vision_model. / text_model.) -> clipforge suffix (under visual.trunk. / text.)
_VISION = {
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "head.weight": "text_projection.weight",
    "head.bias": "text_projection.bias",
}
_VISION_BLOCK = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TEXT_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# timm NaFlexVit trunk suffix (under visual.trunk.) -> Siglip2Model key: the same Linear and table.
_NAFLEXVIT = {
    "embeds.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "embeds.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "embeds.pos_embed": "vision_model.embeddings.position_embedding.weight",
}
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_CF_LAYER = re.compile(r"^(?:blocks|transformer\.resblocks)\.(\d+)\.(.+)\.(weight|bias)$")


# --- detection ------------------------------------------------------------------------------------
def siglip_kind(data: Mapping[str, Any]) -> str | None:
    """``"siglip"`` / ``"siglip2"`` for a transformers Siglip(2) config dict, else None."""
    model_type = data.get("model_type")
    if model_type in ARCHITECTURES:
        return str(model_type)
    archs = data.get("architectures") or []
    for kind, arch in sorted(ARCHITECTURES.items(), reverse=True):
        if arch in archs:
            return kind
    return None


def read_hf_config(path: str | Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, or None when it has none that parses."""
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_siglip_dir(path: str | Path) -> bool:
    data = read_hf_config(path) if Path(path).is_dir() else None
    return data is not None and siglip_kind(data) is not None


# --- state dicts ----------------------------------------------------------------------------------
def hf_siglip_to_clipforge(
    sd: Mapping[str, torch.Tensor], kind: str, patch_size: int
) -> dict[str, torch.Tensor]:
    """Map a Siglip(2)Model state dict to clipforge names (timm trunk, clipforge text tower)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue  # a buffer in old transformers versions, recomputed by both sides
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        elif key.startswith("vision_model."):
            _vision_from_hf(key[len("vision_model.") :], value, kind, patch_size, out, qkv)
        elif key.startswith("text_model."):
            _text_from_hf(key[len("text_model.") :], value, out, qkv)
        else:
            raise CheckpointError(
                f"unexpected key {key!r} in a Hugging Face {ARCHITECTURES[kind]} state dict"
            )
    for (prefix, param), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"{prefix}: the checkpoint lacks {', '.join(missing)}_proj.{param}")
        out[f"{prefix}.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _vision_from_hf(
    key: str, value: torch.Tensor, kind: str, patch: int, out: dict[str, torch.Tensor], qkv: dict
) -> None:
    t = "visual.trunk."
    if key in _VISION:
        out[t + _VISION[key]] = value
    elif key == "embeddings.patch_embedding.weight":
        # Siglip2's Linear reads patches flattened as (row, column, channel).
        conv = (
            value if kind == "siglip" else value.reshape(value.shape[0], patch, patch, -1).permute(0, 3, 1, 2)
        )
        out[t + "patch_embed.proj.weight"] = conv.contiguous()
    elif key == "embeddings.position_embedding.weight":
        out[t + "pos_embed"] = value.unsqueeze(0)
    elif key in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
        param = key.rsplit("_", 1)[1]
        q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3], dim=0)
        out[f"{t}attn_pool.q.{param}"], out[f"{t}attn_pool.kv.{param}"] = q, kv
    else:
        _layer_from_hf(key, value, f"{t}blocks", _VISION_BLOCK, "attn.qkv", out, qkv, "vision_model.")


def _text_from_hf(key: str, value: torch.Tensor, out: dict[str, torch.Tensor], qkv: dict) -> None:
    if key in _TEXT:
        out["text." + _TEXT[key]] = value
    else:
        _layer_from_hf(
            key, value, "text.transformer.resblocks", _TEXT_BLOCK, "attn.in_proj", out, qkv, "text_model."
        )


def _layer_from_hf(
    key: str,
    value: torch.Tensor,
    blocks: str,
    names: Mapping[str, str],
    fused: str,
    out: dict[str, torch.Tensor],
    qkv: dict,
    tower: str,
) -> None:
    m = _HF_LAYER.match(key)
    name = m.group(2) if m else None
    if m is None or (
        name not in names and name not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    ):
        raise CheckpointError(f"unexpected key {tower + key!r} in a Hugging Face Siglip state dict")
    idx, _, param = m.groups()
    if name in names:
        out[f"{blocks}.{idx}.{names[name]}.{param}"] = value
    else:
        qkv.setdefault((f"{blocks}.{idx}.{fused}", param), {})[name[10]] = value


def clipforge_to_hf_siglip(sd: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_siglip_to_clipforge`; refuses weights a Siglip(2)Model has no place for."""
    vision, text = ({v: k for k, v in table.items()} for table in (_VISION, _TEXT))
    out: dict[str, torch.Tensor] = {}
    pool: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(1)
        elif key.startswith("visual.trunk."):
            sub = key[len("visual.trunk.") :]
            if sub in vision:
                out["vision_model." + vision[sub]] = value
            elif sub == "patch_embed.proj.weight":
                w = value if kind == "siglip" else value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
                out["vision_model.embeddings.patch_embedding.weight"] = w.contiguous()
            elif sub == "pos_embed":
                out["vision_model.embeddings.position_embedding.weight"] = value.squeeze(0)
            elif sub in _NAFLEXVIT:
                out[_NAFLEXVIT[sub]] = _naflexvit_to_hf(sub, value, kind, key)
            elif sub.startswith(("attn_pool.q.", "attn_pool.kv.")):
                part, param = sub.split(".")[1:]
                pool.setdefault(param, {})[part] = value
            else:
                out.update(_layer_to_hf(sub, value, "vision_model", _VISION_BLOCK, "attn.qkv", key))
        elif key.startswith("text.") and key[5:] in text:
            out["text_model." + text[key[5:]]] = value
        elif key.startswith("text."):
            out.update(_layer_to_hf(key[5:], value, "text_model", _TEXT_BLOCK, "attn.in_proj", key))
        else:
            raise ConfigError(f"{key!r} has no equivalent in a Hugging Face {ARCHITECTURES[kind]}")
    for param, parts in pool.items():
        out[f"vision_model.head.attention.in_proj_{param}"] = torch.cat([parts["q"], parts["kv"]], dim=0)
    return out


def _naflexvit_to_hf(sub: str, value: torch.Tensor, kind: str, key: str) -> torch.Tensor:
    """A NaFlexVit embedding tensor in Siglip2's layout: the Linear as is, the (1, rows, columns, C)
    table flattened row-major (a SiglipModel's conv at one fixed size would drop the NaFlex forward)."""
    if kind != "siglip2":
        raise ConfigError(
            f"{key!r}: a NaFlexVit image tower is written as a Siglip2Model (kind='siglip2'); "
            "a SiglipModel has one fixed image size"
        )
    return value.reshape(-1, value.shape[-1]).contiguous() if sub == "embeds.pos_embed" else value


def _layer_to_hf(
    sub: str, value: torch.Tensor, tower: str, names: Mapping[str, str], fused: str, key: str
) -> dict[str, torch.Tensor]:
    inverse = {v: k for k, v in names.items()}
    m = _CF_LAYER.match(sub)
    name = m.group(2) if m else None
    if m is None or (name not in inverse and name != fused):
        raise ConfigError(
            f"{key!r} has no equivalent in a Hugging Face Siglip model (it needs LayerScale-free "
            "timm siglip ViT blocks and open_clip's text blocks)"
        )
    idx, _, param = m.groups()
    prefix = f"{tower}.encoder.layers.{idx}."
    if name in inverse:
        return {f"{prefix}{inverse[name]}.{param}": value}
    q, k, v = value.chunk(3, dim=0)
    return {f"{prefix}self_attn.{p}_proj.{param}": t.contiguous() for p, t in zip("qkv", (q, k, v))}


# --- the timm trunk -------------------------------------------------------------------------------
def _act_name(act: nn.Module) -> str | None:
    """HF's ``hidden_act`` for a timm MLP activation, None when HF has no bit-equal one."""
    if isinstance(act, nn.GELU):
        return "gelu_pytorch_tanh" if act.approximate == "tanh" else "gelu"
    return {"GELUTanh": "gelu_pytorch_tanh", "GELU": "gelu"}.get(type(act).__name__)


def trunk_facts(trunk: nn.Module) -> dict[str, Any]:
    """Hyper-parameters of a timm siglip ViT (or NaFlexVit) that HF's vision config spells out.

    A NaFlexVit's ``img_size`` is its position table's own grid times the patch: the square size
    whose patch count is the Siglip2 ``num_patches`` (its configured image size is only the
    default fixed-size input, which the table is resized to like any other grid).
    """
    block = trunk.blocks[0]
    if is_naflexvit(trunk):
        patch = int(trunk.embeds.patch_size[0])
        img_size = int(trunk.embeds.pos_embed_grid_size[0]) * patch
    else:
        patch, img_size = int(trunk.patch_embed.patch_size[0]), int(trunk.patch_embed.img_size[0])
    return {
        "patch_size": patch,
        "embed_dim": int(trunk.embed_dim),
        "depth": len(trunk.blocks),
        "num_heads": int(block.attn.num_heads),
        "mlp_hidden": int(block.mlp.fc1.out_features),
        "act": _act_name(block.mlp.act),
        "eps": float(trunk.norm.eps),
        "img_size": img_size,
    }


def meta_trunk(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The timm trunk clipforge's tower builds (as open_clip: the name's own input size unless
    ``kwargs`` has ``img_size``), on the meta device (no memory, no init cost)."""
    try:
        import timm
    except ImportError:
        raise ConfigError("SigLIP models need timm: pip install 'clipforge[timm]'") from None
    try:
        with torch.device("meta"):
            # weight_init="skip": timm's init on meta tensors is all the cost and changes no shape
            return timm.create_model(
                name, pretrained=False, num_classes=0, global_pool="map", weight_init="skip", **kwargs
            )
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"timm cannot build {name!r} with {dict(kwargs)}: {e}") from None


@functools.lru_cache(maxsize=64)
def _facts(name: str, kwargs: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """:func:`trunk_facts` of a meta trunk, memoised (a load builds up to three per config)."""
    trunk = meta_trunk(name, dict(kwargs))
    facts = trunk_facts(trunk)
    facts["default_img_size"] = tuple(trunk.patch_embed.img_size)
    return tuple(facts.items())


def _facts_of(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(_facts(name, tuple(sorted(kwargs.items()))))


def _trunk_choice(want: dict[str, Any], image_size: int) -> tuple[str, dict[str, Any]]:
    """timm model name + the fewest ``timm_kwargs`` that give a trunk with ``want``'s facts."""
    import timm

    family = _FAMILIES.get((want["embed_dim"], want["depth"], want["num_heads"], want["mlp_hidden"]), "base")
    name = f"vit_{family}_patch{want['patch_size']}_siglip_{image_size}"
    name = name if timm.is_model(name) else _BASE_TRUNK
    have = _facts_of(name, {})
    kwargs: dict[str, Any] = {
        k: want[k] for k in ("patch_size", "embed_dim", "depth", "num_heads") if want[k] != have[k]
    }
    if have["default_img_size"] != (image_size, image_size):
        kwargs["img_size"] = image_size
    if want["act"] != have["act"]:
        kwargs["act_layer"] = _HF_ACTS[want["act"]]
    if _facts_of(name, kwargs)["mlp_hidden"] != want["mlp_hidden"]:
        kwargs["mlp_ratio"] = hf.mlp_ratio_of(want["embed_dim"], want["mlp_hidden"])
    got = _facts_of(name, kwargs)
    want = {**want, "img_size": image_size}
    if {k: got[k] for k in want} != want:
        raise CheckpointError(
            f"no timm siglip trunk matches the Hugging Face vision config {want} (got {got})"
        )
    return name, kwargs


# --- configs --------------------------------------------------------------------------------------
def _act(sub: Mapping[str, Any], where: str) -> str:
    act = sub.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _HF_ACTS:
        raise CheckpointError(f"{where}.hidden_act {act!r} is not supported (gelu or gelu_pytorch_tanh)")
    return act


def _vision_from_hf_config(v: Mapping[str, Any], kind: str, source: str) -> VisionConfig:
    where = f"{source}: vision_config"
    if v.get("vision_use_head", True) is False:
        raise CheckpointError(
            f"{where}.vision_use_head=false: a model without the MAP head has no image embedding"
        )
    if v.get("num_channels", 3) != 3:
        raise CheckpointError(f"{where}.num_channels={v['num_channels']}: only RGB (3) is supported")
    patch = int(v.get("patch_size", 16))
    if kind == "siglip2":
        num_patches = int(v.get("num_patches", 256))
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(
                f"{where}.num_patches={num_patches} is not a square grid; a fixed-resolution model needs one"
            )
        image_size = side * patch  # the table's own grid: HF's per-image resize is then the identity
    else:
        image_size = int(v.get("image_size", 224))
    want = {
        "patch_size": patch,
        "embed_dim": int(v.get("hidden_size", 768)),
        "depth": int(v.get("num_hidden_layers", 12)),
        "num_heads": int(v.get("num_attention_heads", 12)),
        "mlp_hidden": int(v.get("intermediate_size", 3072)),
        "act": _act(v, where),
        "eps": float(v.get("layer_norm_eps", 1e-6)),
    }
    if want["eps"] != 1e-6:
        raise CheckpointError(f"{where}.layer_norm_eps={want['eps']}: timm's siglip trunks use 1e-6")
    if want["embed_dim"] % want["num_heads"]:
        raise CheckpointError(
            f"{where}: hidden_size {want['embed_dim']} is not a multiple of "
            f"num_attention_heads {want['num_heads']}"
        )
    name, kwargs = _trunk_choice(want, image_size)
    return VisionConfig(
        image_size=image_size,
        patch_size=patch,
        width=want["embed_dim"],
        layers=want["depth"],
        head_width=want["embed_dim"] // want["num_heads"],
        timm_model_name=name,
        timm_pool="map",
        timm_proj="none",
        timm_kwargs=kwargs,
    )


def _text_from_hf_config(t: Mapping[str, Any], source: str) -> tuple[TextConfig, int]:
    where = f"{source}: text_config"
    width = int(t.get("hidden_size", 768))
    text = TextConfig(
        context_length=int(t.get("max_position_embeddings", 64)),
        vocab_size=int(t.get("vocab_size", 32000)),
        width=width,
        heads=int(t.get("num_attention_heads", 12)),
        layers=int(t.get("num_hidden_layers", 12)),
        mlp_ratio=hf.mlp_ratio_of(width, int(t.get("intermediate_size", 3072))),
        pool_type="last",
        proj_bias=True,
        no_causal_mask=True,
        norm_eps=float(t.get("layer_norm_eps", 1e-6)),
        act_approximate=_TEXT_APPROX[_act(t, where)],
    )
    return text, int(t.get("projection_size") or width)


def config_from_hf_siglip(data: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
    """A ``CLIPConfig`` from a transformers ``SiglipConfig`` / ``Siglip2Config`` dict."""
    kind = siglip_kind(data)
    if kind is None:
        raise CheckpointError(f"{source}: model_type {data.get('model_type')!r} is not siglip or siglip2")
    vision = _vision_from_hf_config(dict(data.get("vision_config") or {}), kind, source)
    text, embed_dim = _text_from_hf_config(dict(data.get("text_config") or {}), source)
    if embed_dim != vision.width:
        raise CheckpointError(
            f"{source}: text_config.projection_size {embed_dim} differs from the image width "
            f"{vision.width}; SigLIP compares the two embeddings directly"
        )
    cfg = CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
        custom_text=True,
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def is_siglip_config(cfg: CLIPConfig) -> bool:
    """True for the open_clip SigLIP layout (timm MAP trunk without projection, logit bias)."""
    v = cfg.vision
    return bool(v.timm_model_name) and v.timm_pool == "map" and cfg.init_logit_bias is not None


def _vit_problems(trunk: nn.Module) -> list[str]:
    """What a SiglipModel's vision tower cannot hold in a timm ``VisionTransformer`` trunk."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(trunk, VisionTransformer) or trunk.num_prefix_tokens or not hasattr(trunk, "attn_pool"):
        return ["the image trunk is not a timm ViT without class/register tokens and with a MAP head"]
    block = trunk.blocks[0]
    identity = (
        trunk.norm_pre,
        trunk.fc_norm,
        trunk.patch_embed.norm,
        block.ls1,
        block.ls2,
        block.attn.q_norm,
    )
    if not all(isinstance(m, nn.Identity) for m in identity) or block.attn.qkv.bias is None:
        return ["the image trunk has pre-norm, fc-norm, LayerScale, qk-norm or bias-free qkv"]
    if trunk.attn_pool.pos_embed is not None or trunk.attn_pool.latent_len != 1:
        return ["the MAP head has a position embedding or several latents"]
    if _act_name(block.mlp.act) is None or trunk.norm.eps != 1e-6:
        return ["the image trunk's activation / LayerNorm epsilon has no HF equivalent"]
    return []


def _naflexvit_embed_problems(embeds: nn.Module) -> list[str]:
    """What Siglip2's patch and position embedding cannot hold in a NaFlexVit's ``embeds``:
    it is a biased Linear over (row, column, channel) patches plus one learned square table,
    resized per image with bilinear, antialiased, corner-unaligned interpolation to the exact grid."""
    found = []
    linear = isinstance(getattr(embeds, "proj", None), nn.Linear) and embeds.proj.bias is not None
    if not linear or embeds.norm_input is not None or not isinstance(embeds.norm, nn.Identity):
        found.append("its patch embedding is not a biased Linear without input/output norm")
    if not embeds.channels_last or embeds.enable_patch_interpolator or len(set(embeds.patch_size)) != 1:
        found.append("its patches are not square and flattened as (row, column, channel)")
    grid = tuple(embeds.pos_embed_grid_size or ())
    if embeds.pos_embed_type != "learned" or len(set(grid)) != 1:
        found.append(
            f"its position embedding is {embeds.pos_embed_type!r} over a {grid} grid, not a square table"
        )
    resize = (embeds.pos_embed_interp_mode, embeds.pos_embed_antialias, embeds.pos_embed_align_corners)
    if (
        resize != ("bilinear", True, False)
        or embeds.pos_embed_ar_preserving
        or embeds.pos_embed_use_grid_sample
    ):
        found.append("its positions are not resized bilinearly (antialias, no corner alignment) to each grid")
    return found


def _naflexvit_problems(trunk: nn.Module, kind: str | None) -> list[str]:
    """What a Siglip2Model cannot hold in a timm ``NaFlexVit`` trunk, each named."""
    found = [f"NaFlexVit: {p}" for p in _naflexvit_embed_problems(trunk.embeds)]
    if kind == "siglip":
        found.append(
            "a NaFlexVit tower is written as a Siglip2Model (kind='siglip2'), not a fixed-size SiglipModel"
        )
    if trunk.num_prefix_tokens or getattr(trunk, "rope", None) is not None:
        found.append("NaFlexVit: class/register tokens or RoPE")
    pool = getattr(trunk, "attn_pool", None)
    if pool is None or getattr(pool, "pos_embed", None) is not None or pool.latent_len != 1:
        found.append(f"NaFlexVit: global_pool={trunk.global_pool!r}, not a one-latent MAP head")
    if not all(isinstance(m, nn.Identity) for m in (trunk.norm_pre, trunk.fc_norm, trunk.head)):
        found.append("NaFlexVit: pre-norm, fc-norm or a classifier head")
    block = _naflexvit_block_problem(trunk)
    return found + ([f"NaFlexVit {block}"] if block else [])


def _naflexvit_block_problem(trunk: nn.Module) -> str | None:
    """The first of a NaFlexVit's blocks a Siglip2 encoder layer cannot hold, named with the reason:
    a layer is LayerNorm (1e-6) -> fused biased q/k/v of width ``embed_dim`` -> biased out proj ->
    LayerNorm -> biased two-layer GELU MLP, with no scaling or extra norm anywhere."""
    for i, block in enumerate(trunk.blocks):
        if type(block).__name__ != "Block":
            return f"block {i}: a timm {type(block).__name__}, not a plain ViT Block"
        attn, mlp = block.attn, block.mlp
        plain = (block.ls1, block.ls2, attn.q_norm, attn.k_norm, attn.norm, getattr(mlp, "norm", None))
        qkv = getattr(attn, "qkv", None)
        fused = qkv is not None and qkv.out_features == 3 * trunk.embed_dim
        if not (fused and all(isinstance(m, nn.Identity) for m in plain) and type(mlp).__name__ == "Mlp"):
            return f"block {i}: LayerScale, qk/attention/MLP norm, grouped or resized qkv, or a gated MLP"
        if any(layer.bias is None for layer in (qkv, attn.proj, mlp.fc1, mlp.fc2)):
            return f"block {i}: a bias-free attention or MLP Linear"
        norms = (block.norm1, block.norm2, trunk.norm)
        if not all(type(n).__name__ == "LayerNorm" and n.eps == 1e-6 for n in norms):
            return f"block {i}: {type(block.norm1).__name__} / epsilon, not LayerNorm(eps=1e-6)"
        if _act_name(mlp.act) is None:
            return f"block {i}: activation {type(mlp.act).__name__}"
    return None


def check_siglip_compatible(cfg: CLIPConfig, trunk: nn.Module, kind: str | None = None) -> dict[str, Any]:
    """The trunk's facts, after refusing (by name) what a Siglip(2)Model cannot represent.

    ``kind`` (``"siglip"`` / ``"siglip2"``) is the model written; a NaFlexVit trunk needs Siglip2.
    """
    v, t = cfg.vision, cfg.text
    problems = _naflexvit_problems(trunk, kind) if is_naflexvit(trunk) else _vit_problems(trunk)
    if v.timm_proj not in ("none", "") or not v.timm_pool == "map":
        problems.append("an image projection after the MAP head (timm_proj must be 'none')")
    if t.hf_model_name or t.ls_init_value is not None or t.embed_cls or t.proj_type != "linear":
        problems.append("the text tower is not open_clip's plain transformer")
    if not (t.no_causal_mask and t.pool_type == "last" and t.proj_bias) or cfg.quick_gelu:
        problems.append(
            "the text tower is not SigLIP's (bidirectional, last-token pooling, biased projection, GELU)"
        )
    if cfg.init_logit_bias is None:
        problems.append("no logit bias")
    if problems:
        raise ConfigError(f"a Hugging Face SiglipModel cannot represent this model: {'; '.join(problems)}")
    return trunk_facts(trunk)


def config_to_hf_siglip(cfg: CLIPConfig, trunk: nn.Module, kind: str = "siglip") -> dict[str, Any]:
    """A transformers ``SiglipConfig`` (or ``Siglip2Config``) dict computing what ``cfg`` computes."""
    f = check_siglip_compatible(cfg, trunk, kind)
    t = cfg.text
    grid = f["img_size"] // f["patch_size"]  # the trunk's input size is what the model computes at
    vision: dict[str, Any] = {
        "model_type": f"{kind}_vision_model",
        "hidden_size": f["embed_dim"],
        "intermediate_size": f["mlp_hidden"],
        "num_hidden_layers": f["depth"],
        "num_attention_heads": f["num_heads"],
        "num_channels": 3,
        "patch_size": f["patch_size"],
        "hidden_act": f["act"],
        "layer_norm_eps": f["eps"],
        "attention_dropout": 0.0,
        "vision_use_head": True,
    }
    vision.update({"num_patches": grid * grid} if kind == "siglip2" else {"image_size": f["img_size"]})
    text = {
        "model_type": f"{kind}_text_model",
        "vocab_size": t.vocab_size,
        "hidden_size": t.width,
        "intermediate_size": int(t.width * t.mlp_ratio),
        "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads,
        "max_position_embeddings": t.context_length,
        "hidden_act": "gelu_pytorch_tanh" if t.act_approximate == "tanh" else "gelu",
        "layer_norm_eps": t.norm_eps,
        "attention_dropout": 0.0,
        "pad_token_id": 1,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "projection_size": cfg.embed_dim,
    }
    return {
        "architectures": [ARCHITECTURES[kind]],
        "model_type": kind,
        "initializer_factor": 1.0,
        "text_config": text,
        "vision_config": vision,
    }


# --- preprocessing and tokenizer ------------------------------------------------------------------
#: What ``Siglip2ImageProcessor`` uses where its file is silent (transformers' class defaults).
NAFLEX_DEFAULTS = {"max_num_patches": 256, "patch_size": 16}


def preprocess_from_processor(data: Mapping[str, Any], image_size: int, source: str) -> dict[str, Any]:
    """``PreprocessConfig`` fields reproducing a Siglip(2) image processor at the model's fixed size.

    Both resize straight to the target (no aspect-preserving resize, no crop: "squash"), so the
    document is read as the ``CLIPImageProcessor`` with an exact size and no center crop. For a
    Siglip2 processor these are the fixed-size fields behind ``image_naflex=False`` /
    ``--no-naflex`` (the model's own square size); :func:`naflex_fields` adds what it does by
    default (keep the aspect, at most ``max_num_patches`` patches).
    """
    from clipforge.conventions import fields_from_hf_processor

    kind = str(data.get("image_processor_type") or "SiglipImageProcessor")
    if "Siglip" not in kind:
        raise CheckpointError(f"{source}: image_processor_type {kind!r} is not a Siglip image processor")
    size = data.get("size") if "Siglip2" not in kind else None
    size = dict(size) if isinstance(size, Mapping) else {"height": image_size, "width": image_size}
    clip_like = {
        **{k: v for k, v in data.items() if k not in ("patch_size", "max_num_patches")},
        "image_processor_type": "CLIPImageProcessorPil" if kind.endswith("Pil") else "CLIPImageProcessor",
        "size": size,
        "crop_size": size,
        "do_center_crop": False,
        "resample": data.get("resample", 2 if "Siglip2" in kind else 3),
        "image_mean": data.get("image_mean", (0.5, 0.5, 0.5)),
        "image_std": data.get("image_std", (0.5, 0.5, 0.5)),
    }
    try:
        return fields_from_hf_processor(clip_like, image_size, source)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def is_naflex_processor(data: Mapping[str, Any]) -> bool:
    """True for a ``Siglip2ImageProcessor`` document (any backend suffix): transformers
    preprocesses with NaFlex (native aspect ratio, a variable patch grid) for it."""
    return "Siglip2" in str(data.get("image_processor_type") or "")


def naflex_fields(data: Mapping[str, Any], source: str, model_patch: int) -> dict[str, int]:
    """The NaFlex ``PreprocessConfig`` fields of a ``Siglip2ImageProcessor`` document: its
    ``max_num_patches`` / ``patch_size`` (:data:`NAFLEX_DEFAULTS` where the file is silent).

    A patch size other than the model's is refused here, naming the file: transformers would
    hand the model patches of the wrong length, and clipforge would fail only at the first image.
    """
    most = data.get("max_num_patches", NAFLEX_DEFAULTS["max_num_patches"])
    patch = data.get("patch_size", NAFLEX_DEFAULTS["patch_size"])
    for key, value in (("max_num_patches", most), ("patch_size", patch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: {key}={value!r} must be a positive int")
    if patch != model_patch:
        raise CheckpointError(
            f"{source}: patch_size={patch}{' (the default)' if 'patch_size' not in data else ''} differs "
            f"from the model's vision_config.patch_size={model_patch}; the processor must cut the "
            "patches the model embeds"
        )
    fixed = {"resample": 2, "rescale_factor": 1 / 255, "do_resize": True}
    odd = {k: data[k] for k, v in fixed.items() if k in data and data[k] != v}
    if odd:
        log.warning("%s: %s ignored by NaFlex preprocessing (bilinear, 1/255, always resized)", source, odd)
    return {"naflex_max_patches": most, "naflex_patch_size": patch}


def naflex_preprocess(path: str | Path, pre: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``pre`` (default: the folder's fixed-size fields) with the folder's NaFlex fields on.

    Loading a ``Siglip2Model`` folder whose processor is a ``Siglip2ImageProcessor`` already does
    this (see :func:`read_preprocessor`); this reads the same fields for callers holding others.
    """
    path = Path(path)
    cfg = load_siglip_config(path)
    file = path / hf.PREPROCESSOR_CONFIG
    data = hf.read_processor_json(file) if file.is_file() else {"patch_size": cfg.vision.patch_size}
    if pre is None:
        pre = read_preprocessor(path, cfg.vision.image_size, "siglip2")  # no patch size: fixed fields
    return {**pre, **naflex_fields(data, str(file), cfg.vision.patch_size)}


def read_preprocessor(
    path: Path, image_size: int, kind: str, patch_size: int | None = None
) -> dict[str, Any]:
    """The folder's preprocessing as transformers applies it to the model.

    A ``Siglip2Model`` folder with a ``Siglip2ImageProcessor`` gets NaFlex (the fixed-size fields
    stay underneath, for ``image_naflex=False``); one without a processor file gets the
    processor's defaults with the model's own patch size (the only one it can take). Without
    ``patch_size`` only the fixed-size fields are read.
    """
    file = path / hf.PREPROCESSOR_CONFIG
    data: dict[str, Any] = {
        "image_processor_type": "Siglip2ImageProcessor" if kind == "siglip2" else "SiglipImageProcessor"
    }
    if file.is_file():
        data = hf.read_processor_json(file)
    elif kind == "siglip2" and patch_size is not None:
        data["patch_size"] = patch_size
    pre = preprocess_from_processor(data, image_size, str(file))
    if kind == "siglip2" and patch_size is not None and is_naflex_processor(data):
        pre.update(naflex_fields(data, str(file), patch_size))
    return pre


def processor_document(pre: Any, kind: str, patch_size: int) -> dict[str, Any]:
    """The ``preprocessor_config.json`` of a Siglip(2) image processor for ``pre``.

    A Siglip2 document of a NaFlex ``pre`` carries its ``naflex_max_patches``, so the folder is
    read back (by transformers and clipforge) with the same patch budget; a fixed-size ``pre``
    gets the patch count of its square size, the grid the model computes at.
    """
    from clipforge.transforms import PreprocessConfig

    pre = PreprocessConfig.coerce(pre)
    clip = pre.to_hf_processor()
    h, w = pre.size
    doc: dict[str, Any] = {
        "image_processor_type": "Siglip2ImageProcessor" if kind == "siglip2" else "SiglipImageProcessor",
        "do_resize": clip["do_resize"],
        "resample": clip["resample"],
        "do_rescale": True,
        "rescale_factor": clip["rescale_factor"],
        "do_normalize": True,
        "image_mean": clip["image_mean"],
        "image_std": clip["image_std"],
    }
    naflex = pre.naflex_max_patches is not None
    if naflex and pre.naflex_patch_size != patch_size:
        raise ConfigError(
            f"preprocess naflex_patch_size={pre.naflex_patch_size} differs from the model's patch size "
            f"{patch_size}; a Siglip2ImageProcessor must cut the model's patches"
        )
    if kind == "siglip2":
        most = pre.naflex_max_patches if naflex else (h // patch_size) * (w // patch_size)
        doc.update(patch_size=patch_size, max_num_patches=most)
        if naflex:  # what NaFlexTransform computes whatever the fixed-size fields say
            doc.update(resample=2, rescale_factor=1 / 255)
        if naflex and pre.naflex_resize == "timm":
            log.warning(
                "a Siglip2ImageProcessor resizes bilinearly on the uint8 tensor: the folder is read back "
                "with that NaFlex rule, not timm's (%s resize) these weights used; pass "
                "image_naflex_resize='timm' / --naflex-resize timm when loading it to keep timm's",
                pre.interpolation,
            )
    else:
        if naflex:
            log.warning(
                "a SiglipImageProcessor has no NaFlex: the folder preprocesses at the fixed %dx%d size "
                "(write kind='siglip2' to keep naflex_max_patches=%d)",
                h,
                w,
                pre.naflex_max_patches,
            )
        doc.update(size={"height": h, "width": w}, do_convert_rgb=True)
    return doc


def tokenizer_settings(path: str | Path, context_length: int) -> dict[str, Any] | None:
    """``tokenizer_cfg`` for a folder with Hugging Face tokenizer files (open_clip's SigLIP cleaning)."""
    path = Path(path)
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        return None
    return {"type": "hf", "name": str(path), "context_length": context_length, "clean": "canonicalize"}


def with_folder_tokenizer(cfg: CLIPConfig, path: str | Path) -> CLIPConfig:
    """``cfg`` naming the folder's own tokenizer as open_clip's SigLIP configs name theirs
    (``hf_tokenizer_name`` + ``clean: canonicalize``), so that paths reading the config alone
    (``get_tokenizer(folder)``) find it; a folder without tokenizer files is left on CLIP's BPE,
    with a warning, since its ids would not be the model's."""
    if tokenizer_settings(path, cfg.text.context_length) is None:
        log.warning(
            "%s: no tokenizer files (%s); SigLIP text towers need the tokenizer they were trained "
            "with, copy its files into the folder",
            path,
            ", ".join(TOKENIZER_FILES),
        )
        return cfg
    return cfg.replace(text={"hf_tokenizer_name": str(path), "tokenizer_kwargs": {"clean": "canonicalize"}})


def load_siglip_config(path: str | Path) -> CLIPConfig:
    """The clipforge config of a Siglip(2)Model folder (its ``config.json`` and tokenizer files)."""
    data = read_hf_config(path)
    if data is None or siglip_kind(data) is None:
        raise CheckpointError(
            f"{Path(path) / 'config.json'}: not a Hugging Face SiglipModel / Siglip2Model config"
        )
    return with_folder_tokenizer(config_from_hf_siglip(data, str(Path(path) / "config.json")), path)


def _tokenizer_folder(tok: Mapping[str, Any]) -> Path | None:
    """The local folder holding a ``type: hf`` tokenizer: the model folder it was found in
    (``local_dir``), ``name`` as a folder, else ``name`` resolved from the local hub cache."""
    if tok.get("type") != "hf":
        return None
    for candidate in (tok.get("local_dir"), tok.get("name")):
        folder = Path(str(candidate)).expanduser() if candidate else None
        if folder is not None and folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES):
            return folder
    try:
        from clipforge.hf_tokenizer import resolve_tokenizer_dir

        return resolve_tokenizer_dir(str(tok.get("name", "")), cache_dir=tok.get("cache_dir"))
    except (ImportError, ClipforgeError, OSError):
        return None


def _copy_tokenizer(model: nn.Module, directory: Path) -> None:
    """Copy the model's HF tokenizer files along (a folder is only usable with its tokenizer)."""
    tok = getattr(model, "tokenizer_cfg", None) or {}
    source = _tokenizer_folder(tok)
    if source is None:
        log.warning(
            "%s: no local Hugging Face tokenizer folder to copy (tokenizer_cfg=%s); add the tokenizer "
            "files yourself",
            directory,
            tok,
        )
        return
    if source.resolve() == directory.resolve():
        return
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


# --- folders --------------------------------------------------------------------------------------
def load_siglip_dir(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], CLIPConfig, dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """``(state dict, config, preprocess fields, tokenizer_cfg, extra)`` of a Siglip(2)Model folder."""
    path = Path(path)
    cfg = load_siglip_config(path)
    kind = siglip_kind(read_hf_config(path) or {})
    weights = next((path / n for n in hf.HF_WEIGHT_FILES + hf.HF_INDEX_FILES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{path}: no {' or '.join(hf.HF_WEIGHT_FILES + hf.HF_INDEX_FILES)} next to config.json"
        )
    raw = hf.load_sharded(weights) if weights.name in hf.HF_INDEX_FILES else hf.load_weight_file(weights)
    try:
        sd = hf_siglip_to_clipforge(raw, kind, cfg.vision.patch_size)
    except CheckpointError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    pre = read_preprocessor(path, cfg.vision.image_size, kind, cfg.vision.patch_size)
    tok = tokenizer_settings(path, cfg.text.context_length)
    extra = {"architecture": SIGLIP2_LABEL} if kind == "siglip2" else {}
    return sd, cfg, pre, tok, extra


def model_kind(model: nn.Module) -> str:
    """``siglip2`` for a model loaded from a Siglip2Model folder (its label says so) or one whose
    preprocessing is NaFlex or whose image trunk is timm's NaFlexVit (only a Siglip2Model takes NaFlex
    inputs in transformers), else ``siglip``."""
    naflex = getattr(getattr(model, "preprocess_cfg", None), "naflex_max_patches", None) is not None
    naflex = naflex or is_naflexvit(getattr(getattr(model, "visual", None), "trunk", None))
    return "siglip2" if naflex or getattr(model, "architecture", None) == SIGLIP2_LABEL else "siglip"


def save_hf_siglip(model: nn.Module, directory: str | Path, kind: str | None = None) -> Path:
    """Write a folder ``transformers.SiglipModel`` (``kind="siglip2"``: ``Siglip2Model``) loads.

    ``kind`` defaults to what the model was loaded from; the tokenizer files of a model loaded from
    a folder are copied along.
    """
    from clipforge.transforms import PreprocessConfig

    kind = kind or model_kind(model)
    if kind not in ARCHITECTURES:
        raise ConfigError(f"unknown Siglip kind {kind!r}; choose one of {sorted(ARCHITECTURES)}")
    directory = Path(directory)
    cfg: CLIPConfig = model.config
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise ConfigError("a Hugging Face SiglipModel needs a timm image trunk (model.visual.trunk)")
    document = config_to_hf_siglip(cfg, trunk, kind)
    sd = clipforge_to_hf_siglip({k: v.detach() for k, v in model.state_dict().items()}, kind)
    document["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    pre = getattr(model, "preprocess_cfg", None) or PreprocessConfig.defaults_for("hf", cfg.vision.image_size)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, directory / "model.safetensors", metadata={"format": "pt"})
    processor = processor_document(pre, kind, trunk_facts(trunk)["patch_size"])
    atomic_write_text(directory / hf.PREPROCESSOR_CONFIG, json.dumps(processor, indent=2) + "\n")
    _copy_tokenizer(model, directory)
    atomic_write_text(directory / "config.json", json.dumps(document, indent=2) + "\n")
    return directory
