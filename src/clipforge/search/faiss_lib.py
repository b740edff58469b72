"""Importing faiss: one place that says how to install it and quiets its loader.

Why a module of its own: both the index planner (:mod:`clipforge.search.index`) and the streamed
builder (:mod:`clipforge.search.build`) need faiss, and the index imports the builder; the
loader in either one made the two import each other.
"""

from __future__ import annotations

import logging
from typing import Any

from clipforge.errors import ClipforgeError


def load_faiss() -> Any:
    """The faiss module, or a ClipforgeError naming the extra to install."""
    # faiss's loader reports at INFO which CPU build it picked: noise on every CLI command
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ClipforgeError("faiss is not installed: pip install 'clipforge[search]'") from e
    return faiss
