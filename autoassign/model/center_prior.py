"""The learnable per-class Gaussian center prior of AutoAssign."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CenterPrior(nn.Module):
    """Per-class Gaussian over a point's offset from its box centre, in level strides.

    For a point ``(px, py)`` on a level of stride ``s`` and a box of class ``c`` with centre
    ``(cx, cy)``, the offset is ``d = ((px - cx) / s, (py - cy) / s)`` and the prior is
    ``exp(-(d_x - mean[c, 0])^2 / (2 sigma[c, 0]^2))
    * exp(-(d_y - mean[c, 1])^2 / (2 sigma[c, 1]^2))``.

    Args:
        num_classes: number of object classes ``C``.
        mean_init: initial ``mean`` of every class, ``(x, y)`` in strides.
        sigma_init: initial ``sigma`` of every class, ``(x, y)`` in strides, both > 0.

    Attributes:
        mean: ``[C, 2]`` learnable centre offset.
        sigma: ``[C, 2]`` learnable spread.
    """

    def __init__(self, num_classes: int, mean_init=(0.0, 0.0), sigma_init=(1.0, 1.0)):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"CenterPrior: num_classes must be > 0, got {num_classes}")
        if len(mean_init) != 2 or len(sigma_init) != 2:
            raise ValueError("CenterPrior: mean_init and sigma_init must each have 2 values (x, y)")
        if min(sigma_init) <= 0:
            raise ValueError(f"CenterPrior: sigma_init must be > 0, got {tuple(sigma_init)}")
        self.num_classes = num_classes
        self.mean = nn.Parameter(
            torch.tensor(mean_init, dtype=torch.float32).repeat(num_classes, 1)
        )
        self.sigma = nn.Parameter(
            torch.tensor(sigma_init, dtype=torch.float32).repeat(num_classes, 1)
        )

    def forward(self, offsets: Tensor, labels: Tensor) -> Tensor:
        """Prior values of (point, box) pairs.

        Args:
            offsets: ``[K, 2]`` point minus box centre, divided by the point's level stride.
            labels: ``[K]`` int64 class of each pair's box.

        Returns:
            ``[K]`` prior in ``[0, 1]``, differentiable w.r.t. ``mean`` and ``sigma``.
        """
        mean = self.mean[labels].to(offsets.dtype)  # [K, 2]
        sigma = self.sigma[labels].to(offsets.dtype)  # [K, 2]
        distance = (offsets - mean) ** 2
        return torch.exp(-distance / (2 * sigma**2)).prod(dim=-1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
