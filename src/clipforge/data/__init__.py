"""Datasets of image-caption pairs: tables, folders, webdataset shards, synthetic shapes.

``build_dataset(spec)`` turns one string into a dataset; the spec grammar is the one every
command shares (:mod:`clipforge.data.sources`), tables are read by :mod:`clipforge.data.tables`::

    pairs.csv|tsv|json|jsonl|parquet, parquet/        a table, or several (PairsDataset)
    photos/                                             images + sidecar .txt (FolderPairsDataset)
    shards/  |  shards/shard-{000000..000009}.tar       webdataset shards (ShardDataset)
    synthetic:shapes[?n=5000&split=train&seed=0&image_size=64&caption_style=full]
    a.csv::0.7,b.tsv::0.3                               a weighted mix (MixDataset)

``build_loader(dataset, batch_size=...)`` wraps any of them in a ``ResumableLoader`` (batches of
``(images, tokens)``, ``state_dict()``/``load_state_dict()`` for exact resume).

Submodules are imported lazily: ``import clipforge.data`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "load_image": "images",
    "BadImageError": "images",
    "SkipCounter": "images",
    "PairsDataset": "pairs",
    "FolderPairsDataset": "pairs",
    "collate_pairs": "pairs",
    "SyntheticShapes": "synthetic",
    "write_synthetic": "synthetic",
    "ShardDataset": "shard_reader",
    "write_shards": "shards",
    "expand_urls": "shard_reader",
    "MixDataset": "mix",
    "ResumableLoader": "loader",
    "scan_dataset": "doctor",
    "build_dataset": "build",
    "build_loader": "build",
    "split_spec": "sources",
    "source_kind": "sources",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'clipforge.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"clipforge.data.{module}"), name)
    globals()[name] = value
    return value
