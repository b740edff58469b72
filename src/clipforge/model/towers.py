"""Optional towers from other libraries behind clipforge's tower contract.

``TimmImageTower`` (:mod:`clipforge.model.timm_tower`) wraps any timm backbone as open_clip's
``TimmModel`` does; Hugging Face text towers live in :mod:`clipforge.model.hf_text`. This module
keeps the old import path working.
"""

from __future__ import annotations

from clipforge.model.timm_tower import TimmImageTower

__all__ = ["TimmImageTower"]
