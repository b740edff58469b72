"""Training objectives built on :mod:`clipforge.losses`, and the registry ``--loss NAME`` reads.

- :mod:`~clipforge.objectives.registry` - names, declared options, defaults (torch-free)
- :mod:`~clipforge.objectives.multipos` - multi-positive InfoNCE (mean / lse), hard negatives, chunked
- :mod:`~clipforge.objectives.siglip` - SigLIP with ids, neighbour exchange across ranks
- :mod:`~clipforge.objectives.pairwise` - triplet, NT-Xent, contrastive BCE
- :mod:`~clipforge.objectives.distill` - KL distillation from a teacher's similarities
- :mod:`~clipforge.objectives.combined` - main loss + image SSL + distillation as one callable

Importing this package does not import torch; the submodules do.
"""

from clipforge.objectives.registry import LOSS_NAMES, LOSS_OPTIONS, LOSSES, build, resolve_options

__all__ = ["LOSSES", "LOSS_NAMES", "LOSS_OPTIONS", "build", "resolve_options"]
