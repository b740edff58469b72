"""Which registered architectures a state dict fits, by its key -> shape signature.

A timm trunk, a custom text tower or a Hugging Face encoder cannot be read back from weight
shapes the way CLIP's own ViT/ResNet can, but every registered architecture can be *built* on
the meta device (no memory, no random numbers) and its state dict's keys and shapes compared
with the checkpoint's. Building costs ~0.1-2 s per tower, so candidates are first narrowed by
facts that are free to read on both sides (tower kinds, the text embedding's shape, context
length, depth, ViT patch and width, projection width, logit bias) and each tower's signature is
cached per (tower config, embed dim) for the life of the process: names sharing a tower (e.g.
the same timm trunk at several sizes) build it once.

Choosing among exact matches (:func:`choose`), documented rule:

1. candidates with the same architecture (every field that changes the computation, see
   :func:`clipforge.model.architecture.same_architecture`) are one candidate;
2. if the rest differ only in ``vision.image_size`` (trunks whose weights do not depend on the
   input size, e.g. ``convnext_base_w`` and ``convnext_base_w_320``), the smallest image size is
   chosen and a warning names the others;
3. otherwise the difference is invisible in shapes but changes what the model computes (GELU vs
   its tanh approximation, causal mask or not, pooling, LayerNorm epsilon, another timm variant):
   a ``CheckpointError`` lists the candidates and asks for the model name.

QuickGELU is never decided here: ``-quickgelu`` is an alias of a registered name, and the caller
(``infer_config``) applies what the file format proves or the user asks.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig

log = logging.getLogger(__name__)

Signature = frozenset  # of (key, shape) pairs


def signature_of(sd: Mapping[str, Any]) -> Signature:
    """The ``{(key, shape)}`` set of a state dict (clipforge names; tensors or anything with ``shape``)."""
    return frozenset((k, tuple(v.shape)) for k, v in sd.items() if hasattr(v, "shape"))


@dataclass(frozen=True)
class _Facts:
    """What a state dict says cheaply about its architecture (None: not readable)."""

    image: str  # "timm" | "resnet" | "vit" | "?"
    hf_text: bool
    text_embedding: tuple[int, ...] | None  # (vocab, width) of the built-in text tower
    text_positions: int | None
    text_layers: int | None
    vit_conv: tuple[int, ...] | None  # (width, 3, patch, patch)
    embed_dim: int | None
    logit_bias: bool
    coca: bool

    @classmethod
    def read(cls, sd: Mapping[str, Any]) -> _Facts:
        def shape(key: str) -> tuple[int, ...] | None:
            return tuple(sd[key].shape) if key in sd else None

        keys = list(sd)
        image = (
            "timm" if any(k.startswith("visual.trunk.") for k in keys)
            else "resnet" if "visual.layer1.0.conv1.weight" in sd
            else "vit" if "visual.conv1.weight" in sd
            else "?"
        )  # fmt: skip
        embedding = shape("text.token_embedding.weight")
        layers = {m.group(1) for k in keys if (m := re.match(r"text\.transformer\.resblocks\.(\d+)\.", k))}
        positions = shape("text.positional_embedding")
        return cls(
            image=image,
            hf_text=embedding is None and any(k.startswith("text.transformer.") for k in keys),
            text_embedding=embedding,
            text_positions=positions[0] if positions else None,
            text_layers=len(layers) if embedding is not None else None,
            vit_conv=shape("visual.conv1.weight"),
            embed_dim=_text_embed_dim(sd),
            logit_bias="logit_bias" in sd,
            coca=any(k.startswith("text_decoder.") for k in keys),
        )

    def admits(self, cfg: CLIPConfig) -> bool:
        """False when ``cfg`` certainly builds other shapes (never False for a real match)."""
        v, t = cfg.vision, cfg.text
        kind = "timm" if v.timm_model_name else "resnet" if v.is_resnet else "vit"
        if kind != self.image or bool(t.hf_model_name) != self.hf_text:
            return False
        if (cfg.init_logit_bias is not None) != self.logit_bias or cfg.is_coca != self.coca:
            return False
        if self.embed_dim is not None and self.embed_dim != cfg.embed_dim:
            return False
        if self.text_embedding is not None and (
            self.text_embedding != (t.vocab_size, t.width)
            or self.text_positions != t.context_length + (1 if t.embed_cls else 0)
            or self.text_layers != t.layers
        ):
            return False
        if kind == "vit" and self.vit_conv != (v.width, 3, v.patch_size, v.patch_size):
            return False
        return True


def _text_embed_dim(sd: Mapping[str, Any]) -> int | None:
    """The joint embedding width from the built-in text projection, when it has one."""
    if "text.text_projection.weight" in sd:
        return int(sd["text.text_projection.weight"].shape[0])
    if "text.text_projection" in sd:
        return int(sd["text.text_projection"].shape[-1])
    return None


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


@functools.cache
def _tower_signature(tower: str, cfg_json: str, embed_dim: int) -> Signature | str:
    """One tower's signature under its model prefix, or why it could not be built (a string)."""
    from clipforge.model.clip import build_image_tower, build_text_tower
    from clipforge.model.config import TextConfig, VisionConfig

    data = json.loads(cfg_json)
    try:
        with torch.device("meta"):
            if tower == "visual":
                if isinstance(data.get("layers"), list):
                    data["layers"] = tuple(data["layers"])
                module = build_image_tower(VisionConfig(**data), embed_dim)
            else:
                module = build_text_tower(TextConfig(**data), embed_dim)
    except Exception as e:  # noqa: BLE001 - any failure means "not buildable here", reported by name
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    return frozenset((f"{tower}.{k}", tuple(v.shape)) for k, v in module.state_dict().items())


@functools.cache
def _whole_model_signature(cfg_json: str) -> Signature | str:
    """CoCa's decoder is only built with the whole model, so it is signed whole."""
    from clipforge.model.build import build_model

    try:
        with torch.device("meta"):
            model = build_model(CLIPConfig.from_dict(json.loads(cfg_json)))
    except Exception as e:  # noqa: BLE001 - as in _tower_signature
        return f"{type(e).__name__}: {e}"[:300]
    return signature_of(model.state_dict())


def model_signature(cfg: CLIPConfig) -> Signature | str:
    """The state-dict signature ``cfg`` builds (cached), or why it could not be built."""
    if cfg.is_coca:
        return _whole_model_signature(_json(cfg.to_dict()))
    parts = []
    for tower, sub in (("visual", cfg.vision), ("text", cfg.text)):
        sig = _tower_signature(tower, _json(asdict(sub)), cfg.embed_dim)
        if isinstance(sig, str):
            return sig
        parts.append(sig)
    extra = {("logit_scale", ())} | ({("logit_bias", ())} if cfg.init_logit_bias is not None else set())
    return frozenset().union(*parts, extra)


@dataclass
class Matches:
    """Registered names whose signature equals the state dict's, and those that could not be built."""

    names: list[str]
    unbuildable: dict[str, str]


def registered_matches(sd: Mapping[str, Any]) -> Matches:
    """Registered architectures (natural order) that build exactly ``sd``'s keys and shapes.

    Candidates the cheap facts admit are built, except those whose stored image-tower hash
    (``architectures.json``) differs from the checkpoint's: those are built only when nothing
    else matched (the stored hashes describe open_clip's layout; a stale one costs time, never a
    wrong answer).
    """
    from clipforge.model.registry import IMAGE_TOWER_HASHES, get_model_config, list_models

    facts, target = _Facts.read(sd), signature_of(sd)
    admitted = [n for n in list_models() if facts.admits(get_model_config(n))]
    image_hash = image_tower_hash(sd)
    unlikely = [n for n in admitted if IMAGE_TOWER_HASHES.get(n, image_hash) != image_hash]
    matches = _exact(target, [n for n in admitted if n not in unlikely])
    if not matches.names and unlikely:
        later = _exact(target, unlikely)
        matches = Matches(later.names, {**matches.unbuildable, **later.unbuildable})
    return matches


def _exact(target: Signature, names: list[str]) -> Matches:
    from clipforge.model.registry import get_model_config

    found, unbuildable = [], {}
    for name in names:
        sig = model_signature(get_model_config(name))
        if isinstance(sig, str):
            unbuildable[name] = sig
        elif sig == target:
            found.append(name)
    return Matches(found, unbuildable)


def choose(names: list[str]) -> str:
    """The one architecture to build among exact matches (rule in the module docstring)."""
    from clipforge.model.architecture import same_architecture
    from clipforge.model.registry import get_model_config

    configs = {n: get_model_config(n) for n in names}
    distinct: list[str] = []
    for name in names:
        if not any(same_architecture(configs[name], configs[d]) for d in distinct):
            distinct.append(name)
    if len(distinct) == 1:
        return distinct[0]
    sizes = {n: configs[n].vision.image_size for n in distinct}
    first = min(distinct, key=lambda n: (sizes[n], len(n)))
    if all(
        same_architecture(configs[n].replace(vision={"image_size": sizes[first]}), configs[first])
        for n in distinct
    ):
        others = ", ".join(f"{n} ({sizes[n]} px)" for n in distinct if n != first)
        log.warning(
            "the weights fit %s (%d px) and also %s, which differ only in input size; using %s "
            "(pass the model name to choose another)",
            first,
            sizes[first],
            others,
            first,
        )
        return first
    raise CheckpointError(
        "the weights' keys and shapes fit several registered architectures that compute differently "
        f"({', '.join(distinct)}): the difference (activation, masking, pooling, normalisation or the "
        "timm variant) is not visible in the weights. Pass the model name, e.g. "
        f"create_model({distinct[0]!r}, pretrained=...) or --model {distinct[0]}"
    )


def image_tower_hash(sd: Mapping[str, Any]) -> str:
    """A short hash of the image tower's ``(key, shape)`` pairs (clipforge names).

    ``tools/gen_architectures.py`` stores each architecture's, taken from open_clip's own model,
    in ``architectures.json``: a checkpoint's hash then says which timm trunks are worth building
    (building one costs seconds), before the exact comparison decides.
    """
    import hashlib

    lines = sorted(
        f"{k}:{list(v.shape)}" for k, v in sd.items() if k.startswith("visual.") and hasattr(v, "shape")
    )
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]
