"""Semantic image search: embed a collection, index it with faiss, query it, serve it over HTTP.

``from clipforge.search import Searcher`` works; names resolve lazily so importing the package
does not pull in faiss, torch or FastAPI until they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "embed_images": "clipforge.search.embed",
    "build_index": "clipforge.search.index",
    "add_to_index": "clipforge.search.index",
    "load_index": "clipforge.search.index",
    "plan_index": "clipforge.search.index",
    "Searcher": "clipforge.search.searcher",
    "Result": "clipforge.search.searcher",
    "create_app": "clipforge.search.server",
    "serve": "clipforge.search.server",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'clipforge.search' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
