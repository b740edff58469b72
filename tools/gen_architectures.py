"""One-off generator: write src/clipforge/model/architectures.json from open_clip's model configs.

Run it when open_clip adds architectures (``.venv/bin/python tools/gen_architectures.py``; a few
minutes: every model is built on the meta device for its image-tower hash; ``--keep-hashes``
rewrites only the configs) and review the diff. Every open_clip config that clipforge's ``config_from_open_clip`` accepts is
written in clipforge's own form (``CLIPConfig.to_dict()``); ``<name>-quickgelu`` configs that are
their base config plus ``quick_gelu`` are left out (the registry derives them, as before). The
checked-in file is self-contained: clipforge never imports open_clip at run time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import open_clip
import torch

from clipforge.checkpoints.open_clip import open_clip_to_clipforge
from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.checkpoints.signatures import image_tower_hash
from clipforge.errors import ClipforgeError

OUT = Path(__file__).resolve().parents[1] / "src/clipforge/model/architectures.json"


def _is_derived_quickgelu(name: str, table: dict[str, dict]) -> bool:
    """``X-quickgelu`` that equals ``X`` with ``quick_gelu`` on: the registry derives it."""
    base = name.removesuffix("-quickgelu")
    if base == name or base not in table:
        return False
    return table[name] == {**table[base], "quick_gelu": True}


def _image_hashes(names: list[str]) -> dict[str, str]:
    """Each architecture's image-tower key/shape hash, from open_clip's own model on the meta device
    (the layout its released weights have); architectures open_clip cannot build offline are left out."""
    out = {}
    for name in names:
        try:
            with torch.device("meta"):
                sd = open_clip.create_model(name, device="meta").state_dict()
        except Exception as e:  # noqa: BLE001 - e.g. a Hugging Face config not in the local cache
            print(f"no image hash for {name}: {type(e).__name__}", file=sys.stderr)
            continue
        out[name] = image_tower_hash(open_clip_to_clipforge(sd))
    return out


def _document(source: str, table: dict[str, dict], hashes: dict[str, str]) -> str:
    """JSON with one architecture per line, so a regenerated file diffs by architecture."""
    rows = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in table.items()]
    return (
        "{\n" + f' "source": {json.dumps(source)},\n "architectures": {{\n' + ",\n".join(rows)
        + "\n },\n" + f' "image_tower_hashes": {json.dumps(hashes, indent=2, sort_keys=True)}' + "\n}\n"
    )


def main() -> int:
    table: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name in open_clip.list_models():
        try:
            table[name] = config_from_open_clip(open_clip.get_model_config(name), name).to_dict()
        except ClipforgeError as e:
            skipped[name] = str(e)
    for name in [n for n in table if _is_derived_quickgelu(n, table)]:
        del table[name]
    source = f"open_clip_torch {open_clip.__version__} model_configs, via tools/gen_architectures.py"
    if "--keep-hashes" in sys.argv:  # only the configs changed: reuse the stored hashes (slow to make)
        hashes = json.loads(OUT.read_text())["image_tower_hashes"]
    else:
        hashes = _image_hashes(sorted(table))
    OUT.write_text(_document(source, dict(sorted(table.items())), hashes))
    print(f"wrote {len(table)} architectures to {OUT}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
