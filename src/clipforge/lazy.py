"""Package attributes that import their module on first use (PEP 562 ``__getattr__``).

Why: ``import clipforge.data`` / ``clipforge.search`` must not pull in torch, faiss or FastAPI
before a name that needs them is touched (the CLI starts fast; ``--help`` imports nothing heavy).
Each package lists ``name -> module`` once and gets its ``__getattr__`` and ``__dir__`` here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(
    package: str, api: Mapping[str, str], *, cache: bool = True
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``api`` maps each public name to its module.

    With ``cache`` the value is stored on the package after the first look-up, so later ones are
    plain attribute reads; without it every look-up asks the module (tests patch modules).
    """

    def __getattr__(name: str) -> Any:
        module = api.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        if cache:
            setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(api)

    return __getattr__, __dir__
