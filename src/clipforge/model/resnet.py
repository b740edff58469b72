"""CLIP's modified ResNet image tower.

Differences from torchvision's ResNet, all from OpenAI's paper: a 3-convolution stem with an
average pool instead of a max pool; anti-aliased downsampling (an ``AvgPool2d`` before each
strided step instead of a strided convolution); and an attention pool instead of global average
pooling. Module names match OpenAI's checkpoints exactly so their weights load without renaming.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.config import VisionConfig
from clipforge.model.layers import lock_groups
from clipforge.model.vision import VisionOutput, take_indices


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        # Anti-aliasing: average-pool *then* a stride-1 1x1 conv, instead of a strided conv.
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.act2(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return self.act3(y + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token over all spatial positions, then a projection.

    Only the first (mean) query's output is used, so we project just that one query and feed
    SDPA a length-1 query: same result as OpenAI's full attention, a fraction of the work.
    """

    def __init__(self, spatial_dim: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.num_heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        heads, head_dim = self.num_heads, width // self.num_heads
        tokens = x.shape[1]
        q = self.q_proj(x[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, D]
        return self.c_proj(out.transpose(1, 2).reshape(batch, width))


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int) -> None:
        super().__init__()
        width, layers = cfg.width, cfg.layers
        self.image_size = cfg.image_size
        self.output_dim = embed_dim
        self._bn_frozen = False
        #: Set by ``clipforge.inference.optimize_for_inference``: feed convolutions NHWC tensors.
        self.channels_last = False
        # 3-conv stem, then a 2x average pool (OpenAI: no max pool).
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        inplanes = width
        stages = []
        for i, depth in enumerate(layers):
            planes = width * 2**i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes) for _ in range(1, depth)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, embed_dim)
        self.init_parameters()

    # --- contract ---------------------------------------------------------------------------------
    def init_parameters(self) -> None:
        """OpenAI's scheme: attention-pool projections ~ N(0, 1/C); each block's last BN starts at 0."""
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Not implemented for convolutional stages: ResNet activations are cheap to keep."""

    def no_weight_decay(self) -> set[str]:
        return {"attnpool.positional_embedding"}

    def lock(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the tower except the last ``unlocked_groups`` of (stem, layer1..4, attnpool)."""
        stem = [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]
        groups = [stem, self.layer1, self.layer2, self.layer3, self.layer4, self.attnpool]
        lock_groups(self, groups, unlocked_groups)
        if freeze_bn_stats:
            self._bn_frozen = True
            self.train(self.training)

    def train(self, mode: bool = True) -> ModifiedResNet:
        # Frozen BatchNorm statistics must survive model.train(): keep those layers in eval mode.
        super().train(mode)
        if self._bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    # --- forward ----------------------------------------------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.avgpool(x)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map ``[B, 32*width, H/32, W/32]`` before attention pooling."""
        x = self._prepare(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: list[int] | int | None = None) -> VisionOutput:
        """Pooled features plus feature maps of (stem, layer1..4) selected by ``indices``."""
        maps = []
        x = self._prepare(x)
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            maps.append(x)
        take = take_indices(len(maps), indices)
        return VisionOutput(
            pooled=self.attnpool(x),
            tokens=x.flatten(2).transpose(1, 2),
            intermediates=[maps[i] for i in take],
        )

    def forward_tokens(self, x: torch.Tensor) -> VisionOutput:
        """Pooled features and the final feature map as ``[B, HW, C]`` tokens."""
        return self.forward_intermediates(x, indices=[])
