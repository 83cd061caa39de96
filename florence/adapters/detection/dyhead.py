"""Dynamic Head (Dai et al. 2021, arXiv 2106.08322): scale-, spatial- and task-aware attention.

One block maps the pyramid ``[P_1 .. P_L]`` (all with ``C`` channels) to a pyramid of the same
shapes. For every level ``l`` it

1. computes 18 sampling offsets and 9 modulation masks from ``P_l`` with a 3x3 convolution;
2. applies a 3x3 modulated deformable convolution with those offsets and masks to ``P_l``, to
   ``P_{l-1}`` with stride 2, and to ``P_{l+1}`` after bilinear upsampling to ``P_l``'s size
   (spatial-aware attention);
3. weights each of these (up to three) maps by ``hard_sigmoid(relu(conv1x1(avgpool(map))))`` and
   averages them (scale-aware attention);
4. applies a dynamic ReLU whose two slopes and intercepts per channel come from the pooled map
   (task-aware attention).

The public DynamicHead code computes the offsets on ``P_l`` and also feeds them to the stride-1
convolution of ``P_{l+1}``, whose output has ``P_{l+1}``'s smaller size, so the offsets are read
at the wrong positions. Here every deformable convolution produces a map of ``P_l``'s size, so
the offsets and masks computed on ``P_l`` always address the grid they were computed for.
``torchvision.ops.deform_conv2d`` raises if they ever do not.

The hard sigmoid is ``relu6(x + 3) / 6`` and the dynamic ReLU maps its four outputs ``y`` to
``a1 = 2(y - 0.5) + 1``, ``a2 = 2(y - 0.5)``, ``b = y - 0.5``, both as in the public code; the
paper's hard sigmoid is ``clamp((x + 1) / 2, 0, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

KERNEL_POINTS = 9


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3.0) / 6.0


class ModulatedDeformConv(nn.Module):
    """3x3 modulated deformable convolution (DCNv2) followed by GroupNorm, offsets given by the caller."""

    def __init__(self, channels: int, stride: int = 1, groups: int = 16) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.normal_(self.weight, std=0.01)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = deform_conv2d(x, offset, self.weight, stride=self.stride, padding=1, mask=mask)
        return self.norm(out)


class DynamicReLU(nn.Module):
    """Task-aware attention: ``max(a1 * x + b1, a2 * x + b2)`` with per-sample, per-channel a, b."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, 4 * channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = hard_sigmoid(self.fc(x.mean(dim=(2, 3)))) - 0.5
        a1, b1, a2, b2 = y[:, :, None, None].chunk(4, dim=1)
        return torch.maximum(x * (2 * a1 + 1) + b1, x * (2 * a2) + b2)


class DynamicHeadBlock(nn.Module):
    """One Dynamic Head block: spatial-, scale- then task-aware attention on every level."""

    def __init__(self, channels: int, groups: int = 16) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"channels={channels} must be divisible by the GroupNorm groups={groups}")
        self.offset = nn.Conv2d(channels, 3 * KERNEL_POINTS, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv_finer = ModulatedDeformConv(channels, stride=2, groups=groups)
        self.conv_same = ModulatedDeformConv(channels, stride=1, groups=groups)
        self.conv_coarser = ModulatedDeformConv(channels, stride=1, groups=groups)
        self.scale = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.scale.weight, std=0.01)
        nn.init.zeros_(self.scale.bias)
        self.task = DynamicReLU(channels)

    def offsets_and_masks(self, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return offsets ``[B, 18, H, W]`` and sigmoid masks ``[B, 9, H, W]`` for a level of size H x W."""
        out = self.offset(level)
        return out[:, : 2 * KERNEL_POINTS], out[:, 2 * KERNEL_POINTS :].sigmoid()

    def _scale_weight(self, x: torch.Tensor) -> torch.Tensor:
        return hard_sigmoid(F.relu(self.scale(F.adaptive_avg_pool2d(x, 1))))

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for index, level in enumerate(levels):
            offset, mask = self.offsets_and_masks(level)
            maps = [self.conv_same(level, offset, mask)]
            if index > 0:
                maps.append(self.conv_finer(levels[index - 1], offset, mask))
            if index + 1 < len(levels):
                coarser = F.interpolate(levels[index + 1], size=level.shape[-2:], mode="bilinear", align_corners=True)
                maps.append(self.conv_coarser(coarser, offset, mask))

            fused = torch.stack([m * self._scale_weight(m) for m in maps]).mean(dim=0)
            outputs.append(self.task(fused))
        return outputs


class DynamicHead(nn.Sequential):
    """``num_blocks`` stacked :class:`DynamicHeadBlock` (6 blocks of 256 channels in the public code)."""

    def __init__(self, channels: int = 256, num_blocks: int = 6, groups: int = 16) -> None:
        super().__init__(*(DynamicHeadBlock(channels, groups) for _ in range(num_blocks)))

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        levels = list(levels)
        for block in self:
            levels = block(levels)
        return levels
