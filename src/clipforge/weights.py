"""Where ``pretrained=`` points: a named tag, ``hf-hub:org/name``, a file or a folder.

This sits above :mod:`clipforge.checkpoints` (which reads each format) and below
:mod:`clipforge.factory` (which builds models): resolving a reference is a lookup across the
pretrained table, the Hub cache and the file system, and must not live in either of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from clipforge.checkpoints.hub import hub_file, is_hub_spec, resolve_hub
from clipforge.checkpoints.load import LoadedCheckpoint, load_any
from clipforge.checkpoints.pretrained import PretrainedWeights, is_pretrained_tag, resolve_pretrained
from clipforge.errors import CheckpointError
from clipforge.model.registry import is_config_file

log = logging.getLogger(__name__)

__all__ = ["Weights", "is_source", "resolve_weights", "source_path"]


@dataclass(frozen=True)
class Weights:
    """Where ``pretrained`` pointed, after resolution."""

    loaded: LoadedCheckpoint
    entry: PretrainedWeights | None = None  # set for named tags


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", "\\", ".")) or value.startswith("~")


def resolve_weights(name: str | None, pretrained: str | Path, cache_dir: str | Path | None = None) -> Weights:
    """Turn ``pretrained`` (tag, ``hf-hub:``, file or folder) into loaded weights.

    A tag needs the architecture ``name`` it is listed under; an existing path always wins over
    a tag of the same spelling, so a local folder named like a tag is never shadowed.
    """
    spec = str(pretrained)
    if name is not None and not Path(spec).expanduser().exists() and is_pretrained_tag(name, spec):
        entry = resolve_pretrained(name, spec)
        path = hub_file(entry.hf_hub, entry.filenames, cache_dir=cache_dir)
        assert path is not None
        log.info("pretrained %s/%s -> %s", name, entry.tag, path)
        return Weights(load_any(path), entry)
    if is_hub_spec(spec):
        return Weights(load_any(resolve_hub(spec, cache_dir=cache_dir)))
    path = Path(spec).expanduser()
    if path.exists():
        return Weights(load_any(path))
    if name is not None and not _looks_like_path(spec):
        resolve_pretrained(name, spec)  # raises a ConfigError listing the known tags
    raise CheckpointError(
        f"pretrained={spec!r}: no such file or directory, and not a known tag or 'hf-hub:' reference"
    )


def is_source(value: str) -> bool:
    """Weights to load (``hf-hub:`` or a path), as opposed to an architecture name or ``*.json``."""
    if is_config_file(value):
        return False
    return is_hub_spec(value) or Path(value).expanduser().exists()


def source_path(source: str) -> Path:
    """The local file or folder a weights source names (an ``hf-hub:`` reference is fetched)."""
    return resolve_hub(source) if is_hub_spec(source) else Path(source).expanduser()
