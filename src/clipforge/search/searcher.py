"""Query an index by text, by image, by an indexed image's id, or by a weighted mix of them.

A query is a sum of unit embeddings times weights, re-normalised: ``image + 0.5 * "in winter"``
moves an image query towards the text. The model that produced the index is named in its manifest
(``model.name`` / ``model.pretrained`` / ``model.config``: the architecture itself, so a custom
one is rebuilt as it was, not as a registered name), and the Searcher rebuilds exactly that model on first
use unless one is passed in; queries by ``image_id`` need no model at all.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import ClipforgeError
from clipforge.model.architecture import config_record, model_label, model_source
from clipforge.search.index import load_index, search_index
from clipforge.search.tables import open_metadata

log = logging.getLogger(__name__)

COMPONENTS = ("text", "image", "image_id")
DEDUP_THRESHOLD = 0.98


class QueryError(ClipforgeError, ValueError):
    """The query itself is invalid (no component, bad weights, unknown id); the server answers 4xx."""


@dataclass
class Result:
    """One hit; ``score`` is the cosine similarity between the query and the indexed image."""

    id: int
    score: float
    path: str
    caption: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Query:
    """Already-encoded query parts; built by :meth:`Searcher.search` or by the server's batcher."""

    text: str | None = None
    image: Any = None  # PIL.Image after decoding
    image_id: int | None = None
    weights: Any = None
    k: int = 10
    dedup: bool = False


class Searcher:
    """Load an index folder once; answer many queries (thread-safe: one query runs at a time)."""

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: Any = None,
        tokenizer: Any = None,
        preprocess: Any = None,
        *,
        device: Any = "cpu",
        mmap: bool = True,
        dedup_threshold: float = DEDUP_THRESHOLD,
        image_alpha: str | None = None,
    ):
        self.index_dir = Path(index_dir)
        self.index, self.manifest = load_index(self.index_dir, mmap=mmap)
        self.embeddings = np.load(self.index_dir / self.manifest["embeddings_file"], mmap_mode="r")
        self.metadata = open_metadata(self.index_dir / self.manifest["metadata_file"])  # memory-mapped
        self.count = int(self.manifest["count"])
        if len(self.metadata["id"]) != self.count or self.embeddings.shape[0] != self.count:
            raise ClipforgeError(f"{self.index_dir}: index, embeddings and metadata disagree on the count")
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device = device
        self.dedup_threshold = dedup_threshold
        self.image_alpha = image_alpha  # --image-alpha for image queries; None: the model's own rule
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ model
    @property
    def architecture(self) -> str | None:
        """The model's name as recorded by ``embed`` (the real architecture, e.g. "ViT-B-32" or
        "custom (from my-arch.json)"), or the given/loaded model's own name."""
        name = (self.manifest.get("model") or {}).get("name")
        if self.model is not None and not name:
            return model_label(self.model)
        return name

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The recorded architecture itself (``CLIPConfig.to_dict()``), when the manifest has it."""
        return (self.manifest.get("model") or {}).get("config") or config_record(self.model)

    def ensure_model(self) -> None:
        """Build the embedding model named in the manifest (once), unless one was given."""
        with self._lock:
            if self.model is not None and self.tokenizer is not None and self.preprocess is not None:
                return
            info = self.manifest.get("model") or {}
            source = model_source(info.get("name"), info.get("config"))
            if source is None and not info.get("pretrained"):
                raise ClipforgeError(
                    f"{self.index_dir}: the manifest names no model; pass model=, "
                    "tokenizer= and preprocess= to Searcher"
                )
            from clipforge.factory import create_model_and_transforms, get_tokenizer

            log.info("loading model %s (pretrained=%s)", self.architecture, info.get("pretrained"))
            model, _, preprocess = create_model_and_transforms(
                source, pretrained=info.get("pretrained"), device=self.device, image_alpha=self.image_alpha
            )
            _check_rebuilt(model, info, self.index_dir)
            if self.image_alpha is None and info.get("preprocess"):  # what embed used, flags included
                from clipforge.transforms import PreprocessConfig, image_transform

                preprocess = image_transform(PreprocessConfig.from_dict(info["preprocess"]))
            if self.model is None:  # ours alone, for inference only: prepacked CPU linears
                from clipforge.model import prepack

                self.model = model
                prepack.enable(model)
            self.preprocess = self.preprocess or preprocess
            self.tokenizer = self.tokenizer or get_tokenizer(model)  # the checkpoint's tokenizer settings
            self.model.eval()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        self.ensure_model()
        with self._lock, torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self.device)
            return _unit(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """Encode decoded PIL images (see :func:`open_image`) in one batch."""
        import torch

        from clipforge.naflex_transforms import images_to, stack_images

        self.ensure_model()
        with self._lock, torch.inference_mode():
            x = images_to(stack_images([self.preprocess(im) for im in images]), self.device)
            return _unit(self.model.encode_image(x, normalize=True).float().cpu().numpy())

    @property
    def can_caption(self) -> bool:
        """Whether the loaded model writes captions (a CoCa); False while no model is loaded."""
        from clipforge.captioning import can_caption

        return self.model is not None and can_caption(self.model)

    def caption_images(self, images: Sequence[Any], **generate_options: Any) -> list[str]:
        """Captions of decoded PIL images in one ``generate`` batch (open_clip's defaults unless given).

        The images go through the index's preprocessing, the one its embeddings were made with.
        """
        import torch

        from clipforge.captioning import require_captioner
        from clipforge.model.generate import captions_from_ids

        self.ensure_model()
        require_captioner(self.model)
        with self._lock, torch.inference_mode():
            x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            ids = self.model.generate(x, **generate_options)
        return captions_from_ids(self.tokenizer, ids.cpu(), generate_options.get("pad_token_id", 0))

    def vector(self, image_id: int) -> np.ndarray:
        self.check_id(image_id)
        return _unit(np.asarray(self.embeddings[image_id : image_id + 1], dtype=np.float32))[0]

    def check_id(self, image_id: Any) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
            raise QueryError(f"image_id must be an integer, got {type(image_id).__name__}")
        if not 0 <= int(image_id) < self.count:
            raise QueryError(f"image_id {image_id} out of range [0, {self.count})")
        return int(image_id)

    # ------------------------------------------------------------------ search
    def search(
        self,
        text: str | None = None,
        image: Any = None,
        weights: Any = None,
        k: int = 10,
        dedup: bool = False,
        image_id: int | None = None,
    ) -> list[Result]:
        """Top-``k`` images for a text, an image (path, bytes or PIL) and/or an indexed image id."""
        pil = open_image(image) if image is not None else None
        q = Query(text=text, image=pil, image_id=image_id, weights=weights, k=k, dedup=dedup)
        return self.search_many([q])[0]

    def search_many(self, queries: Sequence[Query]) -> list[list[Result]]:
        """Encode all texts and images of ``queries`` in two batches, then one index search."""
        texts = [q.text for q in queries if q.text is not None]
        images = [q.image for q in queries if q.image is not None]
        for q in queries:
            if q.text is not None and not q.text.strip():
                raise QueryError("text is empty")
            if not isinstance(q.k, int) or isinstance(q.k, bool) or q.k <= 0:
                raise QueryError(f"k must be a positive integer, got {q.k!r}")
            if q.image_id is not None:
                self.check_id(q.image_id)
        t_emb = iter(self.encode_text(texts)) if texts else iter(())
        i_emb = iter(self.encode_images(images)) if images else iter(())
        vecs = []
        for q in queries:
            parts = {}
            if q.text is not None:
                parts["text"] = next(t_emb)
            if q.image is not None:
                parts["image"] = next(i_emb)
            if q.image_id is not None:
                parts["image_id"] = self.vector(q.image_id)
            vecs.append(combine(parts, q.weights))
        return self.search_vectors(np.stack(vecs), [q.k for q in queries], [q.dedup for q in queries])

    def search_vectors(
        self, vectors: np.ndarray, ks: Sequence[int], dedups: Sequence[bool]
    ) -> list[list[Result]]:
        k_max = max(ks)
        fetch = min(self.count, max(k * (4 if d else 1) + (16 if d else 0) for k, d in zip(ks, dedups)))
        fetch = max(fetch, min(k_max, self.count))
        with self._lock:
            scores, ids = search_index(
                self.index,
                self.manifest["kind"],
                self.manifest["metric"],
                self.embeddings,
                vectors,
                fetch,
                self.manifest.get("search_params", {}),
            )
        out = []
        for row_s, row_i, k, d in zip(scores, ids, ks, dedups):
            keep = [(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0]
            if d:
                keep = self._dedup(keep)
            out.append([self.result(i, s) for i, s in keep[:k]])
        return out

    def _dedup(self, hits: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """Greedy: drop a hit whose embedding is nearly identical to one already kept."""
        kept: list[tuple[int, float]] = []
        vecs: list[np.ndarray] = []
        for i, s in hits:
            v = np.asarray(self.embeddings[i], dtype=np.float32)
            v = v / max(float(np.linalg.norm(v)), 1e-12)
            if vecs and float(np.max(np.stack(vecs) @ v)) >= self.dedup_threshold:
                continue
            kept.append((i, s))
            vecs.append(v)
        return kept

    def result(self, i: int, score: float) -> Result:
        m = self.metadata
        return Result(
            id=i,
            score=round(score, 6),
            path=m["path"][i],
            caption=m["caption"][i],
            width=int(m["width"][i]),
            height=int(m["height"][i]),
        )

    def image_bytes(self, image_id: int) -> bytes:
        """The stored image file (or tar member) of an indexed id; the id is never a path."""
        from clipforge.data.items import read_item_bytes

        i = self.check_id(image_id)
        m = self.metadata

        def cell(name: str) -> int:  # indexes from older versions lack the newer columns
            return int(m[name][i]) if name in m else -1

        return read_item_bytes(m["path"][i], cell("tar_offset"), cell("tar_size"), cell("row"))


def _check_rebuilt(model: Any, info: Mapping[str, Any], index_dir: Path) -> None:
    """Refuse a rebuilt model whose architecture is not the recorded one (e.g. the checkpoint
    folder was overwritten since): its queries would not live in the index's embedding space."""
    from clipforge.model.architecture import same_architecture
    from clipforge.model.config import CLIPConfig

    recorded = info.get("config")
    if recorded and not same_architecture(model.config, CLIPConfig.from_dict(dict(recorded))):
        raise ClipforgeError(
            f"{index_dir}: the index was embedded with {info.get('name')!r} (config in its manifest), but "
            f"pretrained={info.get('pretrained')!r} now holds a different architecture "
            f"({model_label(model)!r}); re-embed, or point the manifest at the original weights"
        )


def combine(parts: Mapping[str, np.ndarray], weights: Any) -> np.ndarray:
    """Weighted sum of unit query embeddings, re-normalised.

    ``weights`` is ``None`` (all 1), a mapping ``{"text": .3, "image": .7}``, or a sequence in the
    order text, image, image_id of the parts present.
    """
    if not parts:
        raise QueryError("give text, image or image_id to search with")
    names = [c for c in COMPONENTS if c in parts]
    if weights is None:
        w = {c: 1.0 for c in names}
    elif isinstance(weights, Mapping):
        unknown = set(weights) - set(COMPONENTS)
        if unknown:
            raise QueryError(f"unknown weight key(s) {sorted(unknown)}; use {list(COMPONENTS)}")
        w = {c: weights.get(c, 1.0) for c in names}
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        if len(weights) != len(names):
            raise QueryError(f"{len(weights)} weights for {len(names)} query parts ({', '.join(names)})")
        w = dict(zip(names, weights))
    else:
        raise QueryError("weights must be a list of numbers or a {part: number} mapping")
    for c, v in w.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise QueryError(f"weight for {c} must be a finite number, got {v!r}")
    q = sum(float(w[c]) * parts[c] for c in names)
    norm = float(np.linalg.norm(q))
    if not math.isfinite(norm) or norm < 1e-6:
        raise QueryError("the weighted query parts cancel out (zero vector); change the weights")
    return (q / norm).astype(np.float32)


def open_image(image: Any, *, max_pixels: int | None = None) -> Any:
    """Path, bytes, file-like or PIL image -> PIL image in its own mode (bombs and junk raise
    BadImageError); the model's transform converts it to RGB where its convention does."""
    from PIL import Image

    from clipforge.data.images import load_image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        image = io.BytesIO(bytes(image))
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    return load_image(image, keep_mode=True, **kw)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
