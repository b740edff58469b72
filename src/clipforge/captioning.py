"""Caption collections of images with a CoCa model (``clipforge caption``).

Images come from the one data layer (:func:`clipforge.data.items.list_items`): a folder, an image
file or pattern, a pairs table (CSV/TSV/JSON/JSONL/parquet, paths or embedded bytes) or webdataset
shards, exactly as ``embed``/``eval``/``train`` read them. Each record is ``{"image", "caption"}``
plus the ``reference`` caption the source carried (a table's caption column, a sibling ``.txt``),
or ``{"image", "error"}`` for an image that cannot be decoded (the run goes on). The JSONL file is
written atomically: an interrupted run leaves no half-written file behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from clipforge.errors import ConfigError


def item_id(item: Any) -> str:
    """A stable name for an item: its path, plus the parquet row or tar member offset."""
    if item.row >= 0:
        return f"{item.path}#row={item.row}"
    if item.tar_offset >= 0:
        return f"{item.path}#offset={item.tar_offset}"
    return item.path


def _decoded(items: Sequence[Any], preprocess: Callable) -> tuple[list[tuple[Any, torch.Tensor]], list[dict]]:
    """Preprocessed tensors of the decodable items, and error records for the others."""
    from clipforge.data.images import load_image

    good, bad = [], []
    for item in items:
        try:
            good.append(
                (item, preprocess(load_image(item.read_bytes(), keep_mode=True)))
            )  # the transform converts
        except Exception as e:  # unreadable, truncated, not an image: report and go on
            bad.append({"image": item_id(item), "error": f"{type(e).__name__}: {e}"})
    return good, bad


def can_caption(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a captioning decoder (a CoCa): what ``generate`` needs."""
    return getattr(model, "text_decoder", None) is not None and callable(getattr(model, "generate", None))


def require_captioner(model: torch.nn.Module) -> None:
    """Raise a :class:`ConfigError` naming the model when it cannot caption."""
    if not can_caption(model):
        raise ConfigError(
            f"{getattr(model, 'architecture', 'this model')} cannot caption: it has no captioning decoder "
            "(use a CoCa model, e.g. --model coca_ViT-B-32 --pretrained mscoco_finetuned_laion2b_s13b_b90k)"
        )


def iter_captions(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = False,
    **generate_options: Any,
) -> Iterator[dict[str, Any]]:
    """Caption records for ``items`` in batches (``generate_options``: :func:`~clipforge.model.generate.generate`'s)."""
    from tqdm import tqdm

    from clipforge.model.generate import captions_from_ids

    require_captioner(model)
    model.eval()
    pad = generate_options.get("pad_token_id", 0)
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc="caption", unit="batch", disable=not progress):
        batch = items[start : start + batch_size]
        good, bad = _decoded(batch, preprocess)
        records = {r["image"]: r for r in bad}
        if good:
            ids = model.generate(torch.stack([t for _, t in good]).to(device), **generate_options)
            for (item, _), text in zip(good, captions_from_ids(tokenizer, ids.cpu(), pad)):
                records[item_id(item)] = {"image": item_id(item), "caption": text}
                if item.caption:
                    records[item_id(item)]["reference"] = item.caption
        yield from (records[item_id(item)] for item in batch)  # in the source's order


def caption_images(
    model: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Any,
    source: str | Sequence[str],
    out: str | Path | None = None,
    *,
    table: Any = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Caption every image of a data spec; with ``out``, also write the records as JSONL (atomically)."""
    from clipforge.atomic import atomic_write_text
    from clipforge.data.items import list_items

    records = list(iter_captions(model, preprocess, tokenizer, list_items(source, table), **options))
    if out is not None:
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
