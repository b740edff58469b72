"""The model a config describes, CLIP or CoCa.

Kept apart from :mod:`clipforge.model.clip` because CoCa is a CLIP subclass: choosing between the
two needs both classes, and ``clip.py`` importing ``coca.py`` (which imports it back) would be a cycle.
"""

from __future__ import annotations

from torch import nn

from clipforge.model.clip import CLIP
from clipforge.model.coca import CoCa
from clipforge.model.config import CLIPConfig

__all__ = ["build_model"]


def build_model(config: CLIPConfig) -> nn.Module:
    """The model a config describes: a CoCa when it has a captioning decoder (``multimodal``), else CLIP."""
    if config.multimodal is not None:
        return CoCa(config)
    return CLIP(config)
