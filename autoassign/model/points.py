"""Locations of the feature-map cells of one FPN level in input-image pixels."""

from __future__ import annotations

import torch
from torch import Tensor


def level_points(height: int, width: int, stride: int, device, dtype=torch.float32) -> Tensor:
    """Points of a ``height x width`` feature map whose cells are ``stride`` pixels apart.

    Returns:
        ``[H*W, 2]`` tensor of ``(x, y) = (col * stride, row * stride)`` in input pixels,
        row-major (index ``row * W + col``). AutoAssign adds no half-stride offset (FCOS does).
    """
    xs = torch.arange(width, device=device, dtype=dtype) * stride
    ys = torch.arange(height, device=device, dtype=dtype) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)
