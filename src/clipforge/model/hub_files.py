"""Files from the Hugging Face Hub, through huggingface_hub's own cache (cache first, network last).

A tower whose architecture is a Hub model (``text.hf_model_name="xlm-roberta-base"``) needs that
model's ``config.json`` to be *built*, so finding one file in the cache is part of building models
and lives here, below :mod:`clipforge.checkpoints.hub` (which resolves whole ``hf-hub:``
repositories of weights on top of it) and :mod:`clipforge.hf_tokenizer`.

With no network (or ``HF_HUB_OFFLINE=1``) a lookup fails in about a second with the exact cache
path to fill, instead of letting huggingface_hub retry for half a minute: on an air-gapped
cluster the useful answer is "copy the file here".
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from clipforge.errors import DownloadError

__all__ = ["cache_path_hint", "cached_file", "endpoint_reachable", "hub_cache_dir", "hub_file", "is_offline"]

_PROBE_TIMEOUT_S = 3.0
_probe_cache: dict[str, tuple[float, bool]] = {}


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache huggingface_hub would use, read from the environment at call time (not import time)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cache_path_hint(repo_id: str, filename: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Where a file must be placed so huggingface_hub finds it offline (its documented layout)."""
    root = hub_cache_dir(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    return f"{root}/snapshots/<commit>/{filename} (and {root}/refs/main containing <commit>)"


def is_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("CLIPFORGE_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def endpoint_reachable() -> bool:
    """A ~3 s reachability probe (cached for a minute) so missing network fails fast."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    cached = _probe_cache.get(endpoint)
    if cached and time.monotonic() - cached[0] < 60:
        return cached[1]
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result = [False]

    def probe() -> None:  # getaddrinfo has no timeout of its own, hence the thread
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
                result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(_PROBE_TIMEOUT_S + 0.5)
    _probe_cache[endpoint] = (time.monotonic(), result[0])
    return result[0]


def cached_file(
    repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, filename, cache_dir=str(hub_cache_dir(cache_dir)), revision=revision
    )
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


def hub_file(
    repo_id: str,
    filenames: str | Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    required: bool = True,
) -> Path | None:
    """Local path of the first of ``filenames`` available in the cache or, if online, downloadable."""
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    for name in names:
        path = cached_file(repo_id, name, revision=revision, cache_dir=cache_dir)
        if path is not None:
            return path
    hints = "; ".join(cache_path_hint(repo_id, n, cache_dir) for n in names)
    if is_offline() or not endpoint_reachable():
        if not required:
            return None
        reason = "HF_HUB_OFFLINE is set" if is_offline() else "the Hugging Face Hub is not reachable"
        raise DownloadError(
            f"hf-hub:{repo_id}: {' or '.join(names)} is not in the local cache and {reason}. "
            f"Download it elsewhere and place it at: {hints}"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in names:
        try:
            local = hf_hub_download(
                repo_id, name, revision=revision, cache_dir=str(hub_cache_dir(cache_dir)), etag_timeout=10
            )
            return Path(local)
        except Exception as e:  # huggingface_hub raises many types (404, auth, network)
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not required:
        return None
    raise DownloadError(
        f"hf-hub:{repo_id}: could not download {' or '.join(names)} ({'; '.join(errors)}). "
        f"To use it offline place it at: {hints}"
    )
