"""Reading a ``clipforge embed`` folder back: its manifest and its shards as memory-mapped arrays.

Why in ``data/``: the folder is written by :mod:`clipforge.search.embed`, but training reads it
too (teacher features, :class:`clipforge.data.objective_items.TeacherFeatures`), and ``data/``
must not import ``search/``. Both import the reader from here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.column_tables import read_json
from clipforge.errors import DataError

MANIFEST_FILE = "embed_manifest.json"


def load_manifest(emb_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(emb_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{emb_dir}: no {MANIFEST_FILE}; run `clipforge embed` first (or it did not finish)")
    return read_json(path)


def iter_embedding_chunks(emb_dir: str | os.PathLike, kind: str = "image") -> Iterator[np.ndarray]:
    """Yield the stored shards in order as memory-mapped arrays (float16 or float32)."""
    emb_dir = Path(emb_dir)
    for shard in load_manifest(emb_dir)["shards"]:
        name = shard["image" if kind == "image" else "text"]
        if name is None:
            raise DataError(f"{emb_dir}: no {kind} embeddings stored")
        arr = np.load(emb_dir / name, mmap_mode="r")
        if arr.shape[0]:
            yield arr
