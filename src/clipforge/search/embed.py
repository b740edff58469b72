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

import csv
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.data.images import IMAGE_EXTENSIONS, iter_image_files
from clipforge.data.patterns import expand_braces
from clipforge.errors import DataError
from clipforge.search.tables import (
    atomic_save_npy,
    atomic_write_json,
    read_json,
    read_table,
    table_suffix,
    write_table,
)

log = logging.getLogger(__name__)

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path", "file", "filename", "img", "url")
CAPTION_COLUMNS = ("caption", "text", "title", "captions", "label")
STATE_FILE = "embed_state.json"
MANIFEST_FILE = "embed_manifest.json"


@dataclass(frozen=True)
class Item:
    """One source image: a file, or a member of an uncompressed tar shard (offset/size)."""

    path: str
    caption: str = ""
    tar_offset: int = -1
    tar_size: int = -1

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.tar_offset < 0:
                return f.read()
            f.seek(self.tar_offset)
            return f.read(self.tar_size)


# --------------------------------------------------------------------------- source listing
def list_items(
    source: str | os.PathLike | Sequence[str], *, image_key: str | None = None, caption_key: str | None = None
) -> list[Item]:
    """Resolve a folder (recursive), a pairs table, or webdataset shards into an ordered item list."""
    if isinstance(source, (list, tuple)):
        return [it for s in source for it in list_items(s, image_key=image_key, caption_key=caption_key)]
    text = str(source)
    if "{" in text or any(ch in text for ch in "*?["):
        paths = sorted({p for pat in expand_braces(text) for p in _glob(pat)})
        if not paths:
            raise DataError(f"{text}: pattern matched no files")
        return [it for p in paths for it in list_items(p, image_key=image_key, caption_key=caption_key)]
    path = Path(text).expanduser()
    if path.is_dir():
        images = sorted(iter_image_files(path))  # globally sorted: ids follow path order
        if images:
            return [Item(str(p.resolve()), _sibling_caption(p)) for p in images]
        tars = sorted(p for p in path.rglob("*.tar") if p.is_file())
        if tars:
            return [it for t in tars for it in _tar_items(t)]
        raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) or .tar shards found")
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.suffix == ".tar":
        return _tar_items(path)
    if path.suffix.lower() in TABLE_EXTS:
        return _table_items(path, image_key, caption_key)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [Item(str(path.resolve()), _sibling_caption(path))]
    raise DataError(f"{path}: not a folder, table ({', '.join(TABLE_EXTS)}), .tar shard or image")


def _glob(pattern: str) -> list[str]:
    import glob

    return (
        glob.glob(pattern)
        if any(ch in pattern for ch in "*?[")
        else [pattern]
        if Path(pattern).exists()
        else []
    )


def _sibling_caption(image: Path) -> str:
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    return ""


def _tar_items(tar_path: Path) -> list[Item]:
    """Index an uncompressed tar by key; image bytes are later read straight from the offsets."""
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower()
                g = groups.get(key)
                if g is None:
                    g = groups[key] = {}
                    order.append(key)
                if ext in IMAGE_EXTENSIONS and "image" not in g:
                    g["image"] = (m.offset_data, m.size)
                elif ext in (".txt", ".caption"):
                    f = tf.extractfile(m)
                    g["caption"] = f.read().decode("utf-8", errors="replace").strip() if f else ""
    except tarfile.ReadError as e:
        raise DataError(f"{tar_path}: not an uncompressed tar shard ({e})") from e
    path = str(tar_path.resolve())
    return [
        Item(path, groups[k].get("caption", ""), *groups[k]["image"]) for k in order if "image" in groups[k]
    ]


def _table_items(table: Path, image_key: str | None, caption_key: str | None) -> list[Item]:
    rows = _read_source_table(table)
    if not rows:
        raise DataError(f"{table}: table has no rows")
    present = list(rows[0])
    img_col = image_key or next((c for c in IMAGE_COLUMNS if c in present), None)
    if img_col is None or img_col not in present:
        wanted = image_key or " / ".join(IMAGE_COLUMNS)
        raise DataError(f"{table}: no image column {wanted!r}; columns present: {', '.join(present)}")
    cap_col = caption_key or next((c for c in CAPTION_COLUMNS if c in present), None)
    if caption_key and caption_key not in present:
        raise DataError(f"{table}: no caption column {caption_key!r}; columns present: {', '.join(present)}")
    root = table.parent.resolve()
    items = []
    for row in rows:
        rel = str(row.get(img_col) or "")
        cap = row.get(cap_col) if cap_col else ""
        if isinstance(cap, list):  # JSONL with several captions: the first describes the image
            cap = cap[0] if cap else ""
        items.append(Item(str((root / rel).resolve()) if rel else "", str(cap or "")))
    return items


def _read_source_table(table: Path) -> list[dict[str, Any]]:
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        cols = read_table(table)
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]
    with open(table, encoding="utf-8", errors="replace", newline="") as f:
        if suffix in (".jsonl", ".json"):
            out = []
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{table}:{lineno}: invalid JSON ({e.msg})") from e
            return out
        return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))


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
            img = load_image(item.read_bytes(), **kw)
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
    image_key: str | None = None,
    caption_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``source`` into ``out_dir``; returns the embed manifest (a dict).

    ``tokenizer`` enables caption embeddings; ``model_name``/``pretrained`` are recorded so the
    :class:`~clipforge.search.searcher.Searcher` can rebuild the same model for queries.
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list_items(source, image_key=image_key, caption_key=caption_key)
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
    return _finalize(out, n_shards, model_name, pretrained, dtype, with_text)


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
        h.update(f"{it.path}\0{it.tar_offset}\0".encode("utf-8", "surrogatepass"))
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
    out: Path, n_shards: int, model_name: str | None, pretrained: str | None, dtype: np.dtype, with_text: bool
) -> dict[str, Any]:
    """Merge the per-shard parts into ``metadata`` + ``skipped.csv`` and write the manifest."""
    keep = ("id", "path", "caption", "width", "height", "tar_offset", "tar_size")
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
