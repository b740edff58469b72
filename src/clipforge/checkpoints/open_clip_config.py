"""open_clip's model config (``model_cfg``: ``embed_dim``, ``vision_cfg``, ``text_cfg``) <-> ``CLIPConfig``.

Both directions live here so a field is renamed in one place: :func:`config_from_open_clip` reads
open_clip's JSON configs and Hub repos, :func:`config_to_open_clip` writes them (its inverse on
every registered architecture). Features open_clip has and clipforge does not implement are
refused by name rather than mapped to the wrong computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.config import CLIPConfig

__all__ = ["config_from_open_clip", "config_to_open_clip", "multimodal_from_open_clip"]

# --- open_clip -> clipforge -------------------------------------------------------------------------
_VISION_MAP = (
    "image_size layers width patch_size head_width mlp_ratio ls_init_value patch_dropout no_ln_pre "
    "final_ln_after_pool pool_type timm_model_name timm_pool timm_proj timm_proj_bias timm_drop "
    "timm_drop_path attentional_pool attn_pooler_queries attn_pooler_heads"
).split()
_TEXT_MAP = (
    "context_length vocab_size width heads layers mlp_ratio ls_init_value pad_id pool_type proj_bias "
    "proj_type eos_id no_causal_mask hf_model_name hf_pooler_type hf_proj_type hf_tokenizer_name "
    "tokenizer_kwargs embed_cls correct_cls_mask"
).split()
# open_clip features clipforge does not implement: refuse when set, rather than load wrong math.
_UNSUPPORTED = {
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "pos_embed_type": "learnable",
}
# open_clip main (after 3.3): its ModernText tower and variable-length text; refused by name
# rather than read as the CLIP text tower they are not.
_UNSUPPORTED_TEXT = {"text_arch": "clip", "variable_text": False}


def config_from_open_clip(model_cfg: Mapping[str, Any], source: str = "open_clip_config.json") -> CLIPConfig:
    """A ``CLIPConfig`` from open_clip's ``model_cfg`` (as in its JSON configs and Hub repos)."""
    v_in, t_in = dict(model_cfg.get("vision_cfg") or {}), dict(model_cfg.get("text_cfg") or {})
    for where, sub in (("vision_cfg", v_in), ("text_cfg", t_in)):
        for name, default in _UNSUPPORTED.items():
            if name in sub and sub[name] not in (default, None):
                raise CheckpointError(f"{source}: {where}.{name}={sub[name]!r} is not supported by clipforge")
        if isinstance(sub.get("attentional_pool"), str):  # open_clip's WIP 'parallel'/'cascade' pools
            raise CheckpointError(
                f"{source}: {where}.attentional_pool={sub['attentional_pool']!r} is not supported by "
                "clipforge (only open_clip's original CoCa pooler, attentional_pool=true)"
            )
        if where == "text_cfg" and sub.get("final_ln_after_pool"):
            raise CheckpointError(f"{source}: text_cfg.final_ln_after_pool is not supported by clipforge")
    for name, default in _UNSUPPORTED_TEXT.items():
        if t_in.get(name, default) != default:
            raise CheckpointError(f"{source}: text_cfg.{name}={t_in[name]!r} is not supported by clipforge")
    vision = {k: v_in[k] for k in _VISION_MAP if k in v_in}
    vision.update(_timm_model_kwargs(v_in))
    if isinstance(vision.get("image_size"), (list, tuple)):
        h, w = vision["image_size"]
        if h != w:
            raise CheckpointError(f"{source}: non-square image_size {h}x{w} is not supported")
        vision["image_size"] = h
    if isinstance(vision.get("layers"), (list, tuple)):
        vision["patch_size"] = None  # modified ResNet
    else:
        vision.setdefault("patch_size", 16)  # open_clip's default when omitted
    if v_in.get("timm_model_pretrained"):
        vision["timm_pretrained"] = True
    if "timm_proj" in vision and not vision["timm_proj"]:
        vision["timm_proj"] = "head"  # open_clip: null / "" = timm's own classifier head projects
    text = {k: t_in[k] for k in _TEXT_MAP if k in t_in}
    text.update(_text_kwargs(t_in, source))
    if text.get("hf_model_name"):
        text.setdefault("hf_proj_type", "mlp")  # open_clip's CLIPTextCfg default, unlike clipforge's
    try:
        return CLIPConfig.from_dict(
            {
                "embed_dim": model_cfg.get("embed_dim", 512),
                "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                # open_clip builds every Hugging Face text tower as CustomTextCLIP
                "custom_text": bool(model_cfg.get("custom_text", False) or t_in.get("hf_model_name")),
                **{k: model_cfg[k] for k in ("init_logit_scale", "init_logit_bias") if k in model_cfg},
                "vision": vision,
                "text": text,
                "multimodal": multimodal_from_open_clip(model_cfg.get("multimodal_cfg"), t_in),
            },
            source=source,
        )
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _timm_model_kwargs(v_in: Mapping[str, Any]) -> dict[str, Any]:
    """open_clip main's ``timm_model_kwargs`` (extra ``timm.create_model`` arguments) as clipforge's
    ``timm_kwargs``; a ``patch_size`` there is the tower's patch size too (open_clip 3.3 has neither)."""
    kwargs = dict(v_in.get("timm_model_kwargs") or {})
    if not kwargs:
        return {}
    return {"timm_kwargs": kwargs, **({"patch_size": kwargs["patch_size"]} if "patch_size" in kwargs else {})}


def _text_kwargs(t_in: Mapping[str, Any], source: str) -> dict[str, Any]:
    """open_clip's ``norm_kwargs``/``act_kwargs`` and ``*_pooler`` names as clipforge fields."""
    out: dict[str, Any] = {}
    norm = dict(t_in.get("norm_kwargs") or {})
    act = dict(t_in.get("act_kwargs") or {})
    if set(norm) - {"eps"} or set(act) - {"approximate"}:
        raise CheckpointError(
            f"{source}: text_cfg norm_kwargs {norm} / act_kwargs {act}: only eps and approximate are supported"
        )
    if "eps" in norm:
        out["norm_eps"] = float(norm["eps"])
    if "approximate" in act:
        out["act_approximate"] = act["approximate"]
    pooler = t_in.get("hf_pooler_type")
    if isinstance(pooler, str) and pooler.endswith("_pooler"):
        out["hf_pooler_type"] = pooler.removesuffix("_pooler")
    if t_in.get("hf_model_name"):  # open_clip's default projection is an MLP; null = identity
        proj = t_in.get("hf_proj_type", "mlp")
        out["hf_proj_type"] = "none" if proj is None else proj
    return out


def multimodal_from_open_clip(
    multimodal_cfg: Mapping[str, Any] | None, text_cfg: Mapping[str, Any]
) -> dict[str, Any] | None:
    """clipforge's ``multimodal`` fields from open_clip's ``multimodal_cfg`` (None for a plain CLIP).

    Defaults are open_clip's ``MultimodalCfg``'s; the vocabulary is the text tower's, as open_clip's
    CoCa builds its LM head. ``dim_head``, ``n_queries`` and ``attn_pooler_heads`` there do not
    reach open_clip's decoder, so they are not read.
    """
    if not multimodal_cfg:
        return None
    return {
        "width": multimodal_cfg.get("width", 512),
        "heads": multimodal_cfg.get("heads", 8),
        "layers": multimodal_cfg.get("layers", 12),
        "mlp_ratio": float(multimodal_cfg.get("mlp_ratio", 4)),
        "ls_init_value": multimodal_cfg.get("ls_init_value"),
        "context_length": multimodal_cfg.get("context_length", 77),
        "vocab_size": text_cfg.get("vocab_size", 49408),
    }


# --- clipforge -> open_clip -------------------------------------------------------------------------
def config_to_open_clip(cfg: CLIPConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` dict for ``cfg`` (the inverse of :func:`config_from_open_clip`).

    Every field is written in open_clip's names and meanings: ``timm_proj='head'`` is open_clip's
    ``timm_proj: null``, ``norm_eps``/``act_approximate`` are ``norm_kwargs``/``act_kwargs``, the
    Hugging Face pooler gets its ``_pooler`` suffix back, and ``custom_text`` says which model
    class open_clip builds. A field open_clip has no name for (``vision.timm_kwargs``) is refused.
    """
    out: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": _vision_to_open_clip(cfg.vision),
        "text_cfg": _text_to_open_clip(cfg.text),
    }
    if cfg.quick_gelu:
        out["quick_gelu"] = True
    if cfg.init_logit_bias is not None:
        out["init_logit_bias"] = cfg.init_logit_bias
    if cfg.init_logit_scale != _DEFAULT.init_logit_scale:
        out["init_logit_scale"] = cfg.init_logit_scale
    if cfg.custom_text or cfg.text.hf_model_name:
        out["custom_text"] = True
    if cfg.multimodal is not None:
        m = cfg.multimodal
        out["multimodal_cfg"] = {
            "width": m.width, "heads": m.heads, "layers": m.layers, "mlp_ratio": m.mlp_ratio,
            "context_length": m.context_length, "vocab_size": m.vocab_size,
            **({"ls_init_value": m.ls_init_value} if m.ls_init_value is not None else {}),
        }  # fmt: skip
    return out


_DEFAULT = CLIPConfig()
#: Fields written only when they differ from the default (the same in both libraries).
_VISION_OPTIONAL = (
    "head_width mlp_ratio ls_init_value patch_dropout no_ln_pre final_ln_after_pool pool_type "
    "attentional_pool attn_pooler_queries attn_pooler_heads"
).split()
_TIMM_FIELDS = "timm_pool timm_proj_bias timm_drop timm_drop_path".split()
_TEXT_OPTIONAL = (
    "mlp_ratio ls_init_value pad_id eos_id pool_type proj_bias proj_type no_causal_mask embed_cls "
    "correct_cls_mask hf_tokenizer_name"
).split()


def _vision_to_open_clip(v: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"image_size": v.image_size}
    if v.timm_model_name:
        if v.timm_kwargs:
            raise ConfigError(
                f"vision.timm_kwargs {v.timm_kwargs} has no open_clip equivalent: an open_clip config "
                "cannot describe this timm tower (write the state dict alone, or to clipforge's format)"
            )
        out.update(timm_model_name=v.timm_model_name, timm_model_pretrained=bool(v.timm_pretrained))
        out["timm_proj"] = None if v.timm_proj == "head" else v.timm_proj
        out.update({k: getattr(v, k) for k in _TIMM_FIELDS})
        return out
    out.update(layers=list(v.layers) if v.is_resnet else v.layers, width=v.width)
    if v.is_resnet:
        return out
    out["patch_size"] = v.patch_size
    default = _DEFAULT.vision
    out.update({k: getattr(v, k) for k in _VISION_OPTIONAL if getattr(v, k) != getattr(default, k)})
    return out


def _text_to_open_clip(t: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"context_length": t.context_length, "vocab_size": t.vocab_size}
    if t.hf_model_name:
        out.update(
            hf_model_name=t.hf_model_name,
            hf_model_pretrained=False,  # the weights come from the checkpoint, not the Hub
            hf_pooler_type=f"{t.hf_pooler_type}_pooler",
            hf_proj_type=t.hf_proj_type,
        )
    else:
        out.update(width=t.width, heads=t.heads, layers=t.layers)
    default = _DEFAULT.text
    out.update({k: getattr(t, k) for k in _TEXT_OPTIONAL if getattr(t, k) != getattr(default, k)})
    if t.tokenizer_kwargs:
        out["tokenizer_kwargs"] = dict(t.tokenizer_kwargs)
    if t.norm_eps != default.norm_eps:
        out["norm_kwargs"] = {"eps": t.norm_eps}
    if t.act_approximate != default.act_approximate:
        out["act_kwargs"] = {"approximate": t.act_approximate}
    return out
