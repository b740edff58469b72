"""Real image collections from Debian packages, for tests that must see what users bring.

``.ci/run`` installs the packages (as root); a test that asks for them fails, never skips,
when they are missing, because a skipped real-data test would make CI green on generated
data alone. Outside CI, run ``apt-get install -y gnome-backgrounds ukui-wallpapers
adwaita-icon-theme`` once.

- photographs: ukui-wallpapers' JPEG/PNG photos (2-6k pixels a side, some RGBA PNGs) and
  gnome-backgrounds' 4096x4096 WebP images;
- icons: Adwaita's PNG icons (RGBA, LA and palette-with-transparency), whose file names are
  concepts ("folder-pictures", "user-trash") usable as captions.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

PACKAGES = "gnome-backgrounds ukui-wallpapers adwaita-icon-theme"
PHOTO_GLOBS = (
    "/usr/share/backgrounds/*.jpg",
    "/usr/share/backgrounds/*.png",
    "/usr/share/backgrounds/gnome/*.webp",
)
ICON_ROOT = "/usr/share/icons/Adwaita"


def _require(paths: list[str], what: str) -> list[Path]:
    if not paths:
        pytest.fail(f"no {what} found: install the Debian packages ({PACKAGES}); .ci/run does this as root")
    return [Path(p) for p in sorted(paths)]


def photos() -> list[Path]:
    """Every photograph the packages ship (JPEG, PNG incl. RGBA, WebP), sorted by path."""
    found = [p for g in PHOTO_GLOBS for p in glob.glob(g) if os.path.getsize(p) > 1024]
    return _require(found, "photographs")


def icons(size: str = "96x96") -> list[Path]:
    """Adwaita's PNG icons of one size (``48x48``, ``256x256``, ``512x512``...), sorted."""
    return _require(glob.glob(f"{ICON_ROOT}/{size}/**/*.png", recursive=True), f"{size} PNG icons")


def icons_by_mode() -> dict[str, list[Path]]:
    """All Adwaita PNG icons grouped by PIL mode ('RGBA', 'LA', 'P' ...)."""
    from PIL import Image

    out: dict[str, list[Path]] = {}
    for p in icons("**"):
        with Image.open(p) as im:
            out.setdefault(im.mode, []).append(p)
    return out


def concept(path: Path) -> str:
    """A caption from an icon's or photo's file name: 'folder-pictures.png' -> 'folder pictures'."""
    stem = path.stem.split("_by_")[0]
    return stem.replace("-symbolic", "").replace("-", " ").replace("_", " ").strip()
