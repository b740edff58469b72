"""The one spec grammar: what a ``--data``/``--images`` string names, for every command.

=========================================  ===================================================
``synthetic:shapes[?n=..&split=..]``        the built-in shapes set
``cifar10:ROOT``, ``torchvision:NAME:ROOT``  a torchvision dataset on disk (eval)
``pairs.csv|tsv|json|jsonl|parquet``         a table (:mod:`clipforge.data.tables`)
``shards/``, ``a.tar``, ``s-{000..009}.tar``  webdataset shards (a folder with ``*.tar`` or
                                             ``manifest.json``)
``parquet/`` or ``data/*.parquet``           several tables read as one (Hugging Face layout)
``photos/``                                  an image folder (captions from ``.txt`` sidecars;
                                             class sub-folders for classification)
``a.csv::0.7,b.tsv::0.3``                    a weighted mix (training); commas inside braces
                                             do not split
=========================================  ===================================================

Brace patterns go through the ``braceexpand`` library (webdataset's own convention:
``{000..009}`` keeps zero padding, ``{a,{b,c}}`` nests), then ``*?[`` globs are matched.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from braceexpand import braceexpand

from clipforge.data.images import IMAGE_EXTENSIONS
from clipforge.data.tables import TABLE_FORMATS
from clipforge.errors import DataError

KINDS = ("synthetic", "torchvision", "table", "tables", "shards", "folder", "image")
_REMOTE = ("http://", "https://", "pipe:", "s3://", "gs://")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``[a-000.tar, a-001.tar, a-002.tar]``; ``{a,b}`` and nesting too."""
    return list(braceexpand(pattern))


def has_pattern(spec: str) -> bool:
    return "{" in spec or any(c in spec for c in "*?[")


def expand_paths(spec: str) -> list[str]:
    """Every path a pattern names: braces expanded in order, then globs matched (sorted).

    A brace-expanded name without glob characters is kept even if missing, so the caller can
    say which file is missing; a glob that matches nothing contributes nothing.
    """
    out: list[str] = []
    for p in expand_braces(os.path.expanduser(spec)):
        out += sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    return out


def is_torchvision(spec: str) -> bool:
    """``cifar10:ROOT`` or ``torchvision:NAME:ROOT`` (a name, not a drive letter or a path)."""
    head, sep, _ = spec.partition(":")
    return bool(sep) and re.fullmatch(r"[A-Za-z][\w-]+", head) is not None and not os.path.exists(spec)


def _kind_of_files(paths: list[str], spec: str) -> str:
    exts = {Path(p).suffix.lower() for p in paths}
    if exts <= {".tar"}:
        return "shards"
    if exts <= set(TABLE_FORMATS):
        return "tables"
    if exts <= set(IMAGE_EXTENSIONS):
        return "image"
    raise DataError(f"{spec}: matches a mix of file kinds ({', '.join(sorted(exts))}); name one kind")


def _kind_of_folder(path: Path) -> str:
    names = os.listdir(path)
    if "manifest.json" in names or any(n.endswith(".tar") for n in names):
        return "shards"
    has_images = any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names)
    if not has_images and any(n.lower().endswith(".parquet") for n in names):
        return "tables"
    return "folder"


def source_kind(spec: str) -> str:
    """Which of :data:`KINDS` ``spec`` is; raises :class:`DataError` naming what is missing."""
    if spec.startswith("synthetic:"):
        return "synthetic"
    if spec.startswith(_REMOTE):
        raise DataError(f"{spec}: only local files are supported; download the data first")
    if is_torchvision(spec):
        return "torchvision"
    if has_pattern(spec):
        found = [p for p in expand_paths(spec) if os.path.exists(p)]
        if not found:
            raise DataError(f"data not found: {spec} (the pattern matches no existing file)")
        return _kind_of_files(found, spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _kind_of_folder(path)
    if path.is_file():
        ext = path.suffix.lower()
        if ext == ".tar":
            return "shards"
        if ext in TABLE_FORMATS:
            return "table"
        if ext in IMAGE_EXTENSIONS:
            return "image"
        raise DataError(
            f"{spec}: cannot tell what kind of data this is: expected a table "
            f"({', '.join(sorted(TABLE_FORMATS))}), an image folder, .tar shards or an image"
        )
    if path.suffix.lower() in TABLE_FORMATS:
        raise DataError(f"pairs table not found: {spec}")
    raise DataError(
        f"data not found: {spec}: not an existing folder, table ({', '.join(sorted(TABLE_FORMATS))}), "
        "shard pattern, image, synthetic:shapes or torchvision spec (e.g. cifar10:/data/cifar)"
    )


def table_files(spec: str) -> list[Path]:
    """The table files of a ``table``/``tables`` spec, in order."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet")
    elif has_pattern(spec):
        files = [Path(p) for p in expand_paths(spec)]
    else:
        files = [path]
    missing = [str(p) for p in files if not p.is_file()]
    if missing or not files:
        raise DataError(f"table not found: {missing[0] if missing else spec}")
    return files


def split_spec(spec: str) -> list[tuple[str, float]]:
    """``"a.csv::0.7,b/{0..3}.tar"`` -> ``[("a.csv", 0.7), ("b/{0..3}.tar", 1.0)]``."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        part = part.strip()
        if not part:
            raise DataError(f"empty source in data spec {spec!r}")
        path, sep, weight = part.rpartition("::")
        if not sep:
            out.append((part, 1.0))
            continue
        try:
            out.append((path, float(weight)))
        except ValueError:
            raise DataError(f"bad weight {weight!r} in data spec {spec!r} (use path::0.5)") from None
    return out
