"""Batch embedding of an image collection into float16 ``.npy`` shards plus a metadata table.

Layout of ``out_dir`` (everything written atomically):

- ``img_emb_00000.npy`` ...   L2-normalised image embeddings, one row per readable image
- ``txt_emb_00000.npy`` ...   caption embeddings (same rows; zeros where a row has no caption)
- ``meta_00000.csv`` ...      every *source* item of the shard, with ``reason`` set when skipped
- ``metadata.csv|parquet``    id, path, caption, width, height (+ tar location) of embedded rows
- ``skipped.csv``             source items that could not be decoded, with the reason
- ``embed_manifest.json``     model name/pretrained, dim, count, shard list

A shard is the unit of resumption. Output shards follow the input: each input shard (tar file,
table file; a folder is one input) is cut into pieces of ``shard_size`` items, so shard ``i``
always covers the same source items; a rerun lists the same items, skips shards whose
``img_emb`` file exists (written last) and embeds only the rest. Batches never straddle shards,
so ordering is preserved with any number of DataLoader workers.

Under ``torchrun`` the pending shards are split over the ranks (:mod:`clipforge.search.sharding`):
whole input shards per rank where the source has several, contiguous runs of output shards
otherwise. Each rank writes its own shards (plus ``shard_00000.json``: which rank, which items
of which input); rank 0 writes the manifest from what is on disk once every rank is done. The
files are the same as a single-process run's, and a rerun with any number of ranks finishes
only the missing shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipforge.data.column_tables import (
    atomic_save_npy,
    atomic_write_json,
    read_json,
    read_table,
    table_suffix,
    write_table,
)
from clipforge.data.embeddings import MANIFEST_FILE, iter_embedding_chunks, load_manifest
from clipforge.data.items import Item, list_items
from clipforge.data.tables import TableOptions
from clipforge.errors import ConfigError, DataError
from clipforge.model.architecture import config_record, model_label
from clipforge.search import sharding

log = logging.getLogger(__name__)

__all__ = ["Item", "embed_images", "iter_embedding_chunks", "list_items", "load_manifest"]
STATE_FILE = "embed_state.json"
LAYOUT = "per-input"  # output shards cut per input shard (one input: global ranges, as before)


# --------------------------------------------------------------------------- decoding dataset
class _ImageDataset:
    """Map-style dataset run inside DataLoader workers: decode + preprocess, never raise.

    ``threads`` > 1 decodes the items of one batch concurrently (:meth:`__getitems__`): Pillow
    releases the GIL while it decodes and resizes, so when decoding is the bottleneck (large
    photos) the cores the model leaves idle decode too. Results and their order do not depend
    on it.

    ``min_side`` (``--fast-decode``) decodes every image reduced by an integer factor while
    keeping its shorter side >= ``min_side`` (JPEG DCT scaling, ``Image.reduce`` otherwise)
    instead of at full size: large photos decode several times faster, and the pixels the model
    sees move slightly (the resize starts from a box-averaged image).
    """

    def __init__(
        self,
        items: list[Item],
        preprocess: Callable,
        max_pixels: int | None,
        threads: int = 1,
        min_side: int | None = None,
    ):
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels
        self.min_side = min_side
        self.threads = max(1, int(threads))
        self._pool: Any = None  # made in the process that decodes (never pickled)

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """One batch (the DataLoader's batched fetch), in order, decoded by ``threads`` threads."""
        if self.threads == 1 or len(indices) < 2:
            return [self[i] for i in indices]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clipforge-decode")
        return list(self._pool.map(self.__getitem__, indices))

    def __getitem__(self, i: int) -> dict[str, Any]:
        from clipforge.data.images import load_image, original_size

        item = self.items[i]
        try:
            if not item.path:
                raise FileNotFoundError("empty image path")
            kw: dict[str, Any] = {} if self.max_pixels is None else {"max_pixels": self.max_pixels}
            if self.min_side is not None:
                kw.update(min_side=self.min_side, exact_pixels=None)
            img = load_image(item.read_bytes(), keep_mode=True, **kw)  # the transform converts
            # width/height are the file's (oriented), also where the decode was reduced
            return {"i": i, "image": self.preprocess(img), "size": original_size(img), "reason": ""}
        except Exception as e:  # noqa: BLE001 - a bad item is skipped with its reason, not fatal
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            return {"i": i, "image": None, "size": (0, 0), "reason": reason}


def auto_decode_threads(num_workers: int, cores: int | None = None) -> int:
    """Decoding threads per decoding process when the caller does not say: the cores shared out
    over the processes that decode (the main process when ``num_workers`` is 0), at most 8.

    The model's threads run on the same cores; while it waits for pixels they are idle, and
    while it runs the operating system shares them out, so the rate is that of the slower side.
    """
    from clipforge.data.workers import available_cores

    cores = cores or available_cores()
    return max(1, min(8, cores // max(1, num_workers)))


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decodable images in the worker: the main process only runs the model.

    The pixels travel as one tensor (pinned by the DataLoader on a GPU, so the copy to the
    device is asynchronous); the per-item records keep only what the shard metadata needs, so
    a shard's worth of pixels is never held in memory.
    """
    from clipforge.naflex_transforms import stack_images

    good = [s["image"] for s in samples if s["image"] is not None]
    images = stack_images(good) if good else None  # NaFlex patch dicts: padded, with a mask
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
    decode_threads: int | None = None,
    fast_decode: bool = False,
) -> dict[str, Any]:
    """Embed every image of ``source`` into ``out_dir``; returns the embed manifest (a dict).

    ``source`` is any spec of :mod:`clipforge.data.sources` with images (folder, table(s),
    shards); ``table`` says how to read tables (separator, columns, data root), as for every
    command. ``tokenizer`` enables caption embeddings; ``model_name``/``pretrained`` are
    recorded so the :class:`~clipforge.search.searcher.Searcher` can rebuild the same model.
    ``decode_threads`` is the number of threads each decoding process decodes a batch with
    (default :func:`auto_decode_threads`: the cores shared out over the decoding processes).
    ``fast_decode`` decodes images reduced to a shorter side of twice the model's input
    (:func:`reduced_decode_side`) instead of at full size; the manifest records which.

    Called on every rank of an initialised process group (``clipforge embed`` under torchrun),
    each rank embeds its share of the missing shards and every rank returns the manifest.
    """
    dtype = _check_options(dtype, batch_size, shard_size, decode_threads)
    min_side = reduced_decode_side(model) if fast_decode else None
    # recorded with the embeddings: a folder is not resumed in another decode mode or precision
    run = {"decode": "reduced" if fast_decode else "full", "compute_dtype": _compute_dtype(model)}
    pretrained = _portable_pretrained(pretrained)
    model_name = model_label(model, model_name)  # the real architecture, never a merely close name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = _items_of(source, table)
    plan = plan_shards(items, shard_size)
    rank, world = sharding.world()
    pending = _pending_shards(out, items, plan, (shard_size, model_name, pretrained, dtype), run)
    with_text = tokenizer is not None and any(it.caption for it in items)
    mine = [s for s, r in zip(pending, assign_shards(plan, pending, world)) if r == rank]
    if mine:
        writer = _ShardWriter(out, plan, items, model, tokenizer, with_text, dtype, device, rank, world)
        threads = auto_decode_threads(num_workers) if decode_threads is None else decode_threads
        dataset = _ImageDataset(items, preprocess, max_pixels, threads, min_side)
        _embed_shards(model, dataset, plan, mine, writer, batch_size, num_workers, progress)
    sharding.wait_all()  # every rank's shards are on disk
    if rank == 0:
        manifest = _finalize(out, plan, model, model_name, pretrained, dtype, with_text, run)
    sharding.wait_all()  # the manifest is written
    return manifest if rank == 0 else load_manifest(out)


def _pending_shards(
    out: Path,
    items: list[Item],
    plan: list[Span],
    settings: tuple[int, str, str | None, np.dtype],
    run: dict[str, str],
) -> list[int]:
    """The shards not yet on disk, after checking that ``out`` holds this run's settings
    (``shard_size, model_name, pretrained, dtype``); rank 0 decides, every rank gets its list."""
    shard_size, model_name, pretrained, dtype = settings

    def check() -> list[int]:
        _check_state(out, items, shard_size, model_name, pretrained, dtype, plan[-1].input + 1, run)
        return [s for s in range(len(plan)) if not _shard_done(out, s)]

    pending = sharding.agree(check)
    if len(pending) < len(plan) and sharding.world()[0] == 0:
        log.info("resuming: %d of %d shards already written", len(plan) - len(pending), len(plan))
    return pending


def _items_of(source: str | os.PathLike | Sequence[str], table: TableOptions | None) -> list[Item]:
    items = list_items(source, table)
    if not items:
        raise DataError(f"{source}: no images found")
    return items


def _preprocess_record(model: Any) -> dict[str, Any] | None:
    """The image convention the model was embedded with, so image queries get the same one."""
    pre = getattr(model, "preprocess_cfg", None)
    return pre.to_dict() if hasattr(pre, "to_dict") else None


def reduced_decode_side(model: Any) -> int:
    """The shorter side ``fast_decode`` keeps: twice the largest side the model's preprocessing
    resizes to, the rule the training image cache uses (every image still shrinks >= 2x in the
    resize, so the result stays close to a full-size decode)."""
    pre = getattr(model, "preprocess_cfg", None)
    if pre is None:
        raise ConfigError("fast decoding needs the model's preprocessing config (model.preprocess_cfg)")
    if pre.naflex_max_patches is not None:
        raise ConfigError(
            "fast decoding does not apply to NaFlex preprocessing (its size follows each image)"
        )
    resize = pre.resize_size or 0
    return 2 * max(*pre.size, *(resize if isinstance(resize, tuple) else (resize,)))


def _compute_dtype(model: Any) -> str:
    """The floating dtype the model computes in ("float32", "bfloat16", ...)."""
    from clipforge.eval.zero_shot import model_dtype

    return str(model_dtype(model)).removeprefix("torch.")


def _check_options(dtype: Any, batch_size: int, shard_size: int, decode_threads: int | None) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32):
        raise DataError(f"dtype must be float16 or float32, got {dtype}")
    if batch_size <= 0 or shard_size <= 0:
        raise DataError("batch_size and shard_size must be positive")
    if decode_threads is not None and decode_threads < 1:
        raise DataError(f"decode_threads must be at least 1, got {decode_threads}")
    return dtype


def _portable_pretrained(pretrained: str | None) -> str | None:
    """A weights file given by a relative path is recorded absolute: usable from any folder later."""
    if pretrained is not None and Path(str(pretrained)).expanduser().exists():
        return str(Path(str(pretrained)).expanduser().resolve())
    return pretrained


class Span(NamedTuple):
    """One output shard: source items ``[start, end)``, all from input number ``input``."""

    start: int
    end: int
    input: int


def plan_shards(items: Sequence[Item], shard_size: int) -> list[Span]:
    """The output shards: each input (consecutive items with one ``source``) cut into pieces of
    ``shard_size``. A shard never straddles two inputs, so a rank given whole inputs reads only
    its own files; with one input this is the plain ``[i*shard_size, (i+1)*shard_size)`` layout."""
    plan: list[Span] = []
    start, n_input = 0, 0
    for i in range(1, len(items) + 1):
        if i == len(items) or items[i].source != items[start].source:
            plan += [Span(b, min(b + shard_size, i), n_input) for b in range(start, i, shard_size)]
            start, n_input = i, n_input + 1
    return plan


def assign_shards(plan: Sequence[Span], pending: Sequence[int], world: int) -> list[int]:
    """The rank of each pending shard: whole input shards per rank when there are at least as
    many as ranks, else contiguous runs of output shards; balanced by item count either way."""
    if world <= 1:
        return [0] * len(pending)
    groups: list[list[int]] = []
    for s in pending:
        if groups and plan[groups[-1][-1]].input == plan[s].input:
            groups[-1].append(s)
        else:
            groups.append([s])
    if len(groups) < world:  # one folder/table, or fewer inputs than ranks
        groups = [[s] for s in pending]
    sizes = [sum(plan[s].end - plan[s].start for s in g) for g in groups]
    return [r for g, r in zip(groups, sharding.contiguous_split(sizes, world)) for _ in g]


def _embed_shards(
    model: Any,
    dataset: _ImageDataset,
    plan: Sequence[Span],
    mine: Sequence[int],
    writer: _ShardWriter,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Embed this rank's shards in order, one DataLoader over all their batches."""
    import torch
    from tqdm import tqdm

    from clipforge.eval.zero_shot import model_dtype
    from clipforge.model import prepack

    batches, shard_of = [], []
    for s in mine:
        span = plan[s]
        for b in range(span.start, span.end, batch_size):
            batches.append(list(range(b, min(b + batch_size, span.end))))
            shard_of.append(s)
    on_gpu = torch.device(writer.device).type == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=on_gpu,
        persistent_workers=False,
    )
    model.eval()
    pixel_dtype = model_dtype(model)
    buf: list[dict[str, Any]] = []
    feats: list[np.ndarray] = []
    shard = shard_of[0]
    desc = "embed" if writer.world == 1 else f"embed rank {writer.rank}/{writer.world}"
    n_items = sum(len(b) for b in batches)
    bar = tqdm(total=n_items, unit="img", desc=desc, disable=not progress, position=writer.rank)
    with prepack.frozen(model), torch.inference_mode():  # weights fixed while embedding
        for batch, s in zip(loader, shard_of):
            if s != shard:
                bar.set_postfix_str(writer.write(shard, buf, feats), refresh=False)
                buf, feats, shard = [], [], s
            buf.extend(batch["samples"])
            if batch["images"] is not None:
                x = _to_device(batch["images"], writer.device, pixel_dtype, on_gpu)
                feats.append(_normalise(model.encode_image(x, normalize=True).float().cpu().numpy()))
            bar.update(len(batch["samples"]))
    bar.set_postfix_str(writer.write(shard, buf, feats))
    bar.close()


def _to_device(images: Any, device: Any, dtype: Any, non_blocking: bool) -> Any:
    """Pixels (or a NaFlex dict: only its patches take the pixel dtype) on the model's device."""
    if isinstance(images, dict):
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in images.items()}
        moved["patches"] = moved["patches"].to(dtype)
        return moved
    return images.to(device, dtype=dtype, non_blocking=non_blocking)


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
    n_inputs: int = 1,
    run: dict[str, str] | None = None,
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
        "layout": LAYOUT,
        **(run or {}),
    }
    path = out / STATE_FILE
    if path.is_file():
        old = read_json(path)
        if "layout" not in old and n_inputs == 1:  # before per-input shards: same cut for one input
            old["layout"] = LAYOUT
        old = {"decode": "full", "compute_dtype": "float32", **old}  # written before these existed
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


class _ShardWriter:
    """Writes one output shard: metadata part, caption embeddings, which rank wrote it and from
    which input, then the image embeddings (the marker a rerun looks for)."""

    def __init__(
        self,
        out: Path,
        plan: Sequence[Span],
        items: list[Item],
        model: Any,
        tokenizer: Callable | None,
        with_text: bool,
        dtype: np.dtype,
        device: Any,
        rank: int = 0,
        world: int = 1,
    ):
        self.out, self.plan, self.items, self.model, self.tokenizer = out, plan, items, model, tokenizer
        self.with_text, self.dtype, self.device, self.rank, self.world = with_text, dtype, device, rank, world

    def write(self, s: int, samples: list[dict[str, Any]], feats: list[np.ndarray]) -> str:
        """Write shard ``s``; returns a progress note with the total over all ranks (on disk)."""
        out, items = self.out, self.items
        dim = feats[0].shape[1] if feats else _embed_dim(self.model)
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
        if self.with_text:
            caps = [x["i"] for x in samples if not x["reason"]]
            txt = self._embed_captions([items[i].caption for i in caps], dim)
            atomic_save_npy(out / f"txt_emb_{s:05d}.npy", txt.astype(self.dtype))
        write_table(out / f"meta_{s:05d}.csv", meta)
        span = self.plan[s]
        record = {"rank": self.rank, "world_size": self.world, "items": [span.start, span.end],
                  "inputs": [items[span.start].source]}  # fmt: skip
        atomic_write_json(out / f"shard_{s:05d}.json", record)
        atomic_save_npy(out / f"img_emb_{s:05d}.npy", img.astype(self.dtype))
        n_bad = sum(1 for x in samples if x["reason"])
        done = sum(1 for _ in out.glob("img_emb_*.npy"))
        log.info("rank %d: shard %05d: %d embedded, %d skipped (all ranks: %d/%d shards)",
                 self.rank, s, len(img), n_bad, done, len(self.plan))  # fmt: skip
        return f"all ranks: {done}/{len(self.plan)} shards"

    def _embed_captions(self, caps: list[str], dim: int) -> np.ndarray:
        import torch

        txt = np.zeros((len(caps), dim), np.float32)
        idx = [j for j, c in enumerate(caps) if c.strip()]
        with torch.inference_mode():
            for b in range(0, len(idx), 256):
                chunk = idx[b : b + 256]
                tokens = self.tokenizer([caps[j] for j in chunk]).to(self.device)
                feats = self.model.encode_text(tokens, normalize=True).float().cpu().numpy()
                txt[chunk] = _normalise(feats)
        return txt


def _embed_dim(model: Any) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "embed_dim", 0) or 0)


def _finalize(
    out: Path,
    plan: Sequence[Span],
    model: Any,
    model_name: str | None,
    pretrained: str | None,
    dtype: np.dtype,
    with_text: bool,
    run: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Merge the per-shard parts into ``metadata`` + ``skipped.csv`` and write the manifest.

    Everything is read back from disk (whichever rank or run wrote a shard), so the manifest
    describes the files as they are."""
    meta, skipped, shards, dim = _merge_parts(out, plan, with_text)
    meta_path = write_table(out / f"metadata{table_suffix()}", meta)
    write_table(out / "skipped.csv", skipped)
    if skipped["path"]:
        log.warning("%d unreadable images skipped; see %s", len(skipped["path"]), out / "skipped.csv")
    manifest = {
        "format": "clipforge-embeddings",
        "version": 1,
        "model": model_name,
        "pretrained": str(pretrained) if pretrained is not None else None,
        "model_config": config_record(model),  # what the Searcher rebuilds; "model" is only its name
        "preprocess": _preprocess_record(model),  # the image convention used (--image-alpha included)
        # decode "reduced": --fast-decode (images decoded at >= 2x the model side); compute_dtype
        # "bfloat16": --precision bf16
        **(run or {}),
        "dim": int(dim),
        "count": len(meta["id"]),
        "skipped": len(skipped["path"]),
        "dtype": dtype.name,
        "normalized": True,
        "has_text": with_text,
        "metadata": meta_path.name,
        "layout": LAYOUT,
        "shards": shards,
    }
    atomic_write_json(out / MANIFEST_FILE, manifest)
    return manifest


def _merge_parts(
    out: Path, plan: Sequence[Span], with_text: bool
) -> tuple[dict[str, list[Any]], dict[str, list[Any]], list[dict[str, Any]], int]:
    """(metadata of the embedded rows with ids, skipped rows, shard records, dim) from the shards
    on disk; a shard whose metadata and embeddings disagree on the row count is an error."""
    keep = ("id", "path", "caption", "width", "height", "tar_offset", "tar_size", "row")
    meta: dict[str, list[Any]] = {k: [] for k in keep}
    skipped: dict[str, list[Any]] = {"source_index": [], "path": [], "reason": []}
    shards, dim = [], 0
    for s in range(len(plan)):
        part = read_table(out / f"meta_{s:05d}.csv")
        emb = np.load(out / f"img_emb_{s:05d}.npy", mmap_mode="r")
        ok = [j for j, r in enumerate(part["reason"]) if not r]
        if len(ok) != emb.shape[0]:
            raise DataError(f"{out}/meta_{s:05d}.csv: {len(ok)} rows but img_emb has {emb.shape[0]}")
        for j in ok:
            meta["id"].append(len(meta["id"]))
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
                **_shard_record(out, s, plan[s]),
            }
        )
    return meta, skipped, shards, dim


def _shard_record(out: Path, s: int, span: Span) -> dict[str, Any]:
    """Who wrote shard ``s`` and what it covers; shards of older versions have no record."""
    path = out / f"shard_{s:05d}.json"
    rec = read_json(path) if path.is_file() else {}
    return {
        "rank": rec.get("rank"),
        "items": rec.get("items", [span.start, span.end]),
        "inputs": rec.get("inputs", []),
    }
