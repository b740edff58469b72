"""Batch embedding of an image collection into float16 ``.npy`` shards plus a metadata table.

Layout of ``out_dir`` (everything written atomically):

- ``img_emb_00000.npy`` ...   L2-normalised image embeddings, one row per readable image
- ``txt_emb_00000.npy`` ...   caption embeddings (same rows; zeros where a row has no caption)
- ``meta_00000.csv`` ...      every *source* item of the shard, with ``reason`` set when skipped
- ``metadata.csv|parquet``    id, path, caption, width, height (+ tar location) of embedded rows
- ``skipped.csv``             source items that could not be decoded, with the reason
- ``embed_manifest.json``     model name/pretrained, dim, count, shard list

A shard is the unit of resumption: shard ``i`` always covers source items
``[i*shard_size, (i+1)*shard_size)``, so a rerun lists the same items, skips shards whose
``img_emb`` file exists (written last) and embeds only the rest. Batches never straddle shards,
so ordering is preserved with any number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.items import Item, list_items
from clipforge.data.tables import TableOptions
from clipforge.errors import DataError
from clipforge.model.architecture import config_record, model_label
from clipforge.search.tables import (
    atomic_save_npy,
    atomic_write_json,
    read_json,
    read_table,
    table_suffix,
    write_table,
)

log = logging.getLogger(__name__)

__all__ = ["Item", "embed_images", "iter_embedding_chunks", "list_items", "load_manifest"]
STATE_FILE = "embed_state.json"
MANIFEST_FILE = "embed_manifest.json"


# --------------------------------------------------------------------------- decoding dataset
class _ImageDataset:
    """Map-style dataset run inside DataLoader workers: decode + preprocess, never raise."""

    def __init__(self, items: list[Item], preprocess: Callable, max_pixels: int | None):
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from clipforge.data.images import load_image

        item = self.items[i]
        try:
            if not item.path:
                raise FileNotFoundError("empty image path")
            kw = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
            img = load_image(item.read_bytes(), keep_mode=True, **kw)  # the transform converts
            # width/height are those of the decoded image (huge ones are reduced while decoding)
            return {"i": i, "image": self.preprocess(img), "size": img.size, "reason": ""}
        except Exception as e:  # noqa: BLE001 - a bad item is skipped with its reason, not fatal
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            return {"i": i, "image": None, "size": (0, 0), "reason": reason}


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable images in the worker: the main process only runs the model.

    The pixels travel as one tensor (pinned by the DataLoader on a GPU, so the copy to the
    device is asynchronous); the per-item records keep only what the shard metadata needs, so
    a shard's worth of pixels is never held in memory.
    """
    import torch

    good = [s["image"] for s in samples if s["image"] is not None]
    images = torch.stack(good) if good else None
    return {"images": images, "samples": [{k: v for k, v in s.items() if k != "image"} for s in samples]}


# --------------------------------------------------------------------------- main entry point
def embed_images(
    model: Any,
    preprocess: Callable,
    source: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 10_000,
    dtype: Any = np.float16,
    *,
    tokenizer: Callable | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    device: Any = "cpu",
    max_pixels: int | None = None,
    table: TableOptions | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``source`` into ``out_dir``; returns the embed manifest (a dict).

    ``source`` is any spec of :mod:`clipforge.data.sources` with images (folder, table(s),
    shards); ``table`` says how to read tables (separator, columns, data root), as for every
    command. ``tokenizer`` enables caption embeddings; ``model_name``/``pretrained`` are
    recorded so the :class:`~clipforge.search.searcher.Searcher` can rebuild the same model.
    """
    import torch
    from tqdm import tqdm

    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise DataError(f"dtype must be float16 or float32, got {dtype}")
    if batch_size <= 0 or shard_size <= 0:
        raise DataError("batch_size and shard_size must be positive")
    if pretrained is not None and Path(str(pretrained)).expanduser().exists():
        pretrained = str(Path(str(pretrained)).expanduser().resolve())  # usable from any folder later
    model_name = model_label(model, model_name)  # the real architecture, never a merely close name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list_items(source, table)
    if not items:
        raise DataError(f"{source}: no images found")
    n_shards = (len(items) + shard_size - 1) // shard_size
    _check_state(out, items, shard_size, model_name, pretrained, dtype)
    with_text = tokenizer is not None and any(it.caption for it in items)

    pending = [s for s in range(n_shards) if not _shard_done(out, s)]
    if len(pending) < n_shards:
        log.info("resuming: %d of %d shards already written", n_shards - len(pending), n_shards)
    batches = [
        list(range(b, min(b + batch_size, (s + 1) * shard_size, len(items))))
        for s in pending
        for b in range(s * shard_size, min((s + 1) * shard_size, len(items)), batch_size)
    ]
    if batches:
        on_gpu = torch.device(device).type == "cuda"
        loader = torch.utils.data.DataLoader(
            _ImageDataset(items, preprocess, max_pixels),
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=on_gpu,
            persistent_workers=False,
        )
        model.eval()
        pixel_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        buf: list[dict[str, Any]] = []
        feats: list[np.ndarray] = []
        shard = pending[0]
        bar = tqdm(total=len(batches), unit="batch", desc="embed", disable=not progress)
        with torch.inference_mode():
            for batch in loader:
                samples = batch["samples"]
                s = samples[0]["i"] // shard_size
                if s != shard:
                    _write_shard(out, shard, items, buf, feats, model, tokenizer, with_text, dtype, device)
                    buf, feats, shard = [], [], s
                buf.extend(samples)
                if batch["images"] is not None:
                    x = batch["images"].to(device, dtype=pixel_dtype, non_blocking=on_gpu)
                    f = model.encode_image(x, normalize=True).float()
                    feats.append(_normalise(f.cpu().numpy()))
                bar.update(1)
        _write_shard(out, shard, items, buf, feats, model, tokenizer, with_text, dtype, device)
        bar.close()
    pre = getattr(model, "preprocess_cfg", None)
    pre_dict = pre.to_dict() if hasattr(pre, "to_dict") else None
    return _finalize(out, n_shards, model_name, pretrained, dtype, with_text, config_record(model), pre_dict)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Re-normalise in float32 (a model in half precision may be slightly off unit norm)."""
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _shard_done(out: Path, s: int) -> bool:
    return (out / f"img_emb_{s:05d}.npy").is_file() and (out / f"meta_{s:05d}.csv").is_file()


def _check_state(
    out: Path,
    items: list[Item],
    shard_size: int,
    model_name: str | None,
    pretrained: str | None,
    dtype: np.dtype,
) -> None:
    """Refuse to resume into a folder whose shards came from another source, model or sharding."""
    h = hashlib.sha256()
    for it in items:
        key = f"{it.path}\0{it.tar_offset}\0" + (f"{it.row}\0" if it.row >= 0 else "")
        h.update(key.encode("utf-8", "surrogatepass"))
    state = {
        "items": len(items),
        "fingerprint": h.hexdigest(),
        "shard_size": shard_size,
        "model": model_name,
        "pretrained": str(pretrained) if pretrained is not None else None,
        "dtype": dtype.name,
    }
    path = out / STATE_FILE
    if path.is_file():
        old = read_json(path)
        diff = [k for k in state if old.get(k) != state[k]]
        if diff:
            raise DataError(
                f"{out}: holds embeddings of a different run ({', '.join(diff)} differ); "
                "use a new --out folder or delete this one"
            )
        return
    if any(out.glob("img_emb_*.npy")):
        raise DataError(f"{out}: contains embedding shards but no {STATE_FILE}; use an empty folder")
    atomic_write_json(path, state)


def _write_shard(
    out: Path,
    s: int,
    items: list[Item],
    samples: list[dict[str, Any]],
    feats: list[np.ndarray],
    model: Any,
    tokenizer: Callable | None,
    with_text: bool,
    dtype: np.dtype,
    device: Any,
) -> None:
    """Write one shard: metadata part, caption embeddings, then the image embeddings (the marker)."""
    import torch

    dim = feats[0].shape[1] if feats else _embed_dim(model)
    img = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    rows = [items[x["i"]] for x in samples]
    meta = {
        "source_index": [x["i"] for x in samples],
        "path": [r.path for r in rows],
        "caption": [r.caption for r in rows],
        "width": [x["size"][0] for x in samples],
        "height": [x["size"][1] for x in samples],
        "tar_offset": [r.tar_offset for r in rows],
        "tar_size": [r.tar_size for r in rows],
        "row": [r.row for r in rows],
        "reason": [x["reason"] for x in samples],
    }
    if with_text:
        caps = [items[x["i"]].caption for x in samples if not x["reason"]]
        txt = np.zeros((len(caps), dim), np.float32)
        idx = [j for j, c in enumerate(caps) if c.strip()]
        with torch.inference_mode():
            for b in range(0, len(idx), 256):
                chunk = idx[b : b + 256]
                tokens = tokenizer([caps[j] for j in chunk]).to(device)
                txt[chunk] = _normalise(model.encode_text(tokens, normalize=True).float().cpu().numpy())
        atomic_save_npy(out / f"txt_emb_{s:05d}.npy", txt.astype(dtype))
    write_table(out / f"meta_{s:05d}.csv", meta)
    atomic_save_npy(out / f"img_emb_{s:05d}.npy", img.astype(dtype))
    n_bad = sum(1 for x in samples if x["reason"])
    log.info("shard %05d: %d embedded, %d skipped", s, len(img), n_bad)


def _embed_dim(model: Any) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "embed_dim", 0) or 0)


def _finalize(
    out: Path,
    n_shards: int,
    model_name: str | None,
    pretrained: str | None,
    dtype: np.dtype,
    with_text: bool,
    model_config: dict[str, Any] | None = None,
    preprocess_cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge the per-shard parts into ``metadata`` + ``skipped.csv`` and write the manifest."""
    keep = ("id", "path", "caption", "width", "height", "tar_offset", "tar_size", "row")
    meta: dict[str, list[Any]] = {k: [] for k in keep}
    skipped: dict[str, list[Any]] = {"source_index": [], "path": [], "reason": []}
    shards, dim, n = [], 0, 0
    for s in range(n_shards):
        part = read_table(out / f"meta_{s:05d}.csv")
        emb = np.load(out / f"img_emb_{s:05d}.npy", mmap_mode="r")
        ok = [j for j, r in enumerate(part["reason"]) if not r]
        if len(ok) != emb.shape[0]:
            raise DataError(f"{out}/meta_{s:05d}.csv: {len(ok)} rows but img_emb has {emb.shape[0]}")
        for j in ok:
            meta["id"].append(n)
            n += 1
            for k in keep[1:]:
                meta[k].append(part[k][j])
        for j, r in enumerate(part["reason"]):
            if r:
                skipped["source_index"].append(part["source_index"][j])
                skipped["path"].append(part["path"][j])
                skipped["reason"].append(r)
        dim = dim or (emb.shape[1] if emb.shape[0] else 0)
        shards.append(
            {
                "image": f"img_emb_{s:05d}.npy",
                "rows": int(emb.shape[0]),
                "text": f"txt_emb_{s:05d}.npy" if with_text else None,
            }
        )
    meta_path = write_table(out / f"metadata{table_suffix()}", meta)
    write_table(out / "skipped.csv", skipped)
    if skipped["path"]:
        log.warning("%d unreadable images skipped; see %s", len(skipped["path"]), out / "skipped.csv")
    manifest = {
        "format": "clipforge-embeddings",
        "version": 1,
        "model": model_name,
        "pretrained": str(pretrained) if pretrained is not None else None,
        "model_config": model_config,  # what the Searcher rebuilds; "model" is only its name
        "preprocess": preprocess_cfg,  # the image convention used (--image-alpha included), for queries
        "dim": int(dim),
        "count": n,
        "skipped": len(skipped["path"]),
        "dtype": dtype.name,
        "normalized": True,
        "has_text": with_text,
        "metadata": meta_path.name,
        "shards": shards,
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


# --------------------------------------------------------------------------- reading back
def load_manifest(emb_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(emb_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{emb_dir}: no {MANIFEST_FILE}; run `clipforge embed` first (or it did not finish)")
    return read_json(path)


def iter_embedding_chunks(emb_dir: str | os.PathLike, kind: str = "image"):
    """Yield the stored shards in order as memory-mapped arrays (float16 or float32)."""
    emb_dir = Path(emb_dir)
    for shard in load_manifest(emb_dir)["shards"]:
        name = shard["image" if kind == "image" else "text"]
        if name is None:
            raise DataError(f"{emb_dir}: no {kind} embeddings stored")
        arr = np.load(emb_dir / name, mmap_mode="r")
        if arr.shape[0]:
            yield arr
