"""``hf-hub:org/name[/file]`` references, resolved through huggingface_hub's own cache.

The cache is looked at first and the network only when the file is missing. With no network
(or ``HF_HUB_OFFLINE=1``) we fail in about a second with the exact cache path to fill, instead of
letting huggingface_hub retry for half a minute: on an air-gapped cluster the useful answer is
"copy the file here".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipforge.checkpoints.hf import HF_INDEX_FILES, HF_WEIGHT_FILES, shard_names
from clipforge.errors import ConfigError
from clipforge.model import hub_files
from clipforge.model.hub_files import cached_file, hub_file

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
#: Files that describe a repository's model, in the order we look for them.
CONFIG_FILES = ("open_clip_config.json", "config.json")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    filename: str | None = None
    revision: str | None = None


def is_hub_spec(value: object) -> bool:
    return isinstance(value, str) and value.startswith(HF_HUB_PREFIX)


def parse_hub_spec(spec: str) -> HubRef:
    """``hf-hub:org/name``, ``hf-hub:org/name/sub/file.bin``, optional ``@revision`` after the name."""
    body = spec[len(HF_HUB_PREFIX) :] if spec.startswith(HF_HUB_PREFIX) else spec
    parts = [p for p in body.strip().split("/") if p]
    if len(parts) < 2:
        raise ConfigError(f"{spec!r}: expected 'hf-hub:org/name' or 'hf-hub:org/name/file'")
    name, _, revision = parts[1].partition("@")
    filename = "/".join(parts[2:]) or None
    return HubRef(repo_id=f"{parts[0]}/{name}", filename=filename, revision=revision or None)


#: Weight files that go with each config file, preferred first (open_clip prefers safetensors).
WEIGHTS_FOR_CONFIG = {
    "open_clip_config.json": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "config.json": HF_WEIGHT_FILES + HF_INDEX_FILES,
}
#: Plain weight files some repositories hold without any config.
BARE_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
#: Tokenizer files open_clip's Hub repositories ship beside the config (SigLIP, XLM-R, NLLB, mT5
#: towers use a Hugging Face tokenizer read from these); fetched when present, never required.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


@dataclass(frozen=True)
class HubRepoFiles:
    """What an ``hf-hub:org/name`` reference resolved to, file by file (all local paths)."""

    repo_id: str
    config: Path | None  # open_clip_config.json or config.json; None for a bare weights repo
    weights: Path
    tokenizer: tuple[Path, ...] = ()

    @property
    def folder(self) -> Path:
        """The snapshot folder ``load_any`` reads (the weights file itself when they differ)."""
        if self.config is None or self.weights.parent != self.config.parent:
            return self.weights
        return self.config.parent


def _repo_listing(ref: HubRef) -> set[str] | None:
    """The repository's file names (one request), or None offline / on any Hub error."""
    if hub_files.is_offline() or not hub_files.endpoint_reachable():
        return None
    try:
        from huggingface_hub import list_repo_files

        return set(list_repo_files(ref.repo_id, revision=ref.revision))
    except Exception as e:  # auth, 404, network: optional files are simply not fetched
        log.debug("hf-hub:%s: cannot list files (%s)", ref.repo_id, e)
        return None


def _optional_files(
    ref: HubRef, names: Sequence[str], cache_dir: str | os.PathLike | None
) -> tuple[Path, ...]:
    """Those of ``names`` in the cache, plus (online) those the repository has and we lack."""
    found = {n: cached_file(ref.repo_id, n, revision=ref.revision, cache_dir=cache_dir) for n in names}
    missing = [n for n, path in found.items() if path is None]
    listing = _repo_listing(ref) if missing else None
    for name in missing:
        if listing is not None and name in listing:
            found[name] = hub_file(
                ref.repo_id, name, revision=ref.revision, cache_dir=cache_dir, required=False
            )
    return tuple(path for path in found.values() if path is not None)


def _config_and_weights(ref: HubRef, cache_dir: str | os.PathLike | None) -> tuple[Path | None, Path]:
    """open_clip's config first (as open_clip does), else transformers'; then its weights."""
    for config_name in CONFIG_FILES:
        config = hub_file(
            ref.repo_id, config_name, revision=ref.revision, cache_dir=cache_dir, required=False
        )
        if config is None:
            continue
        weights = hub_file(
            ref.repo_id, WEIGHTS_FOR_CONFIG[config_name], revision=ref.revision, cache_dir=cache_dir
        )
        assert weights is not None
        if weights.name.endswith(".index.json"):  # sharded: fetch every shard into the same snapshot
            for shard in shard_names(weights):
                hub_file(ref.repo_id, shard, revision=ref.revision, cache_dir=cache_dir)
        if config_name == "config.json":  # a transformers repo: its image processor settings too
            hub_file(
                ref.repo_id,
                "preprocessor_config.json",
                revision=ref.revision,
                cache_dir=cache_dir,
                required=False,
            )
        return config, weights
    weights = hub_file(ref.repo_id, BARE_WEIGHT_FILES, revision=ref.revision, cache_dir=cache_dir)
    assert weights is not None
    return None, weights


def resolve_hub_files(spec: str, cache_dir: str | os.PathLike | None = None) -> HubRepoFiles:
    """Resolve a bare ``hf-hub:org/name`` repository to its config, weights and tokenizer files.

    Offline (``HF_HUB_OFFLINE=1`` or no network) everything comes from the cache, and a missing
    config or weights file is a ``DownloadError`` naming the cache path to fill.
    """
    ref = parse_hub_spec(spec)
    if ref.filename:
        raise ConfigError(f"{spec!r} names a file; resolve_hub_files takes a repository ('hf-hub:org/name')")
    config, weights = _config_and_weights(ref, cache_dir)
    tokenizer = _optional_files(ref, TOKENIZER_FILES, cache_dir) if config is not None else ()
    return HubRepoFiles(ref.repo_id, config, weights, tokenizer)


def resolve_hub(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file (``hf-hub:org/name/file``) or snapshot folder (``hf-hub:org/name``) for ``spec``.

    For a bare repository the config (open_clip's ``open_clip_config.json`` first, as open_clip
    does, else ``config.json``), the weights that go with it and any tokenizer files beside them
    are fetched, and the snapshot folder returned, which ``load.detect_format`` understands.
    """
    ref = parse_hub_spec(spec)
    if ref.filename:
        path = hub_file(ref.repo_id, ref.filename, revision=ref.revision, cache_dir=cache_dir)
        assert path is not None
        return path
    return resolve_hub_files(spec, cache_dir).folder


def pretrained_file(model: str, tag: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local weights file of a named tag (``("ViT-B-32", "laion2b_s34b_b79k")``): its Hub
    repository's first available file of the tag's ``filenames``, from the cache or downloaded."""
    from clipforge.checkpoints.pretrained import resolve_pretrained

    entry = resolve_pretrained(model, tag)
    path = hub_file(entry.hf_hub, entry.filenames, cache_dir=cache_dir)
    assert path is not None
    return path
