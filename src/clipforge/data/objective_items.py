"""Training items for objectives that need more than ``(image, caption)``: dicts of per-sample tensors.

:class:`ObjectiveItems` wraps a :class:`~clipforge.data.pairs.PairsDataset` (or folder dataset) and
returns ``{"image", "tokens", "ids", ...}``; the default collate stacks them and the trainer hands
the extra keys to :meth:`clipforge.train.task.ContrastiveTask.encode`:

=========================  =====================================================================
``ids``                    group id: rows with the same image path, or the same ``group_key``
                           value (e.g. a product id), are positives of each other
``hard_negative_tokens``   ``[H, L]`` captions drawn from the ``hard_negative_key`` column(s);
                           ``hard_negatives_valid`` ``[H]`` is False where the row had none
``image_views``            a second, independently augmented view of the image (SLIP)
``teacher_image/_text``    precomputed teacher features (:class:`TeacherFeatures`)
=========================  =====================================================================

``captions_per_image=k``: the item space is ``len(dataset) * k``; item ``i*k + j`` is image ``i``
with its ``j``-th caption of a seeded per-epoch shuffle (cycling when it has fewer than ``k``).
``sampler_group = k`` tells :class:`~clipforge.data.loader.EpochSampler` to keep the ``k`` items of
one image together (and on one rank), so a batch of ``B`` holds ``B / k`` images with ``k``
captions each, and the loader's position is still one integer: exact resume is unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from clipforge.data.column_tables import read_table
from clipforge.data.embeddings import iter_embedding_chunks, load_manifest
from clipforge.data.pairs import transform_pair
from clipforge.errors import DataError


def _group_ids(keys: Sequence[str]) -> list[int]:
    """Equal keys -> equal ids, numbered by first appearance (the same on every rank)."""
    index: dict[str, int] = {}
    return [index.setdefault(k, len(index)) for k in keys]


class ObjectiveItems(Dataset):
    """Dict items with group ids, hard negatives, a second view and teacher features (see module)."""

    def __init__(
        self,
        base: Any,
        *,
        captions_per_image: int = 1,
        group_key: str | None = None,
        hard_negative_keys: Sequence[str] = (),
        hard_negatives: int = 1,
        image_views: bool = False,
        teacher: TeacherFeatures | None = None,
    ) -> None:
        if not hasattr(base, "fetch"):
            raise DataError(
                f"{getattr(base, 'source', type(base).__name__)}: group ids, several captions per image, hard "
                "negatives, image views and teacher features need a table or an image folder as --data"
            )
        if captions_per_image < 1 or hard_negatives < 1:
            raise DataError("captions_per_image and hard_negatives must be >= 1")
        self.base, self.k, self.h = base, int(captions_per_image), int(hard_negatives)
        self.sampler_group = self.k
        self.views, self.teacher = image_views, teacher
        extras = getattr(base, "extras", {})
        for key in [group_key, *hard_negative_keys]:
            if key is not None and key not in extras:
                raise DataError(
                    f"{base.source}: column {key!r} was not read (pass it as an extra key of the table)"
                )
        if group_key is not None:  # a row without a value is a group of its own
            keys = [f"v:{v[0]}" if v else f"row:{i}" for i, v in enumerate(extras[group_key])]
        else:
            keys = [f"v:{p}" for p in base.image_paths]
        self.ids = _group_ids(keys)
        self.negatives = [sum((extras[key][i] for key in hard_negative_keys), []) for i in range(len(base))]
        self.use_negatives = bool(hard_negative_keys)
        self.skipped = getattr(base, "skipped", None)

    def __len__(self) -> int:
        return len(self.base) * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        i, j = divmod(int(index), self.k)
        found = self.base.fetch(i, choice=j if self.k > 1 else None)
        if found is None:
            return None
        row, image, caption = found
        pixels, tokens = self.base._apply(image, caption)
        item: dict[str, Any] = {"image": pixels, "tokens": tokens, "ids": torch.tensor(self.ids[row])}
        if self.views:
            item["image_views"] = self.base.transform(image) if self.base.transform is not None else pixels
        if self.use_negatives:
            item["hard_negative_tokens"], item["hard_negatives_valid"] = self._negatives(row)
        if self.teacher is not None:
            item["teacher_image"], item["teacher_text"] = self.teacher.lookup(
                self.base.image_paths[row], caption
            )
        return item

    def _negatives(self, row: int) -> tuple[Any, torch.Tensor]:
        """``H`` hard-negative captions of ``row`` (seeded per epoch), tokenised; placeholders if none."""
        pool = self.negatives[row]
        rng = random.Random(f"neg:{self.base.seed}:{getattr(self, 'epoch', 0)}:{row}")
        if not pool:
            texts, valid = [""] * self.h, [False] * self.h
        else:
            order = rng.sample(range(len(pool)), len(pool))
            texts, valid = [pool[order[m % len(pool)]] for m in range(self.h)], [True] * self.h
        tokens = [transform_pair(None, t, None, self.base.tokenizer)[1] for t in texts]
        stacked = (
            torch.stack([torch.as_tensor(t) for t in tokens]) if self.base.tokenizer is not None else texts
        )
        return stacked, torch.tensor(valid)


class TeacherFeatures:
    """Teacher embeddings from a ``clipforge embed`` folder, looked up by image path and caption.

    ``clipforge embed`` stores one image and one caption embedding per image; a sample whose
    caption is not the one embedded has no teacher text feature, which is an error (embed the
    table with one caption per row, or distill on the fly with ``--distill-model``).
    """

    def __init__(self, emb_dir: str | Path) -> None:
        emb_dir = Path(emb_dir)
        manifest = load_manifest(emb_dir)
        if not manifest.get("has_text"):
            raise DataError(f"{emb_dir}: no caption embeddings (txt_emb); embed a table with captions")
        meta = read_table(emb_dir / manifest["metadata"])
        self.image = np.concatenate(
            [np.asarray(a, dtype=np.float32) for a in iter_embedding_chunks(emb_dir, "image")]
        )
        self.text = np.concatenate(
            [np.asarray(a, dtype=np.float32) for a in iter_embedding_chunks(emb_dir, "text")]
        )
        self.rows = {str(Path(p).resolve()): r for r, p in enumerate(meta["path"])}
        self.captions = [str(c) for c in meta["caption"]]
        self.source, self.model = str(emb_dir), manifest.get("model")

    def lookup(self, path: str, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows.get(str(Path(path).resolve()))
        if row is None:
            raise DataError(f"{self.source}: no teacher embedding for image {path}")
        if self.captions[row] != caption:
            raise DataError(
                f"{self.source}: the teacher's caption embedding of {path} is for {self.captions[row]!r}, "
                f"not {caption!r}; embed one caption per row or use --distill-model"
            )
        return torch.from_numpy(self.image[row]), torch.from_numpy(self.text[row])
