"""Write a file so that it is either wholly there or not there at all.

Every writer in clipforge (checkpoints, manifests, shards, indexes, reports, ONNX files, training
state) goes through here: data goes to a temporary file in the destination folder, which is
fsynced and then renamed over the real name with ``os.replace``. A crash, SIGKILL or full disk
leaves the old file (or none), never a truncated one under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

__all__ = [
    "atomic_dir",
    "atomic_path",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "fsync_dir",
    "replace_file",
    "staging_dir",
]


def _read_umask() -> int:
    """The process umask, read once at import (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp/mkdtemp create private (0600/0700) entries; a written file should get the permissions an
#: ordinary ``open(path, "w")`` would have given it (0644/0755 under the usual umask).
_UMASK = _read_umask()


def fsync_dir(directory: Path) -> None:
    """Persist the rename itself; best effort because not every platform can open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_file(src: PathLike, dst: PathLike) -> None:
    """Move a finished file over ``dst``: fsync its data, ``os.replace``, fsync the folder.

    For writers that must produce a file under a name of their own first (an ONNX graph
    records its weights file's name inside it); everything else uses :func:`atomic_path`.
    """
    with open(src, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    For libraries that insist on writing to a path themselves (safetensors, torch.save). The
    temporary lives in the same directory so ``os.replace`` is a same-filesystem atomic rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)  # after the writer: some (safetensors) recreate the file as 0600
        replace_file(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def staging_dir(parent: PathLike, name: str) -> Iterator[Path]:
    """An empty folder ``parent/.<name>.XXXX``, removed with whatever is left in it.

    Same filesystem as ``parent``, so files made in it can be moved into place with
    :func:`replace_file` (or the folder itself renamed, :func:`atomic_dir`)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    staging.chmod(0o777 & ~_UMASK)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; if the block completes it replaces the folder ``path``.

    An old ``path`` is removed just before the rename (directories cannot be renamed over a
    non-empty one), so readers see the old folder, briefly none, then the new one; never half.
    """
    path = Path(path)
    with staging_dir(path.parent, path.name) as staging:
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: PathLike, mode: str = "wb", encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces ``path`` only if the block completes.

    ``newline`` is :func:`open`'s (``""`` for the csv module, which writes its own line ends)."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_write only supports write modes, got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that cannot leave a truncated file behind (crash, SIGKILL, disk full)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
