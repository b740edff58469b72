"""Named weights open_clip's main branch lists that 3.3 does not: SigLIP 2 NaFlex.

open_clip main (commit a422955) publishes ``ViT-B-16-SigLIP2-naflex`` and
``ViT-SO400M-16-SigLIP2-naflex`` with tag ``webli`` in ``timm/<name>`` (open_clip's file names),
SigLIP's preprocessing facts (mean/std 0.5, bicubic, squash) and, in the model config, 384 px and
``image_seq_len`` 576: the number of 16-pixel patches an image gets at native aspect ratio. That
last fact is what ``naflex_max_patches`` records, so the tag's preprocessing is NaFlex's, and
open_clip main builds it with timm's NaFlex transforms, so ``naflex_resize`` is "timm" (PIL
bicubic) rather than Siglip2ImageProcessor's bilinear resize.
Hand-written (``tools/gen_pretrained_table.py`` regenerates only open_clip 3.3's rows, which
this module leaves alone); ``tests/test_zoo_naflex.py`` checks it against open_clip main's files.
"""

from __future__ import annotations

from typing import Any

from clipforge.checkpoints.pretrained_table import SIGLIP, SIGLIP2_SRC

#: open_clip main's vision_cfg.image_seq_len / patch size for both models, resized as timm does.
NAFLEX_576: dict[str, Any] = {"naflex_max_patches": 576, "naflex_patch_size": 16, "naflex_resize": "timm"}
_NOTES = "SigLIP 2 NaFlex (native aspect ratio, up to 576 patches); open_clip main, not in 3.3"


def _naflex_row(model: str) -> dict[str, Any]:
    """One row: open_clip's Hub repository ``timm/<model>``, SigLIP's facts, NaFlex with 576 patches."""
    return {"model": model, "tag": "webli", "hf_hub": f"timm/{model}", **SIGLIP, **SIGLIP2_SRC, **NAFLEX_576,
            "image_size": 384, "notes": _NOTES}  # fmt: skip


MAIN_ROWS: tuple[dict[str, Any], ...] = (
    _naflex_row("ViT-B-16-SigLIP2-naflex"),
    _naflex_row("ViT-SO400M-16-SigLIP2-naflex"),
)
