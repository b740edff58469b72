"""Named architectures.

The published architectures are open_clip's, under open_clip's names, with their
hyper-parameters (facts about the released models) in ``architectures.json`` in clipforge's own
config form; ``tools/gen_architectures.py`` wrote it from open_clip's model configs, so weights
released for a name load into the model built from that name. ``architectures_main.json`` adds, in
the same form, the architectures open_clip's main branch has with published weights that 3.3 lacks
(SigLIP 2 NaFlex on timm's ``NaFlexVit``; ``tools/gen_main_architectures.py``). ``<name>-quickgelu`` is ``<name>``
with QuickGELU, as in open_clip. Tiny entries (registered below) keep the structure of the real
towers at a size the test suite and the CPU demo can afford.

Some architectures need files from elsewhere to be *built* (not to be listed): a Hugging Face
text tower (``text.hf_model_name``, e.g. ``"xlm-roberta-base"``) needs that model's config, from
a local folder or the Hugging Face cache; a timm image tower needs ``timm`` installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from pathlib import Path

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig

_REGISTRY: dict[str, CLIPConfig] = {}
_DATA = Path(__file__).with_name("architectures.json")
_DATA_MAIN = Path(__file__).with_name("architectures_main.json")
#: name -> hash of the image tower's keys and shapes in the published weights (see
#: ``clipforge.checkpoints.signatures.image_tower_hash``): lets shape inference skip building
#: timm trunks that cannot match.
IMAGE_TOWER_HASHES: dict[str, str] = {}


def register_model(name: str, config: CLIPConfig) -> None:
    """Add an architecture; user code can register its own before calling ``create_model``."""
    _REGISTRY[name] = config.validate()


def is_config_file(value: object) -> bool:
    """True for a ``*.json`` path: a model architecture given as a file, not a name or weights."""
    return isinstance(value, (str, Path)) and str(value).lower().endswith(".json")


def list_models() -> list[str]:
    """Every registered name in natural order (``-quickgelu`` aliases are not listed separately)."""
    return sorted(_REGISTRY, key=_natural_key)


QUICKGELU_SUFFIX = "-quickgelu"


def split_quickgelu(name: str) -> tuple[str, bool]:
    """``("ViT-B-32", True)`` for ``"ViT-B-32-quickgelu"``: the one place the suffix is parsed.

    A name registered *with* the suffix is its own architecture and is returned whole.
    """
    if name in _REGISTRY or not name.endswith(QUICKGELU_SUFFIX):
        return name, False
    return name.removesuffix(QUICKGELU_SUFFIX), True


def with_quickgelu(name: str, quick_gelu: bool) -> str:
    """The name to record for architecture ``name`` with QuickGELU on or off (``-quickgelu`` appended)."""
    return f"{name}{QUICKGELU_SUFFIX}" if quick_gelu else name


def get_model_config(name: str) -> CLIPConfig:
    """The config registered under ``name`` (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``).

    Configs are frozen, so the registry's own instance is returned and shared safely (change one
    with ``dataclasses.replace`` or ``cfg.replace``). Architectures given as ``*.json`` files are
    read by :func:`clipforge.get_model_config` (``clipforge.factory``): the file formats belong to
    ``checkpoints/``, above this module.
    """
    if is_config_file(name):
        raise ConfigError(
            f"{name!r} is a model config file: read it with clipforge.get_model_config "
            "(clipforge.factory), which knows the file formats"
        )
    key, quick = split_quickgelu(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown model {name!r}.{hint} {len(_REGISTRY)} architectures are registered; "
            "list them with `clipforge models` (or clipforge.list_models())"
        )
    cfg = _REGISTRY[key]
    return dataclasses.replace(cfg, quick_gelu=True) if quick else cfg


def tower_kinds(cfg: CLIPConfig) -> tuple[str, str]:
    """``(image tower, text tower)`` in words: ``"vit"``/``"resnet"``/``"timm:<name>"`` and
    ``"text"``/``"hf:<hub id>"``; what ``clipforge models`` shows for towers it cannot size cheaply."""
    v, t = cfg.vision, cfg.text
    image = f"timm:{v.timm_model_name}" if v.timm_model_name else ("resnet" if v.is_resnet else "vit")
    return image, f"hf:{t.hf_model_name}" if t.hf_model_name else "text"


def has_builtin_towers(name: str) -> bool:
    """True when both towers are clipforge's own (no timm trunk, no Hugging Face encoder)."""
    cfg = _REGISTRY[split_quickgelu(name)[0]]
    return cfg.vision.timm_model_name is None and cfg.text.hf_model_name is None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _load_published(path: Path) -> None:
    """Register every architecture of a table file (validated like any config)."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        table = document["architectures"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: cannot read the architecture table ({e}); reinstall clipforge") from None
    IMAGE_TOWER_HASHES.update(document.get("image_tower_hashes") or {})
    for name, data in table.items():
        register_model(name, CLIPConfig.from_dict(data, source=f"{path.name}: {name}"))


_load_published(_DATA)
_load_published(_DATA_MAIN)

# --- tiny sizes for tests and the CPU demo (same structure, small widths) ----------------------
_TINY_VIT = CLIPConfig(
    embed_dim=64,
    vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text=TextConfig(width=64, heads=2, layers=2),
)
register_model("tiny-vit", _TINY_VIT)
register_model(
    "tiny-rn",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=None, width=16, layers=(1, 1, 1, 1)),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
)
# tiny-vit with SigLIP's initial temperature log(10) and bias -10 (the towers stay tiny-vit's).
register_model(
    "tiny-vit-siglip",
    dataclasses.replace(_TINY_VIT, init_logit_scale=2.302585092994046, init_logit_bias=-10.0),
)
register_model(
    "tiny-coca",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(
            image_size=32,
            patch_size=8,
            width=64,
            layers=2,
            head_width=32,
            attentional_pool=True,
            attn_pooler_queries=8,
            attn_pooler_heads=2,
        ),
        text=TextConfig(context_length=32, width=64, heads=2, layers=2, embed_cls=True),
        multimodal=MultimodalConfig(width=64, heads=2, layers=2, context_length=32),
    ),
)

# --- tiny instances of the timm-built families (SigLIP, ConvNeXt, EVA-02, MobileCLIP, PE) -------
from clipforge.model.zoo_tiny import register_tiny_models  # noqa: E402

register_tiny_models(register_model)
