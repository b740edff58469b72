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

from clipforge.lazy import lazy_attributes

_API = {
    "load_image": "clipforge.data.images",
    "BadImageError": "clipforge.data.images",
    "SkipCounter": "clipforge.data.images",
    "PairsDataset": "clipforge.data.pairs",
    "FolderPairsDataset": "clipforge.data.pairs",
    "collate_pairs": "clipforge.data.pairs",
    "SyntheticShapes": "clipforge.data.synthetic",
    "write_synthetic": "clipforge.data.synthetic",
    "ShardDataset": "clipforge.data.shard_reader",
    "write_shards": "clipforge.data.shards",
    "expand_urls": "clipforge.data.shard_reader",
    "MixDataset": "clipforge.data.mix",
    "ResumableLoader": "clipforge.data.loader",
    "scan_dataset": "clipforge.data.doctor",
    "build_dataset": "clipforge.data.build",
    "build_loader": "clipforge.data.build",
    "split_spec": "clipforge.data.sources",
    "source_kind": "clipforge.data.sources",
}

__all__ = sorted(_API)
__getattr__ = lazy_attributes(__name__, _API)[0]  # dir() stays the default (loaded submodules too)
