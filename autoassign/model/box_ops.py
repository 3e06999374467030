"""Aligned IoU and GIoU of box pairs in ``(x1, y1, x2, y2)`` pixels."""

from __future__ import annotations

from torch import Tensor


def _area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlap_and_union(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    top_left = boxes1[..., :2].maximum(boxes2[..., :2])
    bottom_right = boxes1[..., 2:].minimum(boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = (_area(boxes1) + _area(boxes2) - overlap).clamp(min=eps)
    return overlap, union


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``boxes1[i]`` with ``boxes2[i]``; shapes ``[..., 4]`` broadcast to ``[...]``.

    The union is clamped below at ``eps`` so zero-size boxes give IoU 0, not NaN.
    """
    overlap, union = _overlap_and_union(boxes1, boxes2, eps)
    return overlap / union


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Generalised IoU of ``boxes1[i]`` with ``boxes2[i]``, shapes ``[..., 4]`` -> ``[...]``.

    ``GIoU = IoU - (enclosing - union) / enclosing`` with the union and the enclosing area
    each clamped below at ``eps``: finite (and differentiable) for zero-size boxes.
    """
    overlap, union = _overlap_and_union(boxes1, boxes2, eps)
    iou = overlap / union
    enclose_top_left = boxes1[..., :2].minimum(boxes2[..., :2])
    enclose_bottom_right = boxes1[..., 2:].maximum(boxes2[..., 2:])
    enclose_wh = (enclose_bottom_right - enclose_top_left).clamp(min=0)
    enclose_area = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose_area - union) / enclose_area
