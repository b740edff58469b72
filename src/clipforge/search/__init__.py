"""Semantic image search: embed a collection, index it with faiss, query it, serve it over HTTP.

``from clipforge.search import Searcher`` works; names resolve lazily so importing the package
does not pull in faiss, torch or FastAPI until they are used.
"""

from __future__ import annotations

from clipforge.lazy import lazy_attributes

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
__getattr__, __dir__ = lazy_attributes(__name__, _API, cache=False)
