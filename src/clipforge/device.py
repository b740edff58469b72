"""One meaning for a device name everywhere (``--device`` of every command, ``device=`` of the library).

``"auto"`` (the default everywhere) or None is the GPU when PyTorch sees one, else the CPU. A named
device that is not there fails here, with the flag in the message, instead of deep inside a
``.to()`` call halfway through loading a model.
"""

from __future__ import annotations

from typing import Any

from clipforge.errors import ConfigError

AUTO = "auto"


def resolve_device(device: Any = AUTO, local_rank: int | None = None) -> Any:
    """A ``torch.device`` for ``"auto"``/None, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...

    ``local_rank`` (under torchrun): ``"auto"`` and an index-less ``"cuda"`` become this process's
    GPU, ``cuda:<local_rank>``, so the ranks of one machine do not all land on GPU 0.
    """
    import torch

    if device is None or device == AUTO:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is visible to PyTorch")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: no Apple-silicon GPU (MPS) is visible to PyTorch")
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    return dev
