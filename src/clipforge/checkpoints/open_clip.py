"""open_clip / OpenAI state dicts <-> clipforge state dicts, and architecture inference.

The two layouts differ in only two ways (see the key contract in the model package):
1. open_clip's standard ``CLIP`` keeps the text tower's modules at the root (``token_embedding``,
   ``positional_embedding``, ``transformer.*``, ``ln_final``, ``text_projection``); clipforge
   nests them under ``text.``.
2. ``nn.MultiheadAttention`` stores ``attn.in_proj_weight``/``in_proj_bias``; clipforge's fused
   projection is an ``nn.Linear`` named ``attn.in_proj``.
OpenAI's released files use the same names as open_clip (plus a few scalar bookkeeping entries).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig

#: Root-level text modules of open_clip's ``CLIP`` (moved under ``text.`` in clipforge).
_TEXT_ROOT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
#: A buffer transformers < 4.31 saved with HF text towers; open_clip drops it on load too.
_HF_POSITION_IDS = "text.transformer.embeddings.position_ids"
#: Prefixes left by DDP/FSDP (``module.``) and torch.compile (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Entries in OpenAI's TorchScript state dicts that are hyper-parameters, not weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
#: CoCa's attentions with a separate context (pooler, decoder cross-attention): open_clip stores
#: ``nn.MultiheadAttention`` weights (fused ``in_proj_weight`` when the widths agree, else
#: ``q/k/v_proj_weight``; always a fused ``in_proj_bias``), clipforge three linears.
_CROSS_MHA = re.compile(
    r"^(visual\.attn_pool\.attn|text_decoder\.cross_attn\.\d+\.attn)\."
    r"(in_proj_weight|in_proj_bias|q_proj_weight|k_proj_weight|v_proj_weight)$"
)
#: The fused attention input projection of CLIP's own transformer blocks (text, ViT, CoCa decoder);
#: anchored on ``resblocks.N`` so a timm trunk's or Hugging Face encoder's own modules keep their names.
_RESBLOCK_IN_PROJ = re.compile(r"(resblocks\.\d+\.attn)\.in_proj_(weight|bias)$")
_RESBLOCK_IN_PROJ_LINEAR = re.compile(r"(resblocks\.\d+\.attn)\.in_proj\.(weight|bias)$")
_CROSS_LINEARS = re.compile(
    r"^(visual\.attn_pool\.attn|text_decoder\.cross_attn\.\d+\.attn)\.([qkv])_proj\.(weight|bias)$"
)


def strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, in any nesting) from every key."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Training checkpoints keep the weights under ``state_dict`` (open_clip) or ``model``."""
    for wrapper in ("state_dict", "model"):
        inner = sd.get(wrapper) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return sd


def is_open_clip_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for open_clip/OpenAI layouts (text modules at the root or MHA-style in_proj names)."""
    keys = strip_prefixes(_unwrap(sd)).keys()
    return any(k.startswith("token_embedding.") for k in keys) or any(
        k.endswith("attn.in_proj_weight") for k in keys
    )


def open_clip_to_clipforge(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Map an open_clip or OpenAI state dict to clipforge's key names (tensors are not copied)."""
    out: dict[str, Any] = {}
    for key, value in strip_prefixes(_unwrap(sd)).items():
        if key in _OPENAI_SCALARS or key.endswith("attn_mask") or key == _HF_POSITION_IDS:
            continue  # hyper-parameters / non-persistent buffers, not weights
        if (cross := _CROSS_MHA.match(key)) is not None:
            out.update(_split_mha(cross.group(1), cross.group(2), value))
            continue
        if key.startswith(_TEXT_ROOT):
            key = "text." + key
        key = _RESBLOCK_IN_PROJ.sub(r"\1.in_proj.\2", key)
        if key in ("logit_scale", "logit_bias") and isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.reshape(())
        out[key] = value
    return out


def clipforge_to_open_clip(sd: Mapping[str, Any], custom_text: bool | None = None) -> dict[str, Any]:
    """Inverse of :func:`open_clip_to_clipforge`, in the layout of the open_clip model class.

    open_clip's standard ``CLIP`` keeps the text tower's modules at the root; its
    ``CustomTextCLIP`` (``custom_text`` configs, every Hugging Face text tower) and CoCa keep them
    under ``text.``, as clipforge does. ``custom_text=None`` decides from the keys alone (root for
    CLIP's own text tower, except CoCa's); pass the config's layout (``config.custom_text``) for
    models such as SigLIP or MobileCLIP whose built-in text tower sits under ``text.`` in open_clip.
    """
    sd = _merge_mha(strip_prefixes(sd))
    if custom_text is None:
        custom_text = "text.token_embedding.weight" not in sd or "text.cls_emb" in sd
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if not custom_text and key.startswith("text."):
            key = key[len("text.") :]
        key = _RESBLOCK_IN_PROJ_LINEAR.sub(r"\1.in_proj_\2", key)
        out[key] = value
    return out


def open_clip_layout_is_custom_text(cfg: CLIPConfig) -> bool:
    """True when open_clip builds ``cfg`` as ``CustomTextCLIP``/CoCa (text tower under ``text.``)."""
    return bool(cfg.custom_text or cfg.text.hf_model_name or cfg.is_coca)


def _split_mha(prefix: str, name: str, value: Any) -> dict[str, Any]:
    """open_clip ``nn.MultiheadAttention`` entries -> clipforge ``q_proj``/``k_proj``/``v_proj`` linears."""
    if name in ("in_proj_weight", "in_proj_bias"):
        kind = "weight" if name.endswith("weight") else "bias"
        return {f"{prefix}.{p}_proj.{kind}": part for p, part in zip("qkv", value.chunk(3, dim=0))}
    return {f"{prefix}.{name[0]}_proj.weight": value}


def _merge_mha(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_split_mha`, in the layout ``nn.MultiheadAttention`` would have."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in sd.items():
        match = _CROSS_LINEARS.match(key)
        if match is None:
            out[key] = value
        else:
            groups.setdefault(match.group(1), {})[f"{match.group(2)}.{match.group(3)}"] = value
    for prefix, parts in groups.items():
        weights = [parts[f"{p}.weight"] for p in "qkv"]
        out[f"{prefix}.in_proj_bias"] = torch.cat([parts[f"{p}.bias"] for p in "qkv"])
        if all(w.shape == weights[0].shape for w in weights):  # MHA's _qkv_same_embed_dim
            out[f"{prefix}.in_proj_weight"] = torch.cat(weights)
        else:
            out.update({f"{prefix}.{p}_proj_weight": w for p, w in zip("qkv", weights)})
    return out


# --- architecture inference ---------------------------------------------------------------------
def _count_blocks(keys: list[str], prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"cannot infer the architecture: key {key!r} missing from the state dict")
    return tuple(sd[key].shape)


def _infer_vision(sd: Mapping[str, Any], keys: list[str]) -> tuple[VisionConfig, int]:
    if "visual.layer1.0.conv1.weight" in sd:
        layers = tuple(_count_blocks(keys, f"visual.layer{i}.") for i in range(1, 5))
        width = _shape(sd, "visual.layer1.0.conv1.weight")[0]
        grid = round(math.sqrt(_shape(sd, "visual.attnpool.positional_embedding")[0] - 1))
        embed_dim = _shape(sd, "visual.attnpool.c_proj.weight")[0]
        return VisionConfig(image_size=grid * 32, patch_size=None, width=width, layers=layers), embed_dim
    if "visual.class_embedding" not in sd:
        raise CheckpointError(
            "cannot infer the architecture: the state dict has neither a ViT image tower "
            "('visual.class_embedding') nor a modified ResNet ('visual.layer1.0.conv1.weight'); "
            "pass a model name or config instead"
        )
    width, _, patch, _ = _shape(sd, "visual.conv1.weight")
    grid = round(math.sqrt(_shape(sd, "visual.positional_embedding")[0] - 1))
    hidden = _shape(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    ls = "visual.transformer.resblocks.0.ls_1.gamma" in sd
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_count_blocks(keys, "visual.transformer.resblocks."),
        head_width=64 if width % 64 == 0 else width // 16,
        mlp_ratio=hidden / width,
        ls_init_value=1e-5 if ls else None,
        no_ln_pre="visual.ln_pre.weight" not in sd,
    )
    if "visual.attn_pool.query" in sd:  # CoCa's attention pooler
        queries = _shape(sd, "visual.attn_pool.query")[0]
        vision = dataclasses.replace(vision, attentional_pool=True, attn_pooler_queries=queries)
    return vision, _shape(sd, "visual.proj")[1]


def _infer_text(sd: Mapping[str, Any], keys: list[str]) -> tuple[TextConfig, int]:
    vocab, width = _shape(sd, "text.token_embedding.weight")
    hidden = _shape(sd, "text.transformer.resblocks.0.mlp.c_fc.weight")[0]
    proj_bias = "text.text_projection.weight" in sd
    embed_dim = (
        _shape(sd, "text.text_projection.weight")[0] if proj_bias else _shape(sd, "text.text_projection")[1]
    )
    cls = "text.cls_emb" in sd  # CoCa: the class token has its own position after the text
    text = TextConfig(
        context_length=_shape(sd, "text.positional_embedding")[0] - (1 if cls else 0),
        embed_cls=cls,
        vocab_size=vocab,
        width=width,
        heads=max(width // 64, 1),
        layers=_count_blocks(keys, "text.transformer.resblocks."),
        mlp_ratio=hidden / width,
        ls_init_value=1e-5 if "text.transformer.resblocks.0.ls_1.gamma" in sd else None,
        proj_bias=proj_bias,
    )
    return text, embed_dim


def _infer_decoder(sd: Mapping[str, Any], keys: list[str], text: TextConfig) -> MultimodalConfig | None:
    """CoCa's captioning decoder from its shapes (context length: the text tower's, as open_clip's configs)."""
    if "text_decoder.text_projection" not in sd:
        return None
    width, vocab = _shape(sd, "text_decoder.text_projection")
    hidden = _shape(sd, "text_decoder.resblocks.0.mlp.c_fc.weight")[0]
    return MultimodalConfig(
        width=width,
        heads=max(width // 64, 1),
        layers=_count_blocks(keys, "text_decoder.resblocks."),
        mlp_ratio=_exact_ratio(width, hidden / width),
        ls_init_value=1e-5 if "text_decoder.resblocks.0.ls_1.gamma" in sd else None,
        context_length=text.context_length,
        vocab_size=vocab,
    )


def _adopt_coca_conventions(cfg: CLIPConfig) -> CLIPConfig:
    """Pooler and decoder heads are invisible in shapes too: take them from a registered CoCa twin."""
    v, m = cfg.vision, cfg.multimodal
    for known in _builtin_registered():
        if known.multimodal is None:
            continue
        kv = known.vision
        if (kv.width, kv.layers, kv.patch_size, cfg.embed_dim) == (
            v.width,
            v.layers,
            v.patch_size,
            known.embed_dim,
        ):
            v = dataclasses.replace(v, attn_pooler_heads=kv.attn_pooler_heads)
        km = known.multimodal
        if m is not None and (km.width, km.layers) == (m.width, m.layers):
            m = dataclasses.replace(m, heads=km.heads)
    return dataclasses.replace(cfg, vision=v, multimodal=m)


def _adopt_registry_conventions(cfg: CLIPConfig) -> CLIPConfig:
    """Heads are invisible in weight shapes: take them (and exact mlp ratios) from a registered twin."""
    v, t = cfg.vision, cfg.text
    seen_vision = seen_text = False
    for known in _builtin_registered():
        kv, kt = known.vision, known.text
        if (kv.is_resnet, kv.width, kv.layers, kv.patch_size) == (
            v.is_resnet,
            v.width,
            v.layers,
            v.patch_size,
        ):
            hidden_agrees = int(kv.width * kv.mlp_ratio) == int(round(v.width * v.mlp_ratio))
            if not v.is_resnet and hidden_agrees and not seen_vision:
                v, seen_vision = (
                    dataclasses.replace(v, head_width=kv.head_width, mlp_ratio=kv.mlp_ratio),
                    True,
                )
        if (
            (kt.width, kt.layers) == (t.width, t.layers)
            and int(kt.width * kt.mlp_ratio) == int(round(t.width * t.mlp_ratio))
            and not seen_text
        ):
            t, seen_text = dataclasses.replace(t, heads=kt.heads, mlp_ratio=kt.mlp_ratio), True
    return dataclasses.replace(cfg, vision=v, text=t)


def _builtin_registered() -> list[CLIPConfig]:
    """Registered configs with CLIP's own towers, in natural name order (the first twin wins)."""
    from clipforge.model.registry import get_model_config, has_builtin_towers, list_models

    return [get_model_config(n) for n in list_models() if has_builtin_towers(n)]


def _exact_ratio(width: int, ratio: float) -> float:
    """An mlp_ratio with ``int(width * ratio)`` equal to the stored hidden size despite rounding."""
    hidden = round(width * ratio)
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def infer_config(sd: Mapping[str, Any], *, quick_gelu: bool | None = None) -> CLIPConfig:
    """Rebuild a :class:`CLIPConfig` from weight shapes (OpenAI, open_clip or clipforge layout).

    First, the registered architectures whose keys and shapes are exactly the state dict's
    (:mod:`clipforge.checkpoints.signatures`: built on the meta device, cached; the rule for
    several matches is documented there: identical ones are one, ones differing only in input size
    give the smallest, others raise a ``CheckpointError`` asking for the model name). That covers
    every family (timm trunks, custom and Hugging Face text towers, SigLIP, CoCa) and settles what
    shapes cannot show (heads, pooling, masks, activations).

    Otherwise, CLIP's own ViT / modified ResNet layout is read from its shapes: widths, depths,
    patch and image size, context length, vocabulary, embed dim, MLP ratio, LayerScale, logit
    bias; heads from a registered twin, else ``width // 64``. Anything else raises a
    ``CheckpointError`` asking for the model name (and naming registered candidates that could
    not be built here, e.g. a Hugging Face text tower whose config is not available offline).

    QuickGELU is not visible in shapes: OpenAI's TorchScript files are recognised by their scalar
    entries and get ``quick_gelu=True``; otherwise pass ``quick_gelu`` explicitly (default: the
    registered architecture's, else False).
    """
    from clipforge.checkpoints.signatures import choose, registered_matches

    raw = strip_prefixes(_unwrap(sd))
    openai_file = any(k in raw for k in _OPENAI_SCALARS)
    sd = open_clip_to_clipforge(raw) if is_open_clip_state_dict(raw) else raw
    matches = registered_matches(sd)
    if matches.names:
        from clipforge.model.registry import get_model_config

        cfg = get_model_config(choose(matches.names))
    else:
        cfg = _config_from_shapes(sd, matches.unbuildable)
    if quick_gelu is not None:
        cfg = dataclasses.replace(cfg, quick_gelu=quick_gelu)
    elif openai_file:
        cfg = dataclasses.replace(cfg, quick_gelu=True)
    bias = sd.get("logit_bias")
    if isinstance(bias, torch.Tensor) and bias.device.type != "meta":
        cfg = dataclasses.replace(cfg, init_logit_bias=float(bias))
    return cfg.validate()


def _config_from_shapes(sd: Mapping[str, Any], unbuildable: Mapping[str, str]) -> CLIPConfig:
    """CLIP's own ViT/ResNet + text layout read from shapes (see :func:`infer_config`)."""
    keys = list(sd)
    try:
        vision, embed_dim = _infer_vision(sd, keys)
    except CheckpointError as e:
        if not unbuildable:
            raise
        tried = "; ".join(f"{n} ({why})" for n, why in list(unbuildable.items())[:6])
        raise CheckpointError(f"{e}. Registered candidates that could not be built here: {tried}") from None
    text, text_dim = _infer_text(sd, keys)
    if text_dim != embed_dim:
        raise CheckpointError(
            f"image projection gives embed dim {embed_dim} but text projection gives {text_dim}"
        )
    bias = sd.get("logit_bias")
    cfg = CLIPConfig(
        embed_dim=embed_dim,
        vision=vision,
        text=text,
        multimodal=_infer_decoder(sd, keys, text),
        init_logit_bias=-10.0 if isinstance(bias, torch.Tensor) else None,
    )
    cfg = _adopt_registry_conventions(cfg)
    if cfg.vision.attentional_pool or cfg.multimodal is not None:
        cfg = _adopt_coca_conventions(cfg)
    v, t = cfg.vision, cfg.text
    if not v.is_resnet:
        v = dataclasses.replace(v, mlp_ratio=_exact_ratio(v.width, v.mlp_ratio))
    t = dataclasses.replace(t, mlp_ratio=_exact_ratio(t.width, t.mlp_ratio))
    return dataclasses.replace(cfg, vision=v, text=t)
