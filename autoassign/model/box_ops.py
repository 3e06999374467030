"""Aligned IoU and GIoU of box pairs in ``(x1, y1, x2, y2)`` pixels."""

from __future__ import annotations

import torch
from torch import Tensor

Corners = tuple[Tensor, Tensor, Tensor, Tensor]


def _overlap_and_union(a: Corners, b: Corners, eps: float) -> tuple[Tensor, Tensor]:
    inter_w = (a[2].minimum(b[2]) - a[0].maximum(b[0])).clamp(min=0)
    inter_h = (a[3].minimum(b[3]) - a[1].maximum(b[1])).clamp(min=0)
    overlap = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap, union.clamp(min=eps)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]``; shapes ``[..., 4]`` broadcast to ``[...]``.

    The union is clamped below at ``eps`` so zero-size boxes give IoU 0, not NaN.
    """
    overlap, union = _overlap_and_union(boxes1.unbind(-1), boxes2.unbind(-1), eps)
    return overlap / union


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of ``boxes1[i]`` with ``boxes2[i]``, shapes ``[..., 4]`` -> ``[...]``.

    ``GIoU = IoU - (enclosing - union) / enclosing`` with the union and the enclosing area
    each clamped below at ``eps``: finite (and differentiable) for zero-size boxes.
    """
    # One unbind per input: slicing a [K, 4] tensor repeatedly would allocate a [K, 4]
    # gradient buffer per slice in the backward pass.
    a, b = boxes1.unbind(-1), boxes2.unbind(-1)
    overlap, union = _overlap_and_union(a, b, eps)
    enclose_w = (a[2].maximum(b[2]) - a[0].minimum(b[0])).clamp(min=0)
    enclose_h = (a[3].maximum(b[3]) - a[1].minimum(b[1])).clamp(min=0)
    enclose = (enclose_w * enclose_h).clamp(min=eps)
    return overlap / union - (enclose - union) / enclose


def ltrb_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """Boxes ``[..., 4]`` (x1, y1, x2, y2) from points ``[..., 2]`` (x, y) and their
    ``[..., 4]`` left, top, right and bottom distances to the box sides, all in pixels."""
    return torch.cat((points - distances[..., :2], points + distances[..., 2:]), dim=-1)
