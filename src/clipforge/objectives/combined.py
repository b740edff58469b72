"""The training objective as one callable: the registry's main loss + SLIP image SSL + distillation.

``objective(image, text, logit_scale, logit_bias, **inputs)`` where ``inputs`` are optional
per-sample tensors of the batch (all ``[N, ...]`` in sample order, so the feature cache of
gradient accumulation can concatenate them like the features):

==========================  =====================================================================
``ids``                     group ids (several positives), to losses that declare ``ids``
``hard_negatives``          ``[N*H, D]`` text features of hard negatives (+ ``hard_negatives_valid``)
``image_views``             ``[N, D]`` features of a second augmented view (``--image-ssl ntxent``)
``teacher_image/_text``     ``[N, D]`` teacher features (distillation)
==========================  =====================================================================

``last_terms`` keeps the detached value of each term of the last call, for the metrics log.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.objectives import registry
from clipforge.objectives.distill import DistillKL
from clipforge.objectives.pairwise import _Rows, nt_xent

INPUTS = (
    "ids",
    "hard_negatives",
    "hard_negatives_valid",
    "image_views",
    "teacher_image",
    "teacher_text",
    "caption_nll",  # CoCa's per-sample caption terms (clipforge.objectives.coca)
    "caption_tokens",
)
IMAGE_SSL = ("ntxent",)


class ImageSSL(_Rows):
    """SLIP's image-image term: NT-Xent between two augmented views at a fixed temperature.

    Same-id images (the same picture drawn for several captions) are positives too.
    """

    def __init__(self, temperature: float = 0.1, **dist: Any) -> None:
        super().__init__(**dist)
        if temperature <= 0:
            raise ConfigError(f"--image-ssl-temperature must be > 0, got {temperature}")
        self.scale = 1.0 / float(temperature)

    def forward(self, view1: Tensor, view2: Tensor, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        all_1, all_2, local_ids, all_ids, offset = self.gathered(view1, view2, ids)
        scale = torch.tensor(self.scale, dtype=view1.dtype, device=view1.device)
        return nt_xent(view1, view2, all_1, all_2, scale, local_ids, all_ids, offset)


class Objective(nn.Module):
    """Main loss (from the registry) plus optional weighted image-SSL and distillation terms."""

    def __init__(
        self,
        main: nn.Module,
        accepts: tuple[str, ...] = (),
        *,
        image_ssl: ImageSSL | None = None,
        image_ssl_weight: float = 1.0,
        distill: DistillKL | None = None,
        distill_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.main, self.accepts = main, accepts
        self.image_ssl, self.image_ssl_weight = image_ssl, float(image_ssl_weight)
        self.distill, self.distill_weight = distill, float(distill_weight)
        self.last_terms: dict[str, float] = {}

    def forward(
        self, image: Tensor, text: Tensor, logit_scale: Any, logit_bias: Tensor | None = None, **inputs: Any
    ) -> Tensor:
        unknown = set(inputs) - set(INPUTS)
        if unknown:
            raise ConfigError(f"objective: unknown batch inputs {sorted(unknown)}; known: {list(INPUTS)}")
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if "hard_negatives" in inputs and "hard_negatives" not in self.accepts:
            raise ConfigError("hard negatives need a loss that takes them (--loss multipos)")
        main_kw = {
            k: v
            for k, v in inputs.items()
            if k in self.accepts or (k == "hard_negatives_valid" and "hard_negatives" in self.accepts)
        }
        loss = self.main(image, text, logit_scale, logit_bias, **main_kw)
        terms = {"loss_main": loss}
        if self.image_ssl is not None:
            if "image_views" not in inputs:
                raise ConfigError("--image-ssl needs a second augmented view of every image in the batch")
            terms["loss_image_ssl"] = self.image_ssl(image, inputs["image_views"], inputs.get("ids"))
            loss = loss + self.image_ssl_weight * terms["loss_image_ssl"]
        if self.distill is not None:
            if "teacher_image" not in inputs or "teacher_text" not in inputs:
                raise ConfigError("distillation needs teacher features for every sample of the batch")
            terms["loss_distill"] = self.distill(
                image, text, logit_scale, inputs["teacher_image"], inputs["teacher_text"]
            )
            loss = loss + self.distill_weight * terms["loss_distill"]
        self.last_terms = {k: float(v.detach().float()) for k, v in terms.items()} if len(terms) > 1 else {}
        self.last_terms.update(getattr(self.main, "last_terms", None) or {})  # e.g. coca's two terms
        return loss


def build_objective(
    loss: str,
    options: dict[str, Any] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    image_ssl: str | None = None,
    image_ssl_weight: float = 1.0,
    image_ssl_temperature: float = 0.1,
    distill_weight: float | None = None,
    distill_scale: float = 100.0,
) -> Objective:
    """The whole objective; ``distill_weight=None`` means no distillation term."""
    spec = registry.get_spec(loss)
    main = registry.build(loss, options or {}, rank=rank, world_size=world_size)
    dist = {"rank": rank, "world_size": world_size}
    ssl = None
    if image_ssl is not None:
        if image_ssl not in IMAGE_SSL:
            raise ConfigError(f"--image-ssl must be one of {list(IMAGE_SSL)}, got {image_ssl!r}")
        ssl = ImageSSL(image_ssl_temperature, **dist)
    distill = DistillKL(distill_scale, **dist) if distill_weight is not None else None
    return Objective(
        main,
        spec.inputs,
        image_ssl=ssl,
        image_ssl_weight=image_ssl_weight,
        distill=distill,
        distill_weight=distill_weight or 0.0,
    )
