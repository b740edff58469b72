"""Plain helpers the test files share (``from helpers import ...``): tiny configs, a Hub cache laid
out as huggingface_hub writes it, thread-count restoring, seeded tiny models and random-init
transformers CLIPModels. The fixtures built on them are in conftest.py.

They are functions rather than fixtures where a module-scoped fixture or a test body needs them
with arguments (a revision, a seed, a layer count).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

#: The commit every populated Hub repo is at (refs/main names it).
REVISION = "0123456789abcdef0123456789abcdef01234567"

#: open_clip-style ``vision_cfg``/``text_cfg`` with the shapes of clipforge's ``tiny-vit``.
OC_TINY_VIT = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32)
OC_TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
#: The same with a 96-wide vision tower (the CoCa and open_clip-JSON configs of the tests).
OC_TINY_VIT_96 = {**OC_TINY_VIT, "width": 96}
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


def joined_pieces(
    rng: random.Random, count: int, piece: Callable[[random.Random], str], whitespace: Sequence[str]
) -> str:
    """``count`` pieces from ``piece(rng)``, each followed by odd whitespace (15%), a space (about
    77%) or nothing: text run together the way scraped captions are, for the tokenizer tests."""
    parts = []
    for _ in range(count):
        parts.append(piece(rng))
        parts.append(rng.choice(whitespace) if rng.random() < 0.15 else " " if rng.random() < 0.9 else "")
    return "".join(parts)


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


def run_cli(argv: list[str]) -> int:
    """``clipforge ARGV`` in this process, torch's thread count restored afterwards."""
    from clipforge.cli import main

    with threads_kept():
        return main(argv)


def seeded_model(name: str = "tiny-vit", seed: int = 0, **kwargs) -> torch.nn.Module:
    """``create_model(name, **kwargs)`` in eval mode after ``torch.manual_seed(seed)``: the same
    random weights on every call (the global generator is left as the seeding left it)."""
    import clipforge

    torch.manual_seed(seed)
    return clipforge.create_model(name, **kwargs).eval()


def _hf_tower(width: int, heads: int, layers: int, **more: int) -> dict[str, int]:
    """A transformers CLIP text/vision config's shape fields (MLP 4x wide, as CLIP's are)."""
    return dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        **more,
    )


#: transformers CLIPModel shapes: (text_config, vision_config, projection_dim).
HF_CLIP_SHAPES = {
    "tiny": (_hf_tower(64, 2, 2), _hf_tower(64, 2, 2, image_size=32, patch_size=8), 48),
    "b32": (_hf_tower(512, 8, 12), _hf_tower(768, 12, 12, image_size=224, patch_size=32), 512),
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


def tiny_run(samples: int, **options: object) -> dict[str, object]:
    """Flat ``TrainConfig`` options for a short, quiet run of tiny-vit on ``samples`` 32 px synthetic
    shapes: one thread, a log record every step, no progress bar; ``options`` add to or override them."""
    data = f"synthetic:shapes?n={samples}&image_size=32"
    return {"data": data, "model": "tiny-vit", "threads": 1, "log_every": 1, "progress": False, **options}


def run_gloo_ranks(
    script: Path, tmp: Path, world_size: int, *, args: Sequence[str] = (), timeout: float = 240
) -> list:
    """Run ``python script *args RANK WORLD_SIZE INIT_FILE OUT_FILE`` once per rank, each on one
    thread with this process's ``sys.path``, and return what each rank ``torch.save``d to its
    OUT_FILE. Separate interpreters rather than forks: a gloo group needs clean processes. A rank
    that fails or hangs fails the test with every rank's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    init, procs, outs = tmp / "init", [], []
    for rank in range(world_size):
        outs.append(tmp / f"rank{rank}.pt")
        cmd = [sys.executable, str(script), *args, str(rank), str(world_size), str(init), str(outs[-1])]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{world_size} gloo ranks of {script.name} timed out after {timeout:.0f}s")
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log
    return [torch.load(out, weights_only=False) for out in outs]


@contextmanager
def scratch_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A module- or session-scoped fixture's folder, removed when the fixture ends.

    pytest keeps ``tmp_path_factory`` folders until the session ends; full-size weights written by a
    shared fixture would pile up in a small ``/tmp`` (CI's filled up) if they stayed that long.
    """
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
