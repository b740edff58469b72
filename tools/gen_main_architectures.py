"""One-off generator: write src/clipforge/model/architectures_main.json and the test oracle
tests/oracles/open_clip_main_naflex.json from a clone of open_clip's main branch.

open_clip 3.3 (the release clipforge's ``architectures.json`` mirrors) has no NaFlex models;
open_clip main added ``ViT-B-16-SigLIP2-naflex`` and ``ViT-SO400M-16-SigLIP2-naflex`` (commits
294733a, a422955: SigLIP 2 on timm's ``NaFlexVit``, 576 patches by default, Hub weights under
``timm/<name>``) and the weightless CLIP configs ``naflex_ViT-B-16`` / ``naflex_ViT-B-32``. Run ``.venv/bin/python tools/gen_main_architectures.py <open_clip git dir>``
and review the diff. The configs are read with ``git show`` at the clone's HEAD (nothing is
imported from it), converted with clipforge's ``config_from_open_clip`` and written in
clipforge's form; the raw open_clip configs go to the test oracle file unchanged, with the commit.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from clipforge.checkpoints.open_clip_config import config_from_open_clip
from clipforge.checkpoints.signatures import image_tower_hash
from clipforge.model.build import build_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src/clipforge/model/architectures_main.json"
ORACLE = ROOT / "tests/oracles/open_clip_main_naflex.json"
#: open_clip main's NaFlex image-text models that have published weights.
NAMES = ("ViT-B-16-SigLIP2-naflex", "ViT-SO400M-16-SigLIP2-naflex")
#: ... and its plain NaFlex CLIP architectures (no weights; CLIP text tower). Main's other NaFlex
#: configs (ModernText towers, NaFlexClap audio, GenLIP/GenLAP generative) are models clipforge
#: does not implement.
ARCHITECTURES = (*NAMES, "naflex_ViT-B-16", "naflex_ViT-B-32")


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout


def _pretrained(repo: str) -> dict[str, dict[str, dict[str, str]]]:
    """open_clip main's ``_PRETRAINED`` entries for ``NAMES``: tag -> its cfg helper and hf_hub, as
    written in pretrained.py (``_slpcfg`` is SigLIP's helper, the same as in 3.3)."""
    source = _git(repo, "show", "HEAD:src/open_clip/pretrained.py")
    out: dict[str, dict[str, dict[str, str]]] = {}
    for name in NAMES:
        found = re.search(rf'"{re.escape(name)}": dict\((.*?)\n    \),', source, re.S)
        if found is None:
            raise SystemExit(f"{name}: not in open_clip main's pretrained.py")
        entries = re.findall(r"(\w+)=(_\w+)\(hf_hub='([^']*)'\)", found.group(1))
        out[name] = {tag: {"helper": helper, "hf_hub": hub} for tag, helper, hub in entries}
    return out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    repo = sys.argv[1]
    commit = _git(repo, "rev-parse", "HEAD").strip()
    raw = {
        n: json.loads(_git(repo, "show", f"HEAD:src/open_clip/model_configs/{n}.json")) for n in ARCHITECTURES
    }
    table, hashes = {}, {}
    for name, model_cfg in raw.items():
        cfg = config_from_open_clip(model_cfg, name)
        table[name] = cfg.to_dict()
        with torch.device("meta"):
            hashes[name] = image_tower_hash(build_model(cfg).state_dict())
    source = f"open_clip main {commit[:12]} model_configs, via tools/gen_main_architectures.py"
    document = {"source": source, "architectures": table, "image_tower_hashes": hashes}
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    oracle = {"open_clip_commit": commit, "model_configs": raw, "pretrained": _pretrained(repo)}
    ORACLE.write_text(json.dumps(oracle, indent=1) + "\n")
    print(f"wrote {len(table)} architectures to {OUT} and the raw configs to {ORACLE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
