"""Reading and writing weight files without ever running code from them.

Checkpoints come from strangers. A pickle can call any Python function while it loads, so every
reader here either uses a format that cannot (safetensors), torch's ``weights_only`` unpickler, or
our own unpickler for TorchScript archives that knows a handful of tensor-rebuilding globals and
refuses everything else. Writers go through a temporary file in the destination folder followed by
``os.replace`` so a crash or a full disk never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from clipforge.atomic import atomic_path
from clipforge.errors import CheckpointError, UnsafeCheckpointError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

__all__ = [
    "is_torchscript_archive",
    "load_safetensors",
    "load_torchscript_state_dict",
    "safe_torch_load",
    "save_safetensors",
]


# --- safetensors ----------------------------------------------------------------------------------
def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors atomically; shared or non-contiguous tensors are copied as safetensors requires."""
    from safetensors.torch import save_file

    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        t = value.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        if ptr is not None:
            seen.add(ptr)
        out[key] = t.cpu()
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=metadata)


def load_safetensors(
    path: PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and the header metadata; the file is memory-mapped, not read up front."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    return tensors, metadata


# --- torch pickles --------------------------------------------------------------------------------
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript zips carry ``constants.pkl`` (torch.load would hand them to ``torch.jit.load``)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars/arrays/dtypes, which training loops often leave in checkpoints (best metric,
    epoch counters). They are data, not code: reconstructing them calls only numpy constructors,
    and anything nested inside still goes through torch's restricted unpickler. Both the numpy 1
    (``numpy.core``) and numpy 2 (``numpy._core``) spellings are accepted.
    """
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [np.dtype, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(core.multiarray, name)
        allowed += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def safe_torch_load(path: PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a ``torch.save`` file (or a TorchScript archive's weights) without running its code.

    Raises ``UnsafeCheckpointError`` naming the file and the global the pickle wanted, and
    ``CheckpointError`` for missing, truncated or corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes)")
    if is_torchscript_archive(path):
        return load_torchscript_state_dict(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        msg = str(e)
        match = _GLOBAL_RE.search(msg)
        if match or "weights only" in msg.lower():
            what = match.group(1) if match else "an unsupported object"
            raise UnsafeCheckpointError(
                f"{path}: refused to load - the pickle references {what}, which could run code. "
                "Only tensors and plain containers are accepted; convert the file with a trusted "
                "tool to safetensors if you trust its source."
            ) from None
        raise CheckpointError(f"{path}: corrupt checkpoint pickle: {msg.splitlines()[0]}") from None
    except Exception as e:  # torch raises many types (RuntimeError, EOFError, IndexError, ...) on garbage
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read checkpoint (truncated, corrupt or not a torch file?): {type(e).__name__}: {first}"
        ) from None


# --- TorchScript archives -------------------------------------------------------------------------
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` class: it only records the attributes it was given."""

    qualname = "__torch__"

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _StorageRef:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    """What ``torch._utils._rebuild_tensor_v2`` does, restricted to a flat tensor we built."""
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl`` into placeholders and tensors, and nothing else."""

    def __init__(self, file: IO[bytes], archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, torch.Tensor] = {}
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageRef(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and (name == "restore_type_tag" or name.startswith("build_")):
            return _identity
        raise UnsafeCheckpointError(
            f"{self._path}: refused to load - the TorchScript archive references GLOBAL {module}.{name}, "
            "which is not a tensor or module record"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r} in TorchScript archive")
        ref, key = pid[1], str(pid[2])
        dtype = ref.dtype if isinstance(ref, _StorageRef) else torch.uint8
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"{self._path}: TorchScript archive lacks storage data/{key}") from None
            data = (
                torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                if raw
                else torch.empty(0, dtype=torch.uint8)
            )
            self._storages[key] = data.view(dtype) if raw else torch.empty(0, dtype=dtype)
        return self._storages[key]


_CLASS_RE = re.compile(r"^class (\w+)\(", re.M)
_LIST_RE = re.compile(r"^\s+(__parameters__|__buffers__) = (\[.*?\])\s*$", re.M)


def _read_class_tensor_names(archive: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Parameter and buffer names per TorchScript class, read as text from ``code/`` (never run).

    TorchScript modules also hold plain tensor attributes (OpenAI's ``attn_mask``) that are not
    part of ``state_dict``; the class declarations are how torch itself tells them apart.
    """
    names: dict[str, set[str]] = {}
    code_prefix = f"{prefix}code/"
    for entry in archive.namelist():
        if not (entry.startswith(code_prefix) and entry.endswith(".py")):
            continue
        module = entry[len(code_prefix) : -3].replace("/", ".")
        text = archive.read(entry).decode("utf-8", errors="replace")
        classes = list(_CLASS_RE.finditer(text))
        for i, cls in enumerate(classes):
            end = classes[i + 1].start() if i + 1 < len(classes) else len(text)
            body = text[cls.end() : end]
            tensor_names: set[str] = set()
            for m in _LIST_RE.finditer(body):
                with contextlib.suppress(ValueError, SyntaxError):
                    tensor_names.update(ast.literal_eval(m.group(2)))
            names[f"{module}.{cls.group(1)}"] = tensor_names
    return names


def _collect(
    obj: _ScriptObject, prefix: str, classes: dict[str, set[str]], out: dict[str, torch.Tensor]
) -> None:
    state = obj.state
    if not isinstance(state, dict):
        return
    known = classes.get(obj.qualname)
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            if known is None or name in known:
                out[f"{prefix}{name}"] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", classes, out)


def load_torchscript_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a TorchScript archive (e.g. OpenAI's released ``ViT-B-32.pt``).

    Neither the TorchScript code nor arbitrary pickle globals are executed: ``data.pkl`` is read
    by an unpickler that maps ``__torch__`` classes to inert placeholders and rebuilds tensors
    from the archive's raw storages.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable TorchScript archive (truncated or corrupt?): {e}"
        ) from None
    with archive:
        data_entries = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if not data_entries:
            raise CheckpointError(f"{path}: TorchScript archive has no data.pkl")
        entry = data_entries[0]
        prefix = entry[: -len("data.pkl")]
        try:
            raw = archive.read(entry)
            root = _TorchScriptUnpickler(io.BytesIO(raw), archive, prefix, path).load()
            classes = _read_class_tensor_names(archive, prefix)
        except (UnsafeCheckpointError, CheckpointError):
            raise
        except Exception as e:  # zlib / CRC / pickle errors from a damaged archive
            raise CheckpointError(f"{path}: corrupt TorchScript archive ({type(e).__name__}: {e})") from None
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(
            f"{path}: TorchScript data.pkl does not hold a module (got {type(root).__name__})"
        )
    state_dict: dict[str, torch.Tensor] = {}
    _collect(root, "", classes, state_dict)
    log.debug("read %d tensors from TorchScript archive %s", len(state_dict), path)
    return state_dict
