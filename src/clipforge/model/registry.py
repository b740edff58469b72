"""Named architectures.

The published architectures are open_clip's, under open_clip's names, with their
hyper-parameters (facts about the released models) in ``architectures.json`` in clipforge's own
config form; ``tools/gen_architectures.py`` wrote it from open_clip's model configs, so weights
released for a name load into the model built from that name. ``<name>-quickgelu`` is ``<name>``
with QuickGELU, as in open_clip. Tiny entries (registered below) keep the structure of the real
towers at a size the test suite and the CPU demo can afford.

Some architectures need files from elsewhere to be *built* (not to be listed): a Hugging Face
text tower (``text.hf_model_name``, e.g. ``"xlm-roberta-base"``) needs that model's config, from
a local folder or the Hugging Face cache; a timm image tower needs ``timm`` installed.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from clipforge.errors import ConfigError
from clipforge.model.config import CLIPConfig, MultimodalConfig, TextConfig, VisionConfig

_REGISTRY: dict[str, CLIPConfig] = {}
_DATA = Path(__file__).with_name("architectures.json")
#: name -> hash of the image tower's keys and shapes in the published weights (see
#: ``clipforge.checkpoints.signatures.image_tower_hash``): lets shape inference skip building
#: timm trunks that cannot match.
IMAGE_TOWER_HASHES: dict[str, str] = {}


def register_model(name: str, config: CLIPConfig) -> None:
    """Add an architecture; user code can register its own before calling ``create_model``."""
    _REGISTRY[name] = config.validate()


def list_models() -> list[str]:
    """Every registered name in natural order (``-quickgelu`` aliases are not listed separately)."""
    return sorted(_REGISTRY, key=_natural_key)


def get_model_config(name: str) -> CLIPConfig:
    """A fresh copy, so callers may mutate it without touching the registry.

    ``name`` may also be a ``*.json`` file (clipforge's or open_clip's model config), so every
    place that takes an architecture name takes a file too.
    """
    from clipforge.model.architecture import is_config_file, read_config_file

    if is_config_file(name):
        return read_config_file(name)
    key = name if name in _REGISTRY else name.removesuffix("-quickgelu")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"Unknown model {name!r}.{hint} {len(_REGISTRY)} architectures are registered; "
            "list them with `clipforge models` (or clipforge.list_models())"
        )
    cfg = CLIPConfig.from_dict(_REGISTRY[key].to_dict())
    if name.endswith("-quickgelu"):
        cfg.quick_gelu = True
    return cfg


def tower_kinds(cfg: CLIPConfig) -> tuple[str, str]:
    """``(image tower, text tower)`` in words: ``"vit"``/``"resnet"``/``"timm:<name>"`` and
    ``"text"``/``"hf:<hub id>"``; what ``clipforge models`` shows for towers it cannot size cheaply."""
    v, t = cfg.vision, cfg.text
    image = f"timm:{v.timm_model_name}" if v.timm_model_name else ("resnet" if v.is_resnet else "vit")
    return image, f"hf:{t.hf_model_name}" if t.hf_model_name else "text"


def has_builtin_towers(name: str) -> bool:
    """True when both towers are clipforge's own (no timm trunk, no Hugging Face encoder)."""
    cfg = _REGISTRY[name.removesuffix("-quickgelu") if name not in _REGISTRY else name]
    return cfg.vision.timm_model_name is None and cfg.text.hf_model_name is None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p)


def _load_published() -> None:
    """Register every architecture of ``architectures.json`` (validated like any config)."""
    try:
        document = json.loads(_DATA.read_text(encoding="utf-8"))
        table = document["architectures"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{_DATA}: cannot read the architecture table ({e}); reinstall clipforge") from None
    IMAGE_TOWER_HASHES.update(document.get("image_tower_hashes") or {})
    for name, data in table.items():
        register_model(name, CLIPConfig.from_dict(data, source=f"{_DATA.name}: {name}"))


_load_published()

# --- tiny sizes for tests and the CPU demo (same structure, small widths) ----------------------
register_model(
    "tiny-vit",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
)
register_model(
    "tiny-rn",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, patch_size=None, width=16, layers=(1, 1, 1, 1)),
        text=TextConfig(width=64, heads=2, layers=2),
    ),
)
register_model(
    "tiny-vit-siglip",
    CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=TextConfig(width=64, heads=2, layers=2),
        init_logit_scale=2.302585092994046,  # log(10), as in SigLIP
        init_logit_bias=-10.0,
    ),
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
