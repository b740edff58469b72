"""Distillation: match the student's similarity distributions to a teacher's (KL), as a weighted term.

For each image row ``i`` (and each text row) of the global batch, the teacher's softmax over
``t_scale * T_img @ T_txt.T`` is the target of the student's softmax over ``scale * S_img @ S_txt.T``:
``KL(p_teacher || p_student)``, averaged over rows and over the two directions. This is open_clip's
``DistillClipLoss`` term (MobileCLIP, TinyCLIP) minus the teacher's entropy, a constant: same
gradients, and a value that is 0 when the student reproduces the teacher.

Teacher features come precomputed (a ``clipforge embed`` folder, looked up per sample by the
data layer) or from a frozen teacher model run on the fly (:class:`OnTheFlyTeacher`); either way
they arrive per sample and are gathered (without gradient) like the student's, each rank
computing its own rows, so DDP and accumulation with the feature cache see the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipforge.errors import ConfigError
from clipforge.losses import _as_scale, _gather_one, gather_features


def kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of ``KL(softmax(teacher) || softmax(student))``."""
    log_t = F.log_softmax(teacher_logits.to(student_logits.dtype), dim=1)
    log_s = F.log_softmax(student_logits, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean()


class DistillKL(nn.Module):
    """The KL term; ``teacher_scale`` is the teacher's (exponentiated) temperature."""

    def __init__(
        self, teacher_scale: float = 100.0, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1
    ):
        super().__init__()
        if teacher_scale <= 0:
            raise ConfigError(f"--distill-scale must be > 0, got {teacher_scale}")
        self.teacher_scale, self.gather_with_grad = float(teacher_scale), gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(
        self,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor | float,
        teacher_image: Tensor,
        teacher_text: Tensor,
    ) -> Tensor:
        all_image, all_text = gather_features(
            image, text, gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size
        )
        t_image, t_text = teacher_image.detach(), teacher_text.detach()
        t_all_image, t_all_text = t_image, t_text
        if self.world_size > 1:
            t_all_image = _gather_one(t_image, with_grad=False, rank=self.rank, world_size=self.world_size)
            t_all_text = _gather_one(t_text, with_grad=False, rank=self.rank, world_size=self.world_size)
        scale = _as_scale(logit_scale, image)
        s_i, s_t = (scale * image) @ all_text.T, (scale * text) @ all_image.T
        t_i = self.teacher_scale * t_image @ t_all_text.T
        t_t = self.teacher_scale * t_text @ t_all_image.T
        return (kl_rows(t_i, s_i) + kl_rows(t_t, s_t)) / 2


class OnTheFlyTeacher:
    """A frozen teacher model (anything ``create_model`` loads) embedding the student's batch.

    The student's images are resized to the teacher's input size and re-normalised with the
    teacher's mean/std; the token ids are reused as they are, so the teacher must share the
    student's tokenizer (vocabulary and context length), which is checked when it is built.
    """

    def __init__(
        self,
        model: nn.Module,
        student_mean_std: tuple[Any, Any],
        teacher_mean_std: tuple[Any, Any],
        image_size: int,
    ):
        self.model = model.eval().requires_grad_(False)
        self.src = [torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in student_mean_std]
        self.dst = [torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in teacher_mean_std]
        self.image_size = int(image_size)
        self.logit_scale = float(model.logit_scale.detach().exp())

    @torch.no_grad()
    def __call__(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        device = images.device
        (s_mean, s_std), (t_mean, t_std) = [[t.to(device) for t in p] for p in (self.src, self.dst)]
        pixels = images.float() * s_std + s_mean
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(
                pixels, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            )
        pixels = (pixels - t_mean) / t_std
        out = self.model(images=pixels, tokens=tokens)
        return out.image_features.float(), out.text_features.float()
