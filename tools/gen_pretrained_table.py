"""One-off generator: write src/clipforge/checkpoints/pretrained_table.py from open_clip's list.

Run it when open_clip adds tags (``.venv/bin/python tools/gen_pretrained_table.py``), review the
diff, and keep the hand-written facts open_clip does not have (licences, notes) in the rules
below. The checked-in table is self-contained: clipforge never imports open_clip at run time.
Only the base pairs are written; open_clip's ``<model>-quickgelu`` aliases are derived from
``quick_gelu`` rows by :func:`clipforge.checkpoints.pretrained.list_pretrained`, as open_clip does.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import open_clip
from open_clip.pretrained import _get_safe_alternatives

OUT = Path(__file__).resolve().parents[1] / "src/clipforge/checkpoints/pretrained_table.py"

#: (mean, std, interpolation, resize_mode) -> preset name in the table.
PREPROCESS_PRESETS = {
    ("OPENAI", "OPENAI", "bicubic", "shortest"): None,
    ("INCEPTION", "INCEPTION", "bicubic", "shortest"): "INCEPTION_NORM",
    ("OPENAI", "OPENAI", "bicubic", "squash"): "SQUASH",
    ("INCEPTION", "INCEPTION", "bicubic", "squash"): "SIGLIP",
    ("IMAGENET", "IMAGENET", "bilinear", "squash"): "CLIPA",
    ("INCEPTION", "INCEPTION", "bilinear", "squash"): "PE",
    ("ZERO", "ONE", "bilinear", "shortest"): "MOBILECLIP",
    ("OPENAI", "OPENAI", "bilinear", "shortest"): "BILINEAR",
}
NORMS = {
    (0.48145466, 0.4578275, 0.40821073): "OPENAI",
    (0.26862954, 0.26130258, 0.27577711): "OPENAI",
    (0.5, 0.5, 0.5): "INCEPTION",
    (0.485, 0.456, 0.406): "IMAGENET",
    (0.229, 0.224, 0.225): "IMAGENET",
    (0.0, 0.0, 0.0): "ZERO",
    (1.0, 1.0, 1.0): "ONE",
}


#: Provenance presets written into the table: licence as on the model card ("" = not recorded).
SOURCES = {
    "OPENAI": {"license": "mit", "notes": "OpenAI CLIP (WIT-400M)"},
    "OPEN_CLIP": {"license": "mit"},
    "METACLIP": {"license": "cc-by-nc-4.0", "notes": "MetaCLIP (Meta), QuickGELU"},
    "METACLIP2": {"license": "cc-by-nc-4.0", "notes": "MetaCLIP 2 worldwide (multilingual)"},
    "DFN": {"license": "apple-amlr", "notes": "Apple DFN (data filtering networks), converted from AXLearn"},
    "MOBILECLIP_SRC": {"license": "apple-amlr", "notes": "Apple MobileCLIP"},
    "MOBILECLIP2_SRC": {"license": "apple-amlr", "notes": "Apple MobileCLIP2"},
    "SIGLIP_SRC": {"license": "apache-2.0", "notes": "SigLIP (WebLI, big_vision), converted"},
    "SIGLIP2_SRC": {"license": "apache-2.0", "notes": "SigLIP 2 (WebLI, big_vision), converted"},
    "EVA": {"license": "mit", "notes": "EVA-CLIP (BAAI), converted"},
    "CLIPA_SRC": {"license": "apache-2.0", "notes": "CLIPA-v2 (UCSC-VLAA)"},
    "NLLB": {"notes": "NLLB-CLIP (NLLB text tower, 201 languages)"},
    "VITAMIN": {"license": "mit", "notes": "ViTamin (DataComp-1B)"},
    "PE_SRC": {"license": "apache-2.0", "notes": "Meta Perception Encoder (core), converted"},
}
NLLB_LICENSES = {
    "visheratin/nllb-clip-base-siglip/": "cc-by-nc-4.0",
    "visheratin/nllb-siglip-mrl-base/": "mit",
}


def _source(model: str, tag: str, repo: str) -> tuple[str, str, dict[str, str]]:
    """(section, provenance preset, row-specific facts) for one open_clip pair."""
    if tag == "openai":
        return "OpenAI", "OPENAI", {}
    if "metaclip2" in tag:
        return (
            "MetaCLIP",
            "METACLIP2",
            {"notes": "MetaCLIP 2 worldwide; not QuickGELU"} if "378" in model else {},
        )
    if tag.startswith("metaclip"):
        if tag == "metaclip_altogether":
            return (
                "MetaCLIP",
                "METACLIP",
                {"notes": "MetaCLIP Altogether; unlike the other MetaCLIP, not QuickGELU"},
            )
        return "MetaCLIP", "METACLIP", {}
    if repo.startswith("apple/DFN"):
        return "DFN", "DFN", {}
    if "MobileCLIP" in repo:
        return "MobileCLIP", "MOBILECLIP2_SRC" if "MobileCLIP2" in repo else "MOBILECLIP_SRC", {}
    if "SigLIP2" in repo:
        return "SigLIP", "SIGLIP2_SRC", {}
    if "SigLIP" in repo and repo.startswith("timm/"):
        if model == "ViT-SO400M-14-SigLIP-378":
            return (
                "SigLIP",
                "SIGLIP_SRC",
                {"notes": "the SigLIP 384 release run at 378 (same 27x27 patch grid)"},
            )
        return "SigLIP", "SIGLIP_SRC", {}
    if repo.startswith("timm/eva"):
        return "EVA", "EVA", {}
    if repo.startswith("UCSC-VLAA/"):
        return "CLIPA", "CLIPA_SRC", {}
    if repo.startswith("visheratin/"):
        return "NLLB-CLIP", "NLLB", {"license": NLLB_LICENSES[repo]} if repo in NLLB_LICENSES else {}
    if repo.startswith("jienengchen/"):
        if model == "ViTamin-XL-384":
            return (
                "ViTamin",
                "VITAMIN",
                {"notes": "ViTamin 384px release; open_clip 3.3's config builds it at 256"},
            )
        return "ViTamin", "VITAMIN", {}
    if repo.startswith("timm/PE-Core"):
        return "Perception Encoder", "PE_SRC", {}
    if model.startswith("coca_"):
        return (
            "CoCa",
            "OPEN_CLIP",
            {"notes": "fine-tuned for COCO captioning"} if tag.startswith("mscoco") else {},
        )
    if "roberta" in model or model.startswith("convnext"):
        return "open_clip (ConvNeXt, RoBERTa towers)", "OPEN_CLIP", {}
    if model == "ViT-B-16-plus-240" and tag == "laion400m_e32":
        return "open_clip", "OPEN_CLIP", {"notes": "open_clip's Hub entry for e32 is the e31 repository"}
    return "open_clip", "OPEN_CLIP", {}


def _hub_files(hf_hub: str) -> tuple[str, tuple[str, ...] | None]:
    """(repo, files to try) exactly as open_clip's download_pretrained reads its hf_hub field."""
    repo, filename = os.path.split(hf_hub)
    name = filename or "open_clip_pytorch_model.bin"
    files = (*_get_safe_alternatives(name), name)
    return repo, None if files == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") else files


#: Runs of at least this many rows that :func:`_named_like_repo` accepts become one ``_same_name`` call.
MIN_NAMED_RUN = 3


def _named_like_repo(model: str, repo: str, files: object, size: int, extras: list[str]) -> str | None:
    """The Hub organisation when the row is all in its name (``org/<model>``, size at the end), else None.

    Those rows (SigLIP's and SigLIP 2's releases) are written as one ``_same_name`` call per run
    instead of one ``_row`` each; the table's ``_same_name`` rebuilds exactly the same rows.
    """
    org, _, name = repo.partition("/")
    last = model.rsplit("-", 1)[-1]
    if name != model or files or extras or size != (int(last) if last.isdigit() else 224):
        return None
    return org


def _row(model: str, tag: str) -> tuple[str, str, tuple[str, ...] | None]:
    """(section, the row's ``_row(...)`` line, the key of a ``_same_name`` run it can join or None)."""
    cfg = open_clip.get_pretrained_cfg(model, tag)
    key = (NORMS[tuple(cfg["mean"])], NORMS[tuple(cfg["std"])], cfg["interpolation"], cfg["resize_mode"])
    preset = PREPROCESS_PRESETS[key]  # KeyError = a new convention: add a preset
    repo, files = _hub_files(cfg["hf_hub"])
    section, source, facts = _source(model, tag, cfg["hf_hub"])
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    presets = [*([preset] if preset else []), source]
    quick = ["quick_gelu=True"] if cfg.get("quick_gelu") else []
    notes = [f"{k}={v!r}" for k, v in facts.items()]
    args = [repr(model), repr(tag), repr(repo), *presets, *quick]
    if files:
        args.append(f"filenames={files!r}")
    if size != 224:
        args.append(f"image_size={size}")
    org = _named_like_repo(model, repo, files, size, quick + notes)
    run_key = None if org is None else (repr(tag), repr(org), *presets)
    return section, f"    _row({', '.join(args + notes)}),", run_key


def _same_name_call(key: tuple[str, ...], models: list[str]) -> list[str]:
    """The lines of one ``_same_name`` call: the run's model names in strings of about 90 columns."""
    tag, org, *presets = key
    chunks = [""]
    for model in models:
        if chunks[-1] and len(chunks[-1]) + len(model) > 88:
            chunks.append("")
        chunks[-1] += model + " "
    names = [
        f"        {chunk.rstrip() + (' ' if n < len(chunks) - 1 else '')!r}" for n, chunk in enumerate(chunks)
    ]
    return [f"    *_same_name({tag}, {org}, (", *names, f"    ), {', '.join(presets)}),"]


def _section_lines(rows: list[tuple[str, tuple[str, ...] | None, str]]) -> list[str]:
    """A section's lines: runs of same-name rows folded into ``_same_name`` calls, the rest as is."""
    out: list[str] = []
    i = 0
    while i < len(rows):
        key = rows[i][1]
        j = i
        while j < len(rows) and key is not None and rows[j][1] == key:
            j += 1
        if key is not None and j - i >= MIN_NAMED_RUN:
            out += _same_name_call(key, [model for _, _, model in rows[i:j]])
            i = j
        else:
            out.append(rows[i][0])
            i += 1
    return out


HEADER = '''"""Every named pretrained weight set clipforge knows: one row per (architecture, tag).

Generated once from open_clip 3.3's pretrained list by tools/gen_pretrained_table.py and checked
in (clipforge never imports open_clip). Rows give the Hub repository, the files to try in order,
QuickGELU, the preprocessing the weights were trained with (presets below), the input size where
it is not 224, the licence on the model card where known ("" = not recorded) and notes.
open_clip's ``<model>-quickgelu`` aliases are derived from the ``quick_gelu`` rows.
"""

from __future__ import annotations

from typing import Any

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Preprocessing presets (defaults: OpenAI mean/std, bicubic, resize the shortest side + crop).
INCEPTION_NORM: dict[str, Any] = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD}
SQUASH: dict[str, Any] = {"resize_mode": "squash"}
SIGLIP: dict[str, Any] = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "resize_mode": "squash"}
CLIPA: dict[str, Any] = {
    "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear", "resize_mode": "squash"
}
PE: dict[str, Any] = {"mean": INCEPTION_MEAN, "std": INCEPTION_STD, "interpolation": "bilinear", "resize_mode": "squash"}
MOBILECLIP: dict[str, Any] = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear"}
BILINEAR: dict[str, Any] = {"interpolation": "bilinear"}


{sources}


{helpers}

# fmt: off
ROWS: tuple[dict[str, Any], ...] = (
'''


def _helpers_source() -> str:
    """The row helpers as the checked-in table defines them: their code lives in one place (the
    table), and a regenerated table carries it over unchanged."""
    from clipforge.checkpoints import pretrained_table

    return "\n\n".join(inspect.getsource(f) for f in (pretrained_table._row, pretrained_table._same_name)).rstrip()


def main() -> int:
    sections: dict[str, list[tuple[str, tuple[str, ...] | None, str]]] = {}
    seen = set()
    for model, tag in open_clip.list_pretrained():
        if model.endswith("-quickgelu"):
            base = model.removesuffix("-quickgelu")
            assert open_clip.get_pretrained_cfg(base, tag) == open_clip.get_pretrained_cfg(model, tag), (
                model,
                tag,
            )
            continue
        section, line, key = _row(model, tag)
        sections.setdefault(section, []).append((line, key, model))
        seen.add((model, tag))
    sources = "\n".join(f"{k}: dict[str, Any] = {v!r}" for k, v in SOURCES.items())
    header = HEADER.replace("{helpers}", _helpers_source()).replace(
        "{sources}", "# Provenance presets (licence as on the model card, where known).\n" + sources
    )
    body = [header.rstrip("\n")]
    for section, rows in sections.items():
        body.append(f"    # --- {section} " + "-" * max(4, 90 - len(section)))
        body.extend(_section_lines(rows))
    body.append(")\n# fmt: on\n")
    OUT.write_text("\n".join(body))
    subprocess.run([sys.executable, "-m", "ruff", "format", "-q", str(OUT)], check=True)  # rows are fmt: off
    print(f"{OUT}: {len(seen)} rows ({len(open_clip.list_pretrained())} pairs with -quickgelu aliases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
