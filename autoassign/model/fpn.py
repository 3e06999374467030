"""Feature pyramid P3..P7 on top of C3, C4, C5."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FPN"]


class FPN(nn.Module):
    """FPN with 1x1 laterals, nearest top-down sum, 3x3 outputs, and P6/P7 from C5.

    P6 is a 3x3 stride-2 conv on C5 (the backbone output, not P5) and P7 a 3x3 stride-2 conv
    on ``relu(P6)``. Every conv is initialised Kaiming-uniform with ``a=1`` and bias 0.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every output level (256 in the reference).

    Shapes: inputs ``[B, in_channels[i], H_i, W_i]`` with strides 8, 16, 32; outputs five
    ``[B, out_channels, H, W]`` maps with strides 8, 16, 32, 64, 128.
    """

    def __init__(self, *, in_channels: list[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        self.p6 = nn.Conv2d(in_channels[-1], out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.out_channels = out_channels
        self.strides = [8, 16, 32, 64, 128]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + upsampled
        outputs = [conv(x) for conv, x in zip(self.output_convs, laterals)]
        p6 = self.p6(features[-1])
        p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]
