"""The AutoAssign training loss, vectorised over images and sparse over (point, box) pairs.

Only pairs whose point lies strictly inside the box carry weight in AutoAssign, so instead of
the dense ``[P, G]`` tensors of each image this module enumerates the inside pairs of every
box of the batch directly from the box's range of grid cells on each level, gathers the
per-pair values and reduces them per box with ``index_add`` / ``scatter_reduce``. The results
(and their gradients) equal the dense definition in ``tests/loss_reference.py``.

The IoU row maximum of the negative loss is over ALL boxes of the image, not only those the
point is inside; it is needed only for points with at least one pair, and only boxes that
overlap a point's predicted box can raise it above 0, so it is taken over (point, box)
candidates that overlap per block of points (``autoassign.model.assignment.row_max_iou``).

Details that follow the reference implementation (mmdetection's ``AutoAssignHead``) where the
specification is silent: the ``N_gt`` normaliser is clamped below at 1 after averaging over
workers; an image whose boxes have no inside point at all (boxes smaller than a stride) adds 0
to ``loss_center`` rather than ``G / 1e-12``; a box without inside points has ``P_g = 0`` and
adds BCE's clamped 100 to ``loss_pos``.

Shapes: ``B`` images, ``C`` classes, ``P`` points over all levels, ``N`` boxes in the batch,
``K`` (point, box) pairs in the batch. Boxes are ``(x1, y1, x2, y2)`` in input pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from autoassign.distributed import mean_across_ranks
from autoassign.errors import AutoAssignError
from autoassign.model.assignment import (
    BOX_EPS,
    assignment_pairs,
    levels_to_images,
    make_levels,
    row_max_iou,
    unique_ids,
)
from autoassign.model.box_ops import aligned_giou, ltrb_to_boxes
from autoassign.model.center_prior import CenterPrior

EPS = 1e-12
"""Floor of the per-box weight sums, the IoU weights and the center-loss denominator."""


class LossInputError(AutoAssignError, ValueError):
    """The loss was called with inconsistent head outputs or targets."""


def _check_inputs(
    cls_logits, ltrb_distances, objectness, strides, gt_boxes, gt_labels, center_prior
):
    num_levels = len(cls_logits)
    if num_levels == 0:
        raise LossInputError("autoassign_loss: cls_logits is empty (need one tensor per level)")
    for name, seq in (
        ("ltrb_distances", ltrb_distances),
        ("objectness", objectness),
        ("strides", strides),
    ):
        if len(seq) != num_levels:
            raise LossInputError(
                f"autoassign_loss: {name} has {len(seq)} levels, cls_logits has {num_levels}"
            )
    batch, num_classes = cls_logits[0].shape[:2]
    for level, (cls, reg, obj) in enumerate(zip(cls_logits, ltrb_distances, objectness)):
        if cls.dim() != 4 or cls.shape[:2] != (batch, num_classes):
            raise LossInputError(
                f"autoassign_loss: cls_logits[{level}] has shape {tuple(cls.shape)}, "
                f"expected [{batch}, {num_classes}, H, W]"
            )
        height, width = cls.shape[2:]
        if tuple(reg.shape) != (batch, 4, height, width):
            raise LossInputError(
                f"autoassign_loss: ltrb_distances[{level}] has shape {tuple(reg.shape)}, "
                f"expected {(batch, 4, height, width)}"
            )
        if tuple(obj.shape) != (batch, 1, height, width):
            raise LossInputError(
                f"autoassign_loss: objectness[{level}] has shape {tuple(obj.shape)}, "
                f"expected {(batch, 1, height, width)}"
            )
    if len(gt_boxes) != batch or len(gt_labels) != batch:
        raise LossInputError(
            f"autoassign_loss: {len(gt_boxes)} gt_boxes and {len(gt_labels)} gt_labels "
            f"entries for a batch of {batch} images"
        )
    for image, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels)):
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise LossInputError(
                f"autoassign_loss: gt_boxes[{image}] has shape {tuple(boxes.shape)}, "
                "expected [G, 4]"
            )
        if labels.shape != (boxes.shape[0],):
            raise LossInputError(
                f"autoassign_loss: gt_labels[{image}] has shape {tuple(labels.shape)}, "
                f"expected [{boxes.shape[0]}] (one label per box)"
            )
        if boxes.numel() and not (
            torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        ):
            raise LossInputError(
                f"autoassign_loss: gt_boxes[{image}] has boxes with x2 < x1, y2 < y1 or "
                "non-finite coordinates (boxes are x1, y1, x2, y2)"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise LossInputError(
                f"autoassign_loss: gt_labels[{image}] has values outside 0..{num_classes - 1}"
            )
    if center_prior.mean.shape[0] != num_classes:
        raise LossInputError(
            f"autoassign_loss: center_prior has {center_prior.mean.shape[0]} classes, "
            f"cls_logits has {num_classes}"
        )


def _negative_weights(
    flat_index: Tensor, box: Tensor, iou: Tensor, num_boxes: int, size: int
) -> Tensor:
    """The ``wn`` map of the negative loss, flattened to ``[B * P * C]``.

    Args:
        flat_index: ``[K]`` position ``(image * P + point) * C + label`` of each pair.
        box: ``[K]`` box of each pair (higher index = later box of the same image).
        iou: ``[K]`` the pair's point's IoU row maximum.
    """
    weight = 1 / (1 - iou).clamp(min=EPS)
    low = weight.new_zeros(num_boxes).scatter_reduce(0, box, weight, "amin", include_self=False)
    high = weight.new_zeros(num_boxes).scatter_reduce(0, box, weight, "amax", include_self=False)
    low, high = low[box], high[box]
    value = 1 - (weight - low + EPS) / (high - low + EPS)
    # A point inside two boxes of one class takes the value of the higher box index.
    last_box = torch.full((size,), -1, dtype=box.dtype, device=box.device)
    last_box.scatter_reduce_(0, flat_index, box, "amax", include_self=True)
    wins = last_box[flat_index] == box
    weights = torch.ones(size, dtype=iou.dtype, device=iou.device)
    weights[flat_index[wins]] = value[wins]
    return weights


def autoassign_loss(
    cls_logits: list[Tensor],
    ltrb_distances: list[Tensor],
    objectness: list[Tensor],
    strides: list[int],
    gt_boxes: list[Tensor],
    gt_labels: list[Tensor],
    center_prior: CenterPrior,
    *,
    pos_weight=0.25,
    neg_weight=0.75,
    center_weight=0.75,
    giou_weight=5.0,
    force_topk=0,
    confidence_weighting=True,
) -> dict[str, Tensor]:
    """AutoAssign's positive, negative and center losses for one batch.

    A box's positive probability is the weighted mean of its inside pairs' ``p_pos``::

        P_g = sum_i w_i * p_pos_i / sum_i w_i,   p_pos_i = p_cls_i * p_obj_i * p_loc_i

    with ``w_i = exp(3 * p_pos_i) * prior_i`` (the paper's confidence weighting, tau = 1/3;
    the gradient flows through both factors, as in the reference) or, with
    ``confidence_weighting=False``, ``w_i = prior_i``: the prior alone decides the weights.

    Args:
        cls_logits: per level ``[B, C, H_l, W_l]`` class logits.
        ltrb_distances: per level ``[B, 4, H_l, W_l]`` left, top, right, bottom distances in input
            pixels (already ``relu(scale * reg) * stride``).
        objectness: per level ``[B, 1, H_l, W_l]`` objectness logits.
        strides: per level stride in pixels, e.g. ``[8, 16, 32, 64, 128]``.
        gt_boxes: per image ``[G_i, 4]`` boxes ``(x1, y1, x2, y2)`` in input pixels.
        gt_labels: per image ``[G_i]`` int64 classes in ``0..C-1``.
        center_prior: the learnable per-class Gaussian prior.
        pos_weight, neg_weight, center_weight: factors of the three losses.
        giou_weight: factor of ``1 - GIoU`` in the localisation probability
            ``exp(-giou_weight * (1 - GIoU))``.
        force_topk: if > 0, a box with no point strictly inside gets its ``force_topk``
            highest-prior points (over all levels) as its inside points.
        confidence_weighting: the ``exp(3 * p_pos)`` factor of the positive weights (an
            ablation switch: False leaves the prior alone).

    Returns:
        ``{"loss_pos", "loss_neg", "loss_center"}`` scalar tensors. A batch without boxes gives
        zero ``loss_pos`` and ``loss_center`` that are still connected to every head output and
        to the prior's ``mean`` and ``sigma`` (so data-parallel gradients stay in step).
        Float16/bfloat16 head outputs are computed in float32, with autocast off.

    Raises:
        LossInputError: shapes that do not match, labels outside ``0..C-1``, boxes with
            ``x2 < x1`` or ``y2 < y1``.
    """
    _check_inputs(
        cls_logits, ltrb_distances, objectness, strides, gt_boxes, gt_labels, center_prior
    )
    dtype = cls_logits[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # mixed precision: the exponentials, GIoU and BCE need float32
    cls_logits, ltrb_distances, objectness = (
        [x.to(dtype) for x in group] for group in (cls_logits, ltrb_distances, objectness)
    )
    with torch.autocast(cls_logits[0].device.type, enabled=False):
        return _loss(
            cls_logits,
            ltrb_distances,
            objectness,
            strides,
            gt_boxes,
            gt_labels,
            center_prior,
            pos_weight=pos_weight,
            neg_weight=neg_weight,
            center_weight=center_weight,
            giou_weight=giou_weight,
            force_topk=force_topk,
            confidence_weighting=confidence_weighting,
        )


def _loss(
    cls_logits,
    ltrb_distances,
    objectness,
    strides,
    gt_boxes,
    gt_labels,
    center_prior,
    *,
    pos_weight,
    neg_weight,
    center_weight,
    giou_weight,
    force_topk,
    confidence_weighting,
) -> dict[str, Tensor]:
    device, dtype = cls_logits[0].device, cls_logits[0].dtype
    batch, num_classes = cls_logits[0].shape[:2]
    levels = make_levels([tuple(x.shape[2:]) for x in cls_logits], list(strides), device, dtype)
    num_points = levels.num_points

    cls_prob = levels_to_images(cls_logits).sigmoid()  # [B, P, C]
    obj_prob = levels_to_images(objectness).sigmoid()  # [B, P, 1]
    joint = (cls_prob * obj_prob).reshape(-1)  # [B * P * C]
    distances = levels_to_images(ltrb_distances).reshape(-1, 4)  # [B * P, 4]

    box_count = torch.tensor([len(b) for b in gt_boxes], device=device)  # [B]
    boxes = torch.cat([b.to(device=device, dtype=dtype) for b in gt_boxes])  # [N, 4]
    labels = torch.cat([lab.to(device=device, dtype=torch.long) for lab in gt_labels])  # [N]
    box_image = torch.repeat_interleave(torch.arange(batch, device=device), box_count)  # [N]
    box_start = box_count.cumsum(0) - box_count
    num_boxes = boxes.shape[0]

    neg_weights = torch.ones_like(joint, requires_grad=False)
    prior_total = torch.zeros((), device=device, dtype=dtype)
    if num_boxes > 0:
        pair_box, pair_point = assignment_pairs(boxes, labels, levels, center_prior, force_topk)
        pair_image = box_image[pair_box]
        pair_label = labels[pair_box]
        flat_point = pair_image * num_points + pair_point  # [K] row of [B * P]
        flat_index = flat_point * num_classes + pair_label  # [K] entry of [B * P * C]
        point_xy = levels.points[pair_point]  # [K, 2]
        target = boxes[pair_box]  # [K, 4]

        centre = (target[:, :2] + target[:, 2:]) / 2
        pair_stride = levels.strides[torch.bucketize(pair_point, levels.starts, right=True) - 1]
        prior = center_prior((point_xy - centre) / pair_stride[:, None], pair_label)  # [K]
        prior_total = prior.detach().sum()

        # Positive: per box, the prior- and confidence-weighted mean of p_pos over its pairs.
        pred = ltrb_to_boxes(point_xy, distances[flat_point])  # [K, 4]
        p_loc = torch.exp(-giou_weight * (1 - aligned_giou(pred, target, eps=BOX_EPS)))
        p_pos = joint[flat_index] * p_loc  # [K]
        weighted = torch.exp(3 * p_pos) * prior if confidence_weighting else prior
        weight_sum = weighted.new_zeros(num_boxes).index_add(0, pair_box, weighted)
        box_prob = weighted.new_zeros(num_boxes).index_add(0, pair_box, weighted * p_pos)
        box_prob = box_prob / weight_sum.clamp(min=EPS)  # [N]
        pos_sum = F.binary_cross_entropy(box_prob, torch.ones_like(box_prob), reduction="sum")

        if flat_point.numel():
            unique_points, pair_to_unique = unique_ids(flat_point, batch * num_points)
            unique_pred = ltrb_to_boxes(
                levels.points[unique_points % num_points], distances.detach()[unique_points]
            )
            row_max = row_max_iou(unique_points, unique_pred, boxes, box_start, box_count, levels)
            neg_weights = _negative_weights(
                flat_index, pair_box, row_max[pair_to_unique], num_boxes, joint.numel()
            )

        # Center: an image whose boxes have no pair at all adds a connected zero.
        prior_per_image = prior.new_zeros(batch).index_add(0, pair_image, prior)
        has_pairs = torch.bincount(pair_image, minlength=batch) > 0
        center_terms = torch.where(
            has_pairs, box_count.to(dtype) / prior_per_image.clamp(min=EPS), prior_per_image * 0
        )

    x = joint * neg_weights
    neg_sum = (x**2 * F.binary_cross_entropy(x, torch.zeros_like(x), reduction="none")).sum()

    # Every worker joins this all-reduce, with or without boxes of its own.
    num_gt = torch.tensor(float(num_boxes), device=device, dtype=dtype)
    num_gt, prior_mass = mean_across_ranks(torch.stack((num_gt, prior_total))).clamp(min=1).unbind()
    loss_neg = neg_weight * neg_sum / prior_mass
    if num_boxes > 0:
        loss_pos = pos_weight * pos_sum / num_gt
        loss_center = center_weight * center_terms.mean()
    else:
        connected_zero = sum(t.sum() * 0 for t in [*cls_logits, *ltrb_distances, *objectness])
        connected_zero = connected_zero + center_prior.mean.sum() * 0 + center_prior.sigma.sum() * 0
        loss_pos = loss_center = connected_zero
    return {"loss_pos": loss_pos, "loss_neg": loss_neg, "loss_center": loss_center}
