"""Feature pyramid (Lin et al. 2017, arXiv 1612.03144) over CoSwin stage outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FeaturePyramid(nn.Module):
    """FPN from the last backbone stages plus extra stride-2 levels, as RetinaNet and ATSS build P3-P7.

    With a standard CoSwin (strides 4, 8, 16, 32) and ``in_channels`` of the last three stages,
    the outputs are P3-P7 at strides 8-128. P6 is a 3x3 stride-2 convolution on P5 and each
    later level one on the ReLU of the previous level. Every 3x3 stride-2 convolution has
    padding 1, so a level of side ``n`` is followed by one of side ``ceil(n / 2)``, the same rule
    as CoSwin's patch merging. The Dynamic Head relies on it.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, num_levels: int = 5) -> None:
        super().__init__()
        if num_levels < len(in_channels):
            raise ValueError(f"num_levels={num_levels} is smaller than the {len(in_channels)} backbone stages used")
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.extra = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
            for _ in range(num_levels - len(in_channels))
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Map backbone maps ``[B, C_i, H_i, W_i]`` (finest first) to ``num_levels`` maps of ``out_channels``."""
        laterals = [conv(x) for conv, x in zip(self.lateral, features)]
        for index in range(len(laterals) - 1, 0, -1):
            finer = laterals[index - 1]
            laterals[index - 1] = finer + F.interpolate(laterals[index], size=finer.shape[-2:], mode="nearest")
        levels = [conv(x) for conv, x in zip(self.output, laterals)]

        for index, conv in enumerate(self.extra):
            source = levels[-1] if index == 0 else F.relu(levels[-1])
            levels.append(conv(source))
        return levels
