"""Named pretrained weights: the tags open_clip users already type, as a table of facts.

Each entry says where the weights live on the Hugging Face Hub, which files hold them (tried in
order, safetensors first, as open_clip does), and what the weights need from the model and the
preprocessing (QuickGELU for OpenAI-trained towers, mean/std, interpolation, resize mode). Those
facts are the part other libraries lose when weights are loaded by hand, so they travel with the
tag. The rows live in :mod:`clipforge.checkpoints.pretrained_table` (every pair of open_clip
3.3's list, same tag strings, so switching libraries needs no lookup) and, after them,
:mod:`clipforge.checkpoints.pretrained_main` (open_clip main's SigLIP 2 NaFlex pairs); this
module is the lookup.
Importing it is cheap (no torch), so ``clipforge models --pretrained`` answers at once.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any

from clipforge.checkpoints.pretrained_main import MAIN_ROWS
from clipforge.checkpoints.pretrained_table import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    ROWS,
)
from clipforge.errors import ConfigError

__all__ = [
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "OPEN_CLIP_FILES",
    "PretrainedWeights",
    "is_pretrained_tag",
    "list_pretrained",
    "pretrained_entries",
    "pretrained_tags",
    "register_pretrained",
    "resolve_pretrained",
]

#: Files open_clip writes to its Hub repositories; the safetensors one is preferred when present.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class PretrainedWeights:
    """Where one named set of weights lives and what it needs to be used correctly.

    ``image_size`` is the input size the weights were released at when it is not 224 (the
    preprocessing itself always uses the built model's size); ``license`` is the model card's
    licence identifier where known, "" where not recorded. ``naflex_max_patches`` (with
    ``naflex_patch_size``) is set for NaFlex weights: images keep their aspect ratio with at most
    that many patches (open_clip main's ``image_seq_len``) instead of being resized to a square,
    and ``naflex_resize`` says whose resize (``PreprocessConfig.naflex_resize``).
    """

    model: str
    tag: str
    hf_hub: str
    filenames: tuple[str, ...] = OPEN_CLIP_FILES
    quick_gelu: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    image_size: int | None = None
    naflex_max_patches: int | None = None
    naflex_patch_size: int = 16
    naflex_resize: str = "siglip2"
    license: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"hf-hub:{self.hf_hub}"

    def preprocess_dict(self, image_size: int) -> dict[str, Any]:
        """Keyword arguments for ``clipforge.transforms.PreprocessConfig``."""
        naflex = (
            {
                "naflex_max_patches": self.naflex_max_patches,
                "naflex_patch_size": self.naflex_patch_size,
                "naflex_resize": self.naflex_resize,
            }
            if self.naflex_max_patches is not None
            else {}
        )
        return {
            "image_size": image_size,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            **naflex,
        }

    def preprocess_cfg(self, image_size: int | None = None) -> Any:
        """The ``PreprocessConfig`` ``create_model`` attaches for this tag: open_clip's pipeline
        (the weights come from open_clip files) with the tag's facts on top."""
        from clipforge.transforms import PreprocessConfig

        size = image_size or self.image_size or 224
        return PreprocessConfig.from_dict(
            {**PreprocessConfig.defaults_for("open_clip", size), **self.preprocess_dict(size)}
        )

    def as_dict(self) -> dict[str, Any]:
        """The facts as plain values (the shape of ``open_clip.get_pretrained_cfg`` plus ours)."""
        return {k: v for k, v in asdict(self).items() if k != "extra"}


def _clean_tag(tag: str) -> str:
    """open_clip's tag normalisation: case-insensitive, '-' and '_' the same."""
    return tag.strip().lower().replace("-", "_")


def _entry(row: dict[str, Any]) -> PretrainedWeights:
    row = dict(row)
    for key in ("mean", "std", "filenames"):
        if key in row:
            row[key] = tuple(row[key])
    return PretrainedWeights(**row)


_TABLE: dict[str, dict[str, PretrainedWeights]] = {}
for _row in (*ROWS, *MAIN_ROWS):
    _TABLE.setdefault(_row["model"], {})[_clean_tag(_row["tag"])] = _entry(_row)
del _row


def _base(model: str) -> str:
    """The architecture a tag is listed under: ``-quickgelu`` parsed by the registry (one place)."""
    from clipforge.model.registry import split_quickgelu

    return split_quickgelu(model)[0]


def _alias(model: str) -> str:
    from clipforge.model.registry import with_quickgelu

    return with_quickgelu(model, True)


def register_pretrained(weights: PretrainedWeights) -> None:
    """Add or replace a tag (tests and private deployments register their own repositories)."""
    _TABLE.setdefault(_base(weights.model), {})[_clean_tag(weights.tag)] = weights


def list_pretrained(model: str | None = None, *, include_unregistered: bool = False) -> list[tuple[str, str]]:
    """``(model, tag)`` pairs as ``open_clip.list_pretrained()`` gives them: those whose
    architecture is registered (what ``create_model`` can build), in the table's order (grouped by
    family). With every open_clip architecture registered this is open_clip 3.3's 196 pairs
    and open_clip main's two SigLIP 2 NaFlex ones;
    ``include_unregistered`` lists the whole table regardless.

    As open_clip does, every tag trained with QuickGELU is listed a second time under
    ``<model>-quickgelu`` (after all base pairs); ``model`` restricts the list to one name.
    """
    from clipforge.model.registry import list_models

    registered = None if include_unregistered else set(list_models())
    models = [m for m in _TABLE if registered is None or m in registered]
    if model is not None:
        base = _base(model)
        alias = model != base
        tags = _TABLE.get(base, {}) if base in models else {}
        return [(model, t) for t, e in tags.items() if e.quick_gelu or not alias]
    pairs = [(m, t) for m in models for t in _TABLE[m]]
    aliases = [(_alias(m), t) for m in models for t, e in _TABLE[m].items() if e.quick_gelu]
    return pairs + aliases


def pretrained_entries(name_filter: str | None = None) -> list[PretrainedWeights]:
    """Every base entry (no ``-quickgelu`` duplicates), optionally those whose model name contains
    ``name_filter`` (case-insensitive): what ``clipforge models --pretrained`` prints."""
    needle = (name_filter or "").lower()
    return [e for m, tags in _TABLE.items() if needle in m.lower() for e in tags.values()]


def pretrained_tags(model: str) -> list[str]:
    return list(_TABLE.get(_base(model), {}))


def is_pretrained_tag(model: str | None, tag: str) -> bool:
    return model is not None and _clean_tag(tag) in _TABLE.get(_base(model), {})


def resolve_pretrained(model: str, tag: str) -> PretrainedWeights:
    """The table entry for ``(model, tag)``, or a ``ConfigError`` listing the tags that exist."""
    base = _base(model)
    tags = _TABLE.get(base, {})
    entry = tags.get(_clean_tag(tag))
    if entry is not None:
        return entry
    if not tags:
        close = difflib.get_close_matches(base, list(_TABLE), n=3)
        hint = f" Models with named weights close to it: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"No pretrained weights are known for model {model!r}.{hint} `clipforge models --pretrained` "
            f"lists all {len(_TABLE)}; or pass a file, a directory or 'hf-hub:org/name' instead."
        )
    close = difflib.get_close_matches(_clean_tag(tag), list(tags), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"Unknown pretrained tag {tag!r} for {model}.{hint} Known tags: {', '.join(tags)}")
