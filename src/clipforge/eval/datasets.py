"""Evaluation datasets behind one small interface, and batched feature extraction.

Every source (image folder, pairs table, caption folder, webdataset shards, the synthetic shapes
set, torchvision datasets on disk) becomes an :class:`EvalDataset`: a map-style dataset whose
items are ``(transform(image), index)`` plus, per index, a class label and/or a list of captions.
Metrics then look labels and captions up by the indices that actually came back, so an image
that fails to decode is skipped and counted without shifting anything.

Dataset specs (the CLI's ``--data``):

====================================  ============================================================
``DIR`` with class sub-folders        ImageFolder: class = folder name (classification)
``DIR`` of images + ``.txt`` files    one image per caption file, one caption per line (retrieval)
``table.csv|tsv|json|jsonl|parquet``  pairs table(s), several caption columns allowed (retrieval)
``DIR`` of ``*.tar`` / ``a.tar`` /    webdataset shards: ``jpg|png|webp`` + ``txt`` (captions, one
``shard-{000..009}.tar``              per line) and/or ``cls`` (label); ``classnames.txt`` beside
``synthetic:shapes?split=heldout``    the built-in shapes (``label=shape|colour|colour_shape``)
``cifar10:ROOT`` / ``cifar100:ROOT``  torchvision datasets on disk; also ``torchvision:NAME:ROOT``
====================================  ============================================================
"""

from __future__ import annotations

import inspect
import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from clipforge.data.images import IMAGE_EXTENSIONS
from clipforge.errors import DataError

log = logging.getLogger(__name__)

TORCHVISION_ALIASES = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "stl10": "STL10",
    "svhn": "SVHN",
    "food101": "Food101",
    "flowers102": "Flowers102",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "gtsrb": "GTSRB",
    "pets": "OxfordIIITPet",
    "cars": "StanfordCars",
    "fgvc-aircraft": "FGVCAircraft",
    "country211": "Country211",
    "caltech101": "Caltech101",
}


class EvalDataset(torch.utils.data.Dataset):
    """Images by index plus what the tasks need.

    ``labels``/``classnames`` make it usable for zero-shot and linear probe; ``captions`` (a list
    of captions per image) for retrieval. ``templates`` may carry dataset-specific prompts.
    """

    def __init__(
        self,
        name: str,
        num_items: int,
        load_image: Callable[[int], Any],
        *,
        labels: Sequence[int] | None = None,
        classnames: Sequence[str] | None = None,
        captions: Sequence[Sequence[str]] | None = None,
        templates: Sequence[str] | None = None,
        transform: Callable | None = None,
    ) -> None:
        self.name = name
        self.num_items = int(num_items)
        self.load_image = load_image
        self.labels = list(labels) if labels is not None else None
        self.classnames = list(classnames) if classnames is not None else None
        self.captions = [list(c) for c in captions] if captions is not None else None
        self.templates = list(templates) if templates is not None else None
        self.transform = transform
        self.num_skipped = 0
        if self.labels is not None and len(self.labels) != self.num_items:
            raise DataError(f"{name}: {len(self.labels)} labels for {self.num_items} images")
        if self.captions is not None and len(self.captions) != self.num_items:
            raise DataError(f"{name}: {len(self.captions)} caption lists for {self.num_items} images")

    @property
    def supports_classification(self) -> bool:
        return self.labels is not None and self.classnames is not None

    @property
    def supports_retrieval(self) -> bool:
        return self.captions is not None

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, idx: int) -> tuple[Any, int] | None:
        from clipforge.data.images import BadImageError

        try:
            image = self.load_image(idx)
        except BadImageError as e:
            log.warning("%s: skipping item %d: %s", self.name, idx, e)
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, idx

    def with_transform(self, transform: Callable | None) -> EvalDataset:
        self.transform = transform
        return self


def collate_skip_none(batch: list[Any]) -> Any:
    """Default collate after dropping items that failed to load (``None``)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return None
    if isinstance(kept[0], tuple) and isinstance(kept[0][0], dict):  # NaFlex: patch counts differ
        from clipforge.naflex_transforms import naflex_collate

        rest = torch.utils.data.default_collate([b[1:] for b in kept])
        return (naflex_collate([b[0] for b in kept]), *rest)
    return torch.utils.data.default_collate(kept)


def images_to(images: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """A pixel batch, or a NaFlex patch dict (only its patches take the model dtype), on the device."""
    from clipforge.naflex_transforms import images_to as moved_to
    from clipforge.naflex_transforms import is_patch_dict

    moved = moved_to(images, device)
    if not is_patch_dict(moved):
        return moved.to(dtype)
    moved["patches"] = moved["patches"].to(dtype)
    return moved


def make_loader(
    dataset: torch.utils.data.Dataset, batch_size: int = 64, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_skip_none
    )


def extract_features(
    model: torch.nn.Module,
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    *,
    normalize: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image batch; returns (float32 features on CPU, concatenated second items).

    The loader yields ``(images, targets)``: indices for an :class:`EvalDataset`, labels for an
    ordinary classification loader. ``None`` batches (all items failed to load) are skipped.
    """
    from clipforge.eval.zero_shot import _maybe_tqdm, eval_mode, model_device, model_dtype

    device = torch.device(device) if device is not None else model_device(model)
    dtype = model_dtype(model)
    feats, targets = [], []
    with eval_mode(model), torch.inference_mode():
        for batch in _maybe_tqdm(loader, progress, "encode images"):
            if batch is None:
                continue
            images, target = batch
            x = model.encode_image(images_to(images, device, dtype)).float()
            if normalize:
                x = torch.nn.functional.normalize(x, dim=-1)
            feats.append(x.cpu())
            targets.append(torch.as_tensor(target).cpu())
    if not feats:
        raise DataError("no images could be loaded for evaluation")
    return torch.cat(feats), torch.cat(targets)


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    device: torch.device | str | None = None,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised float32 text features on CPU, encoded in batches."""
    from clipforge.eval.zero_shot import _maybe_tqdm, eval_mode, model_device

    device = torch.device(device) if device is not None else model_device(model)
    out = []
    starts = range(0, len(texts), batch_size)
    with eval_mode(model), torch.inference_mode():
        for s in _maybe_tqdm(starts, progress, "encode texts"):
            tokens = tokenizer(list(texts[s : s + batch_size])).to(device)
            out.append(torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


# ---------------------------------------------------------------------------------------------
# sources


def _open_nth(paths: Sequence[str], idx: int) -> Any:
    from clipforge.data.images import load_image

    return load_image(paths[idx], keep_mode=True)  # the transform converts, per its convention


def _first_item(dataset: Any, idx: int) -> Any:
    return dataset[idx][0]


def _pretty(name: str) -> str:
    return name.replace("_", " ").strip()


def image_folder(root: str | os.PathLike, transform: Callable | None = None) -> EvalDataset:
    """ImageFolder layout: ``root/<class>/<image>``; classes sorted by folder name."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / cls):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root}: class folders contain no images ({', '.join(IMAGE_EXTENSIONS)})")
    ds = EvalDataset(
        str(root),
        len(paths),
        partial(_open_nth, paths),
        labels=labels,
        classnames=[_pretty(c) for c in classes],
    )
    ds.paths = paths  # type: ignore[attr-defined]
    return ds.with_transform(transform)


def from_pairs(source: Any, name: str | None = None, transform: Callable | None = None) -> EvalDataset:
    """Wrap ``clipforge.data.pairs`` datasets (or anything with ``get_image`` + ``all_captions``)."""
    ds = EvalDataset(
        name or getattr(source, "source", type(source).__name__),
        len(source.all_captions),
        source.get_image,
        captions=source.all_captions,
    )
    ds.paths = list(getattr(source, "image_paths", []))  # type: ignore[attr-defined]
    return ds.with_transform(transform)


def pairs_table(
    path: str | os.PathLike | Sequence[str | os.PathLike], transform: Callable | None = None, **kwargs: Any
) -> EvalDataset:
    """A table (or several read as one) for retrieval; ``kwargs`` go to ``PairsDataset``."""
    from clipforge.data.pairs import PairsDataset

    ds = PairsDataset(path, **kwargs)
    return from_pairs(ds, ds.source, transform)


def caption_folder(root: str | os.PathLike, transform: Callable | None = None) -> EvalDataset:
    from clipforge.data.pairs import FolderPairsDataset

    return from_pairs(FolderPairsDataset(root), str(root), transform)


def synthetic_shapes(
    *,
    task: str = "classification",
    label: str = "shape",
    split: str | None = None,
    n: int | None = None,
    seed: int | None = None,
    image_size: int = 64,
    caption_style: str = "full",
    transform: Callable | None = None,
) -> EvalDataset:
    """The built-in shapes. Classification defaults to the held-out (shape, colour) combinations
    with ``label`` classes; retrieval to distinct captions from the validation split."""
    from clipforge.data import synthetic

    if task == "retrieval":
        split, n, seed = split or "val", n or 200, 2 if seed is None else seed
        images, captions = synthetic.retrieval_set(
            n, split=split, seed=seed, image_size=image_size, caption_style=caption_style
        )
        name = f"synthetic:shapes?split={split}&n={n}&seed={seed}"
        return EvalDataset(name, n, images.__getitem__, captions=[[c] for c in captions]).with_transform(
            transform
        )
    split, n, seed = split or "heldout", n or 600, 1 if seed is None else seed
    ds = synthetic.SyntheticShapes(
        n, split=split, seed=seed, image_size=image_size, caption_style=caption_style
    )
    name = f"synthetic:shapes?split={split}&n={n}&seed={seed}&label={label}"
    out = EvalDataset(
        name,
        n,
        ds.get_image,
        labels=ds.labels(label),
        classnames=synthetic.class_names(label),
        captions=ds.all_captions,
        templates=["a {}.", "a photo of a {}.", "a drawing of a {}."],
    )
    return out.with_transform(transform)


def torchvision_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    split: str = "test",
    download: bool = False,
    transform: Callable | None = None,
) -> EvalDataset:
    """A ``torchvision.datasets`` class by name (``CIFAR10``) or alias (``cifar10``), on disk
    under ``root``; ``download`` is passed through for users with internet."""
    import torchvision.datasets as tvd

    cls_name = TORCHVISION_ALIASES.get(name.lower(), name)
    cls = getattr(tvd, cls_name, None)
    if cls is None or not isinstance(cls, type):
        raise DataError(f"unknown torchvision dataset {name!r}; aliases: {', '.join(TORCHVISION_ALIASES)}")
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {"root": str(root)}
    if "download" in params:
        kwargs["download"] = download
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    try:
        ds = cls(**kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        hint = "" if download else " (pass --download to fetch it)"
        raise DataError(f"{cls_name} not found under {root}{hint}: {e}") from e
    classes = getattr(ds, "classes", None)
    if classes is None:
        raise DataError(f"{cls_name} has no 'classes' attribute; zero-shot needs class names")
    labels = None
    for attr in ("targets", "labels", "_labels", "y"):
        if hasattr(ds, attr):
            labels = [int(t) for t in getattr(ds, attr)]
            break
    if labels is None:
        labels = [int(ds[i][1]) for i in range(len(ds))]
    return EvalDataset(
        f"{cls_name}:{split}",
        len(ds),
        partial(_first_item, ds),
        labels=labels,
        classnames=[_pretty(str(c)) for c in classes],
    ).with_transform(transform)


# ---------------------------------------------------------------------------------------------
# webdataset shards, indexed with the project's one tar index (``data.shards.ShardIndex``: a
# header-only scan with offsets): evaluation needs order and random access, not shuffling


class _ShardImages:
    """``idx -> PIL image`` by (shard, offset, size); file handles are opened lazily per
    process, so a DataLoader worker never shares a file offset with its parent."""

    def __init__(self, shards: list[str], members: list[tuple[int, int, int]]) -> None:
        self.shards, self.members = shards, members
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __call__(self, idx: int) -> Any:
        from clipforge.data.images import load_image

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        s, offset, size = self.members[idx]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shards[s], "rb")  # noqa: SIM115 - cached handle
        f.seek(offset)
        return load_image(io.BytesIO(f.read(size)), keep_mode=True)  # the transform converts

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "members": self.members, "_files": {}, "_pid": -1}


CB_CLASSNAMES = "classnames.txt"
CB_TEMPLATES = "zeroshot_classification_templates.txt"


def webdataset_shards(
    spec: str | os.PathLike, transform: Callable | None = None, split: str | None = None
) -> EvalDataset:
    """Shards with ``<key>.<image ext>`` images and ``<key>.txt`` captions (one per line) and/or
    ``<key>.cls`` labels, in any of these forms:

    * CLIP_benchmark's webdataset root: ``ROOT/{classnames.txt,
      zeroshot_classification_templates.txt}`` and split folders ``ROOT/test/`` (default) or
      ``ROOT/train/`` holding ``0.tar .. N-1.tar`` and ``nshards.txt``;
    * one split folder ``ROOT/test`` (class names and templates are then read from ``ROOT``);
    * a folder of ``.tar`` files, one ``.tar``, a brace pattern or a glob (class names and
      templates beside the shards).

    Without ``classnames.txt`` classes are named ``class 0..K-1``."""
    from clipforge.data.shards import IMAGE_EXTS

    shards, meta = _resolve_shards(os.fspath(spec), split)
    members: list[tuple[int, int, int]] = []
    captions: list[list[str]] = []
    labels: list[int] = []
    for s, shard in enumerate(shards):
        _index_shard(s, shard, members, captions, labels)
    if not members:
        raise DataError(f"{spec}: the shards hold no images ({', '.join(IMAGE_EXTS)})")
    has_cls = all(label >= 0 for label in labels)
    classnames = _shard_classnames(meta, labels) if has_cls else None
    templates = None
    if (meta / CB_TEMPLATES).is_file():
        from clipforge.eval.templates import load_template_file

        templates = load_template_file(meta / CB_TEMPLATES)
    return EvalDataset(
        os.fspath(spec),
        len(members),
        _ShardImages(shards, members),
        labels=labels if has_cls else None,
        classnames=classnames,
        captions=captions if any(captions) else None,
        templates=templates,
    ).with_transform(transform)


def _index_shard(s: int, shard: str, members: list, captions: list[list[str]], labels: list[int]) -> None:
    """Append shard ``s``'s samples: image (shard, offset, size), captions and label (-1: none).
    The small ``.txt``/``.cls`` members are read by offset from one open handle."""
    from clipforge.data.shards import IMAGE_EXTS, ShardIndex

    index = ShardIndex.build(shard)
    with open(shard, "rb") as f:

        def text(span: tuple[int, int]) -> str:
            f.seek(span[0])
            return f.read(span[1]).decode("utf-8", "replace")

        for key, parts in index.samples:
            ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if ext is None:
                log.warning("%s: sample %s has no image (%s); skipped", shard, key, "/".join(IMAGE_EXTS))
                continue
            members.append((s, *parts[ext]))
            raw = text(parts["txt"]) if "txt" in parts else ""
            captions.append([c.strip() for c in raw.splitlines() if c.strip()])
            labels.append(_parse_label(text(parts["cls"]), shard, key) if "cls" in parts else -1)


def _parse_label(raw: str, shard: str, key: str) -> int:
    try:
        label = int(raw.strip())
    except ValueError:
        raise DataError(f"{shard}: {key}.cls is not an integer class index: {raw[:40]!r}") from None
    if label < 0:
        raise DataError(f"{shard}: {key}.cls is negative ({label})")
    return label


def _shard_classnames(meta: Path, labels: list[int]) -> list[str]:
    names_file = meta / CB_CLASSNAMES
    if not names_file.is_file():
        return [f"class {i}" for i in range(max(labels) + 1)]
    from clipforge.eval.templates import load_classnames_file

    names = load_classnames_file(names_file)
    if max(labels) >= len(names):
        raise DataError(f"{names_file}: {len(names)} class names but label {max(labels)} found")
    return names


def _resolve_shards(spec: str, split: str | None) -> tuple[list[str], Path]:
    """(shard paths, folder with classnames/templates) for any accepted form of ``spec``."""
    from clipforge.data.shards import expand_urls

    path = Path(spec).expanduser()
    if not path.is_dir():
        shards = expand_urls(spec)
        return shards, _meta_folder(Path(shards[0]).parent)
    if not any(path.glob("*.tar")):  # a CLIP_benchmark root: pick the split folder
        split = split or "test"
        splits = sorted(d.name for d in path.iterdir() if d.is_dir() and any(d.glob("*.tar")))
        if split not in splits:
            raise DataError(f"{path}: no split folder {split!r} with .tar shards (found: {splits or 'none'})")
        return _split_shards(path / split), path
    return _split_shards(path), _meta_folder(path)


def _split_shards(folder: Path) -> list[str]:
    """CLIP_benchmark reads ``0.tar .. N-1.tar`` with N from ``nshards.txt``; without it, every
    ``.tar`` in the folder, in numeric-aware order."""
    count_file = folder / "nshards.txt"
    if not count_file.is_file():
        return sorted((str(p) for p in folder.glob("*.tar")), key=_natural_key)
    try:
        n = int(count_file.read_text(encoding="utf-8").strip())
    except ValueError:
        raise DataError(f"{count_file}:1: not a shard count") from None
    shards = [str(folder / f"{i}.tar") for i in range(n)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if n < 1 or missing:
        raise DataError(f"{count_file}: says {n} shards (0.tar..{n - 1}.tar) but missing {missing[:3]}")
    return shards


def _meta_folder(shard_dir: Path) -> Path:
    """Class names and templates sit beside the shards, or one level up when the shards are a
    CLIP_benchmark split folder (``ROOT/test``)."""
    if (shard_dir / CB_CLASSNAMES).is_file() or (shard_dir / CB_TEMPLATES).is_file():
        return shard_dir
    parent = shard_dir.parent
    if (shard_dir / "nshards.txt").is_file() or (parent / CB_CLASSNAMES).is_file():
        return parent
    return shard_dir


def _natural_key(path: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


# ---------------------------------------------------------------------------------------------
# spec dispatch


def _parse_query(spec: str) -> tuple[str, dict[str, str]]:
    name, _, query = spec.partition("?")
    opts = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        opts[key] = value
    return name, opts


def load_eval_dataset(
    spec: str | os.PathLike,
    *,
    task: str = "classification",
    transform: Callable | None = None,
    download: bool = False,
    split: str | None = None,
    **table: Any,
) -> EvalDataset:
    """Build an :class:`EvalDataset` from a ``--data`` spec (the grammar every command shares,
    :mod:`clipforge.data.sources`). ``task`` ("classification" or "retrieval") only matters
    where one source supports both; ``table`` keywords (``separator``, ``image_key``,
    ``caption_key``, ``data_root``, ``confine``) say how to read tables, as for training."""
    spec = os.fspath(spec)
    if spec.startswith("synthetic:"):
        name, opts = _parse_query(spec)
        if name != "synthetic:shapes":
            raise DataError(f"unknown synthetic dataset {name!r}; available: synthetic:shapes")
        known = {"split", "n", "seed", "label", "image_size", "caption_style"}
        unknown = set(opts) - known
        if unknown:
            raise DataError(f"{spec}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        ints = {k: int(opts[k]) for k in ("n", "seed", "image_size") if k in opts}
        return synthetic_shapes(
            task=task,
            label=opts.get("label", "shape"),
            split=opts.get("split", split),
            caption_style=opts.get("caption_style", "full"),
            transform=transform,
            **ints,
        )
    from clipforge.data.sources import source_kind, table_files

    kind = source_kind(spec)
    if kind == "torchvision":  # "cifar10:ROOT", "torchvision:NAME:ROOT"
        head, _, rest = spec.partition(":")
        name, root = rest.partition(":")[::2] if head == "torchvision" else (head, rest)
        root, opts = _parse_query(root)
        return torchvision_dataset(
            name,
            root or ".",
            split=opts.get("split", split or "test"),
            download=download or opts.get("download") in ("1", "true"),
            transform=transform,
        )
    if kind == "shards":
        return webdataset_shards(spec, transform, split=split)
    if kind in ("table", "tables"):
        return pairs_table(table_files(spec), transform, **table)
    if kind == "folder":
        return _folder_dataset(Path(spec).expanduser(), task, transform, split)
    raise DataError(f"--data {spec!r}: a single {kind} cannot be evaluated; give a folder, table or shards")


def _folder_dataset(path: Path, task: str, transform: Callable | None, split: str | None) -> EvalDataset:
    """A folder: CLIP_benchmark's webdataset root (split folders of shards), class sub-folders
    (classification), or images with ``.txt`` captions (retrieval)."""
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if any(any(d.glob("*.tar")) for d in subdirs):
        return webdataset_shards(path, transform, split=split)
    has_sidecars = any(path.rglob("*.txt"))
    if subdirs and not (task == "retrieval" and has_sidecars):
        return image_folder(path, transform)
    return caption_folder(path, transform)


def as_eval_dataset(
    obj: Any, *, task: str = "classification", transform: Callable | None = None
) -> EvalDataset:
    """Adapt what users already have: an EvalDataset, a spec string, clipforge's synthetic or
    pairs datasets, or a torchvision-style dataset with ``classes`` and ``(image, label)`` items."""
    if isinstance(obj, EvalDataset):
        return obj.with_transform(transform) if transform is not None else obj
    if isinstance(obj, str | os.PathLike):
        return load_eval_dataset(obj, task=task, transform=transform)
    if hasattr(obj, "spec") and hasattr(obj, "labels") and hasattr(obj, "all_captions"):  # SyntheticShapes
        from clipforge.data import synthetic

        return EvalDataset(
            getattr(obj, "source", "synthetic:shapes"),
            len(obj),
            obj.get_image,
            labels=obj.labels("shape"),
            classnames=synthetic.class_names("shape"),
            captions=obj.all_captions,
        ).with_transform(transform)
    if hasattr(obj, "get_image") and hasattr(obj, "all_captions"):
        return from_pairs(obj, transform=transform)
    if hasattr(obj, "classes") and hasattr(obj, "__getitem__"):
        targets = getattr(obj, "targets", None)
        labels = (
            [int(t) for t in targets] if targets is not None else [int(obj[i][1]) for i in range(len(obj))]
        )
        return EvalDataset(
            type(obj).__name__,
            len(obj),
            partial(_first_item, obj),
            labels=labels,
            classnames=list(obj.classes),
        ).with_transform(transform)
    raise DataError(f"cannot evaluate on {type(obj).__name__}: expected a dataset spec or an EvalDataset")
