"""``build_dataset`` / ``build_loader``: one dataset (or resumable loader) from a spec string.

Its own module so that the dataset modules (shards, pairs, loader) can use it without importing
the package ``__init__`` back: the spec grammar is :mod:`clipforge.data.sources`.
"""

from __future__ import annotations

from typing import Any

from clipforge.data.sources import source_kind, split_spec

_SHARD_KW = ("shuffle", "buffer_size", "resampled", "samples_per_epoch", "rank", "world_size", "equalize")
_TABLE_KW = (
    "image_key",
    "caption_key",
    "separator",
    "data_root",
    "confine",
    "dedupe",
    "on_bad",
    "max_retries",
    "strict",
    "extra_keys",  # more table columns to keep (group ids, hard negatives: clipforge.data.objective_items)
)
_IMAGE_KW = ("max_pixels", "min_side")


def build_dataset(
    spec: str,
    *,
    transform: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    skip_counter: Any = None,
    **kw: Any,
) -> Any:
    """One dataset from a spec string (see the module doc). Extra keywords go to the dataset
    types that accept them (``image_key``/``caption_key`` to tables, ``resampled`` to shards...);
    others are ignored. ``train=False`` makes ``synthetic:shapes`` default to its ``val`` split."""
    from clipforge.data.images import SkipCounter

    counter = skip_counter or SkipCounter(spec)
    sources = split_spec(spec)
    if len(sources) > 1:
        from clipforge.data.mix import MixDataset
        from clipforge.errors import DataError

        parts = [
            build_dataset(s, transform=transform, tokenizer=tokenizer, seed=seed, skip_counter=counter, **kw)
            for s, _ in sources
        ]
        if any(source_kind(s) == "shards" for s, _ in sources):
            raise DataError("shards cannot be mixed with other sources yet; write the tables as shards")
        return MixDataset(parts, [w for _, w in sources], seed=seed, skip_counter=counter)
    path = sources[0][0]
    kind = source_kind(path)
    common = {"transform": transform, "tokenizer": tokenizer, "seed": seed}
    img_kw = {k: kw[k] for k in _IMAGE_KW if k in kw}
    if kind == "synthetic":
        from clipforge.data.synthetic import SyntheticShapes, parse_synthetic_spec

        opts = {"seed": seed, **parse_synthetic_spec(path)}
        if kw.get("train") is False and "split" not in opts:
            opts["split"] = "val"  # evaluation data must not be the training stream
        return SyntheticShapes(transform=transform, tokenizer=tokenizer, **opts)
    if kind == "shards":
        from clipforge.data.shard_reader import ShardDataset

        shard_kw = {k: kw[k] for k in _SHARD_KW if k in kw}
        return ShardDataset(path, skip_counter=counter, **common, **shard_kw, **img_kw)
    if kind == "folder":
        from clipforge.data.pairs import FolderPairsDataset

        folder_kw = {k: kw[k] for k in ("on_bad", "max_retries", "caption_ext") if k in kw}
        return FolderPairsDataset(path, skip_counter=counter, **common, **folder_kw, **img_kw)
    if kind in ("table", "tables"):
        from clipforge.data.pairs import PairsDataset
        from clipforge.data.sources import table_files

        table_kw = {k: kw[k] for k in _TABLE_KW if kw.get(k) is not None}
        return PairsDataset(table_files(path), skip_counter=counter, **common, **table_kw, **img_kw)
    from clipforge.errors import DataError

    raise DataError(f"{path}: a {kind} source cannot be used here (training needs image-caption pairs)")


def build_loader(data: Any, *, batch_size: int, num_workers: int = 0, seed: int = 0, **kw: Any) -> Any:
    """``ResumableLoader`` over ``data`` (a dataset or a spec string for :func:`build_dataset`).

    Loader options (shuffle, drop_last, rank, world_size, pin_memory, collate_fn) go to the
    loader; everything else to ``build_dataset``.
    """
    from clipforge.data.loader import ResumableLoader

    loader_keys = (
        "shuffle",
        "drop_last",
        "rank",
        "world_size",
        "pin_memory",
        "collate_fn",
        "prefetch_factor",
    )
    loader_kw = {k: kw.pop(k) for k in loader_keys if k in kw}
    if isinstance(data, str):
        for k in ("rank", "world_size", "shuffle"):
            if k in loader_kw:
                kw[k] = loader_kw[k]
        data = build_dataset(data, seed=seed, **kw)
    return ResumableLoader(data, batch_size=batch_size, num_workers=num_workers, seed=seed, **loader_kw)
