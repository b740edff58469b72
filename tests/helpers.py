"""Plain helpers the test files share (``from helpers import ...``): tiny configs, a Hub cache laid
out as huggingface_hub writes it, thread-count restoring, seeded tiny models and random-init
transformers CLIPModels. The fixtures built on them are in conftest.py.

They are functions rather than fixtures where a module-scoped fixture or a test body needs them
with arguments (a revision, a seed, a layer count).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

#: The commit every populated Hub repo is at (refs/main names it).
REVISION = "0123456789abcdef0123456789abcdef01234567"

#: open_clip-style ``vision_cfg``/``text_cfg`` with the shapes of clipforge's ``tiny-vit``.
OC_TINY_VIT = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
OC_TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
#: An open_clip model config (as in its model_configs/*.json) with those shapes.
OC_TINY_CFG = {"embed_dim": 64, "vision_cfg": OC_TINY_VIT, "text_cfg": OC_TINY_TEXT}
#: create_model overrides that shrink a registered ViT-B-32 to the tiny shapes above.
SHRINK = {
    "embed_dim": 64,
    "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text": {"width": 64, "heads": 2, "layers": 2},
}


def populate(
    cache: Path,
    repo: str,
    files: dict[str, bytes | Path] | Path,
    *,
    blobs: bool = False,
    revision: str = REVISION,
) -> Path:
    """Write a Hub repository into huggingface_hub's cache layout (refs/main + snapshots/<commit>)
    and return the snapshot folder. ``files`` maps names to bytes or files, or is a folder whose
    files are taken. ``blobs=True`` stores content under blobs/<sha256> with relative symlinks in
    the snapshot, as huggingface_hub itself does (for code that must follow those links)."""
    if isinstance(files, Path):
        files = {p.name: p for p in sorted(files.iterdir()) if p.is_file()}
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        target = snapshot / name
        if not blobs:
            target.write_bytes(data)
            continue
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def go_offline(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point clipforge and huggingface_hub at ``cache`` with downloads off (both read the
    variables per call), so a test never reaches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@contextmanager
def threads_kept(threads: int | None = None) -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards: training runs set it from their config
    (``threads=1``), which would otherwise slow every later test in the process. With ``threads``,
    set it for the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeded_model(name: str = "tiny-vit", seed: int = 0, **kwargs) -> torch.nn.Module:
    """``create_model(name, **kwargs)`` in eval mode after ``torch.manual_seed(seed)``: the same
    random weights on every call (the global generator is left as the seeding left it)."""
    import clipforge

    torch.manual_seed(seed)
    return clipforge.create_model(name, **kwargs).eval()


#: transformers CLIPModel shapes: (text_config, vision_config, projection_dim).
HF_CLIP_SHAPES = {
    "tiny": (
        dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2),
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        48,
    ),
    "b32": (
        dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        dict(
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            image_size=224,
            patch_size=32,
        ),
        512,
    ),
}


def hf_clip_model(
    size: str = "tiny",
    act: str = "quick_gelu",
    seed: int = 0,
    text_layers: int | None = None,
    vision_layers: int | None = None,
):
    """A random-init ``transformers.CLIPModel`` in eval mode, tiny or with ViT-B-32's shapes.

    HF's default init leaves LayerNorms at identity and biases at 0; they are randomised too, so a
    comparison would catch a swapped weight/bias or a missing LayerNorm."""
    import transformers

    text, vision, proj = HF_CLIP_SHAPES[size]
    text = {**text, **({"num_hidden_layers": text_layers} if text_layers else {})}
    vision = {**vision, **({"num_hidden_layers": vision_layers} if vision_layers else {})}
    config = transformers.CLIPConfig(
        text_config={**text, "hidden_act": act, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**vision, "hidden_act": act},
        projection_dim=proj,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model
