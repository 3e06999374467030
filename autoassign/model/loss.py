"""The AutoAssign training loss, vectorised over images and sparse over (point, box) pairs.

Only pairs whose point lies strictly inside the box carry weight in AutoAssign, so instead of
the dense ``[P, G]`` tensors of each image this module enumerates the inside pairs of every
box of the batch directly from the box's range of grid cells on each level, gathers the
per-pair values and reduces them per box with ``index_add`` / ``scatter_reduce``. The results
(and their gradients) equal the dense definition in ``tests/loss_reference.py``.

The IoU row maximum of the negative loss is over ALL boxes of the image, not only those the
point is inside; it is needed only for points with at least one pair, and only boxes that
overlap a point's predicted box can raise it above 0, so it is taken over (point, box)
candidates that overlap per block of points (see ``_row_max_iou``).

Details that follow the reference implementation (mmdetection's ``AutoAssignHead``) where the
specification is silent: the ``N_gt`` normaliser is clamped below at 1 after averaging over
workers; an image whose boxes have no inside point at all (boxes smaller than a stride) adds 0
to ``loss_center`` rather than ``G / 1e-12``; a box without inside points has ``P_g = 0`` and
adds BCE's clamped 100 to ``loss_pos``.

Shapes: ``B`` images, ``C`` classes, ``P`` points over all levels, ``N`` boxes in the batch,
``K`` (point, box) pairs in the batch. Boxes are ``(x1, y1, x2, y2)`` in input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from autoassign.distributed import mean_across_ranks
from autoassign.errors import AutoAssignError
from autoassign.model.box_ops import aligned_giou, aligned_iou, ltrb_to_boxes
from autoassign.model.center_prior import CenterPrior
from autoassign.model.points import level_points

EPS = 1e-12
"""Floor of the per-box weight sums, the IoU weights and the center-loss denominator."""
BOX_EPS = 1e-6
"""Floor of unions and enclosing areas in IoU and GIoU."""
IOU_TILE = 8
"""Points of a ``IOU_TILE x IOU_TILE`` block of one level share their candidate boxes for
the IoU row maximum (boxes that overlap the union of the block's predicted boxes)."""
IOU_CHUNK_PAIRS = 1 << 20
"""Most (point, candidate box) IoU values held at once while taking the row maximum."""


class LossInputError(AutoAssignError, ValueError):
    """The loss was called with inconsistent head outputs or targets."""


@dataclass
class _Levels:
    """Geometry of the concatenated FPN levels of one batch."""

    heights: Tensor  # [L] int64
    widths: Tensor  # [L] int64
    strides: Tensor  # [L] float, input pixels per cell
    starts: Tensor  # [L] int64, index of each level's first point
    points: Tensor  # [P, 2] float (x, y) pixels

    @property
    def num_points(self) -> int:
        return self.points.shape[0]


def _make_levels(
    feature_sizes: list[tuple[int, int]], strides: list[int], device, dtype
) -> _Levels:
    counts = [h * w for h, w in feature_sizes]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    points = torch.cat(
        [level_points(h, w, s, device, dtype) for (h, w), s in zip(feature_sizes, strides)]
    )
    return _Levels(
        heights=torch.tensor([h for h, _ in feature_sizes], device=device),
        widths=torch.tensor([w for _, w in feature_sizes], device=device),
        strides=torch.tensor(strides, device=device, dtype=dtype),
        starts=torch.tensor(starts, device=device),
        points=points,
    )


def _levels_to_images(per_level: list[Tensor]) -> Tensor:
    """``[B, K, H_l, W_l]`` per level -> ``[B, P, K]`` (levels concatenated, row-major)."""
    return torch.cat(
        [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], dim=1
    )


def _check_inputs(cls_logits, bbox_preds, objectness, strides, gt_boxes, gt_labels, center_prior):
    num_levels = len(cls_logits)
    if num_levels == 0:
        raise LossInputError("autoassign_loss: cls_logits is empty (need one tensor per level)")
    for name, seq in (("bbox_preds", bbox_preds), ("objectness", objectness), ("strides", strides)):
        if len(seq) != num_levels:
            raise LossInputError(
                f"autoassign_loss: {name} has {len(seq)} levels, cls_logits has {num_levels}"
            )
    batch, num_classes = cls_logits[0].shape[:2]
    for level, (cls, reg, obj) in enumerate(zip(cls_logits, bbox_preds, objectness)):
        if cls.dim() != 4 or cls.shape[:2] != (batch, num_classes):
            raise LossInputError(
                f"autoassign_loss: cls_logits[{level}] has shape {tuple(cls.shape)}, "
                f"expected [{batch}, {num_classes}, H, W]"
            )
        height, width = cls.shape[2:]
        if tuple(reg.shape) != (batch, 4, height, width):
            raise LossInputError(
                f"autoassign_loss: bbox_preds[{level}] has shape {tuple(reg.shape)}, "
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


def _inside_pairs(boxes: Tensor, levels: _Levels) -> tuple[Tensor, Tensor]:
    """All (box, point) pairs whose point is strictly inside the box, on every level.

    Each box only looks at its own range of grid cells per level (widened by one cell on each
    side against rounding in the division), then the exact test ``x1 < px < x2``,
    ``y1 < py < y2`` is applied to the candidates.

    Returns:
        ``box_index [K]`` into ``boxes`` and ``point_index [K]`` into the level-concatenated
        points, ordered by box, then level, then row-major.
    """
    device, dtype = boxes.device, boxes.dtype
    num_levels = levels.strides.shape[0]
    strides = levels.strides[None, :]  # [1, L]
    widths, heights = levels.widths.to(dtype)[None], levels.heights.to(dtype)[None]
    col_lo = torch.floor(boxes[:, 0:1] / strides).clamp(min=0).minimum(widths).long()  # [N, L]
    col_hi = torch.ceil(boxes[:, 2:3] / strides).minimum(widths - 1).clamp(min=-1).long()
    row_lo = torch.floor(boxes[:, 1:2] / strides).clamp(min=0).minimum(heights).long()
    row_hi = torch.ceil(boxes[:, 3:4] / strides).minimum(heights - 1).clamp(min=-1).long()
    num_cols = (col_hi - col_lo + 1).clamp(min=0)
    num_rows = (row_hi - row_lo + 1).clamp(min=0)
    counts = (num_cols * num_rows).reshape(-1)  # [N * L] candidates per (box, level)
    total = int(counts.sum())

    segment = torch.repeat_interleave(
        torch.arange(counts.shape[0], device=device), counts, output_size=total
    )  # [K0] (box, level) of each candidate
    offset = torch.arange(total, device=device) - (counts.cumsum(0) - counts)[segment]
    seg_cols = num_cols.reshape(-1)[segment]
    col = col_lo.reshape(-1)[segment] + offset % seg_cols
    row = row_lo.reshape(-1)[segment] + torch.div(offset, seg_cols, rounding_mode="floor")
    box = torch.div(segment, num_levels, rounding_mode="floor")
    level = segment % num_levels

    stride = levels.strides[level]
    px, py = col.to(dtype) * stride, row.to(dtype) * stride
    box_xyxy = boxes[box]  # [K0, 4]
    keep = (
        (px > box_xyxy[:, 0])
        & (px < box_xyxy[:, 2])
        & (py > box_xyxy[:, 1])
        & (py < box_xyxy[:, 3])
    )
    point = levels.starts[level] + row * levels.widths[level] + col
    return box[keep], point[keep]


@torch.no_grad()
def _forced_pairs(
    boxes: Tensor,
    labels: Tensor,
    box_ids: Tensor,
    levels: _Levels,
    center_prior: CenterPrior,
    k: int,
) -> tuple[Tensor, Tensor]:
    """The ``k`` highest-prior points (over all levels) of each box in ``box_ids``.

    On one level the prior is a product of a function of the column and one of the row, each
    peaking at the cell nearest ``centre / stride + mean``; so that level's ``k`` best points
    lie within ``k`` cells of the (clamped) peak, and searching that window on every level
    finds the same points as a search over all ``P``. Ties go to the lower point index.

    Returns:
        ``box_index [M * k]`` and ``point_index [M * k]``.
    """
    device, dtype = boxes.device, boxes.dtype
    num_levels = levels.strides.shape[0]
    steps = torch.arange(-k, k + 1, device=device)  # [R], R = 2k + 1
    window = steps.shape[0]
    selected = boxes[box_ids]
    centre = (selected[:, :2] + selected[:, 2:]) / 2  # [M, 2]
    mean = center_prior.mean[labels[box_ids]].to(dtype)  # [M, 2]
    strides = levels.strides[None, :, None]  # [1, L, 1]
    peak = centre[:, None, :] / strides + mean[:, None, :]  # [M, L, 2] in cells
    limit = torch.stack((levels.widths, levels.heights), dim=1).to(dtype) - 1  # [L, 2]
    nearest = torch.round(peak).clamp(min=0).minimum(limit[None]).long()  # [M, L, 2]
    cols = nearest[..., 0, None] + steps  # [M, L, R]
    rows = nearest[..., 1, None] + steps  # [M, L, R]
    valid = ((cols >= 0) & (cols < levels.widths[None, :, None]))[:, :, None, :] & (
        (rows >= 0) & (rows < levels.heights[None, :, None])
    )[:, :, :, None]  # [M, L, R(rows), R(cols)]

    px = cols.to(dtype) * strides  # [M, L, R]
    py = rows.to(dtype) * strides
    offsets = torch.stack(
        torch.broadcast_tensors(
            ((px - centre[:, 0, None, None]) / strides)[:, :, None, :],
            ((py - centre[:, 1, None, None]) / strides)[:, :, :, None],
        ),
        dim=-1,
    )  # [M, L, R, R, 2]
    prior_labels = labels[box_ids][:, None, None, None].expand(offsets.shape[:-1])
    prior = center_prior(offsets, prior_labels)
    prior = torch.where(valid, prior, torch.full_like(prior, -1.0))
    # Flattened (level, row, col) order is the point order, so a stable sort breaks ties
    # towards the lower point index.
    order = torch.sort(prior.reshape(len(box_ids), -1), dim=1, descending=True, stable=True).indices
    best = order[:, :k]  # [M, k]
    chosen_valid = valid.reshape(len(box_ids), -1).gather(1, best)
    level = torch.div(best, window * window, rounding_mode="floor")
    cell = best % (window * window)
    row = rows.gather(
        2, torch.div(cell, window, rounding_mode="floor")[:, None, :].expand(-1, num_levels, -1)
    )
    col = cols.gather(2, (cell % window)[:, None, :].expand(-1, num_levels, -1))
    row = row.gather(1, level[:, None, :]).squeeze(1)  # [M, k]
    col = col.gather(1, level[:, None, :]).squeeze(1)
    point = levels.starts[level] + row * levels.widths[level] + col
    box = box_ids[:, None].expand_as(point)
    return box[chosen_valid], point[chosen_valid]


@torch.no_grad()
def _row_max_iou(
    point_ids: Tensor,
    pred_boxes: Tensor,
    boxes: Tensor,
    box_start: Tensor,
    box_count: Tensor,
    levels: _Levels,
) -> Tensor:
    """Max over ALL boxes of its image of the IoU of each point's predicted box.

    Only boxes overlapping a predicted box can give it an IoU above 0, so points are grouped
    in ``IOU_TILE``-cell blocks per level, each block keeps the boxes that overlap the union
    of its predicted boxes, and IoUs are computed for those (point, box) pairs only.

    Args:
        point_ids: ``[U]`` unique flat point ids ``image * P + point``.
        pred_boxes: ``[U, 4]`` their predicted boxes.
        boxes: ``[N, 4]`` boxes of the batch, grouped by image.
        box_start, box_count: ``[B]`` first box and number of boxes of each image.

    Returns:
        ``[U]`` row maximum (0 where no box overlaps).
    """
    device = point_ids.device
    num_points = levels.num_points
    image = torch.div(point_ids, num_points, rounding_mode="floor")
    point = point_ids % num_points
    level = torch.bucketize(point, levels.starts, right=True) - 1
    local = point - levels.starts[level]
    width = levels.widths[level]
    row, col = torch.div(local, width, rounding_mode="floor"), local % width
    tiles_per_row = torch.div(width + IOU_TILE - 1, IOU_TILE, rounding_mode="floor")
    tile = levels.starts[level] + torch.div(row, IOU_TILE, rounding_mode="floor") * tiles_per_row
    tile = tile + torch.div(col, IOU_TILE, rounding_mode="floor")
    group_keys, group = torch.unique(image * num_points + tile, return_inverse=True)
    num_groups = group_keys.shape[0]
    group_image = torch.div(group_keys, num_points, rounding_mode="floor")

    # Union of the predicted boxes of each group: [NG, 4].
    region = pred_boxes.new_empty((num_groups, 4))
    for axis, reduce in ((0, "amin"), (1, "amin"), (2, "amax"), (3, "amax")):
        region[:, axis] = pred_boxes.new_zeros(num_groups).scatter_reduce(
            0, group, pred_boxes[:, axis], reduce, include_self=False
        )

    # Candidate boxes per group, as a CSR list sorted by group.
    max_boxes = int(box_count.max())
    slot = torch.arange(max_boxes, device=device)
    candidate = box_start[group_image, None] + slot  # [NG, Gmax]
    in_image = slot[None, :] < box_count[group_image, None]
    cand_xyxy = boxes[candidate.clamp(max=boxes.shape[0] - 1)]  # [NG, Gmax, 4]
    overlaps = (
        in_image
        & (cand_xyxy[..., 0] < region[:, None, 2])
        & (cand_xyxy[..., 2] > region[:, None, 0])
        & (cand_xyxy[..., 1] < region[:, None, 3])
        & (cand_xyxy[..., 3] > region[:, None, 1])
    )
    del cand_xyxy
    group_of_candidate, slot_of_candidate = overlaps.nonzero(as_tuple=True)
    candidate_box = box_start[group_image[group_of_candidate]] + slot_of_candidate
    group_count = torch.bincount(group_of_candidate, minlength=num_groups)
    group_offset = group_count.cumsum(0) - group_count

    # (point, candidate) pairs in chunks of about IOU_CHUNK_PAIRS.
    pair_count = group_count[group]  # [U]
    pair_end = pair_count.cumsum(0)
    total = int(pair_end[-1]) if pair_end.numel() else 0
    num_chunks = max(1, -(-total // IOU_CHUNK_PAIRS))
    bounds = torch.searchsorted(
        pair_end, torch.arange(1, num_chunks, device=device) * IOU_CHUNK_PAIRS
    ).tolist()
    row_max = pred_boxes.new_zeros(point_ids.shape[0])
    for first, last in zip([0, *bounds], [*bounds, point_ids.shape[0]]):
        if last <= first:
            continue
        counts = pair_count[first:last]
        chunk_total = int(counts.sum())
        owner = torch.repeat_interleave(
            torch.arange(first, last, device=device), counts, output_size=chunk_total
        )
        offset = (
            torch.arange(chunk_total, device=device) - (counts.cumsum(0) - counts)[owner - first]
        )
        box = candidate_box[group_offset[group[owner]] + offset]
        iou = aligned_iou(pred_boxes[owner], boxes[box], eps=BOX_EPS)
        row_max.scatter_reduce_(0, owner, iou, "amax", include_self=True)
    return row_max


def _unique_ids(ids: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for ids in ``0..size-1``, without a sort."""
    present = torch.zeros(size, dtype=torch.bool, device=ids.device)
    present[ids] = True
    position = present.cumsum(0) - 1  # [size] rank of each present id
    return present.nonzero().squeeze(1), position[ids]


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
    bbox_preds: list[Tensor],
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
) -> dict[str, Tensor]:
    """AutoAssign's positive, negative and center losses for one batch.

    Args:
        cls_logits: per level ``[B, C, H_l, W_l]`` class logits.
        bbox_preds: per level ``[B, 4, H_l, W_l]`` left, top, right, bottom distances in input
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

    Returns:
        ``{"loss_pos", "loss_neg", "loss_center"}`` scalar tensors. A batch without boxes gives
        zero ``loss_pos`` and ``loss_center`` that are still connected to every head output and
        to the prior's ``mean`` and ``sigma`` (so data-parallel gradients stay in step).
        Float16/bfloat16 head outputs are computed in float32, with autocast off.

    Raises:
        LossInputError: shapes that do not match, labels outside ``0..C-1``, boxes with
            ``x2 < x1`` or ``y2 < y1``.
    """
    _check_inputs(cls_logits, bbox_preds, objectness, strides, gt_boxes, gt_labels, center_prior)
    dtype = cls_logits[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # mixed precision: the exponentials, GIoU and BCE need float32
    cls_logits, bbox_preds, objectness = (
        [x.to(dtype) for x in group] for group in (cls_logits, bbox_preds, objectness)
    )
    with torch.autocast(cls_logits[0].device.type, enabled=False):
        return _loss(
            cls_logits,
            bbox_preds,
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
        )


def _pairs(
    boxes: Tensor, labels: Tensor, levels: _Levels, center_prior: CenterPrior, force_topk: int
) -> tuple[Tensor, Tensor]:
    """``box_index [K]`` and ``point_index [K]`` of the assignment pairs: the inside pairs,
    plus the forced top-k points of boxes without any when ``force_topk > 0``."""
    pair_box, pair_point = _inside_pairs(boxes, levels)
    if force_topk > 0:
        has_pair = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        has_pair[pair_box] = True
        missing = (~has_pair).nonzero().squeeze(1)
        if missing.numel():
            forced_box, forced_point = _forced_pairs(
                boxes, labels, missing, levels, center_prior, force_topk
            )
            pair_box = torch.cat((pair_box, forced_box))
            pair_point = torch.cat((pair_point, forced_point))
    return pair_box, pair_point


def _loss(
    cls_logits,
    bbox_preds,
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
) -> dict[str, Tensor]:
    device, dtype = cls_logits[0].device, cls_logits[0].dtype
    batch, num_classes = cls_logits[0].shape[:2]
    levels = _make_levels([tuple(x.shape[2:]) for x in cls_logits], list(strides), device, dtype)
    num_points = levels.num_points

    cls_prob = _levels_to_images(cls_logits).sigmoid()  # [B, P, C]
    obj_prob = _levels_to_images(objectness).sigmoid()  # [B, P, 1]
    joint = (cls_prob * obj_prob).reshape(-1)  # [B * P * C]
    distances = _levels_to_images(bbox_preds).reshape(-1, 4)  # [B * P, 4]

    box_count = torch.tensor([len(b) for b in gt_boxes], device=device)  # [B]
    boxes = torch.cat([b.to(device=device, dtype=dtype) for b in gt_boxes])  # [N, 4]
    labels = torch.cat([lab.to(device=device, dtype=torch.long) for lab in gt_labels])  # [N]
    box_image = torch.repeat_interleave(torch.arange(batch, device=device), box_count)  # [N]
    box_start = box_count.cumsum(0) - box_count
    num_boxes = boxes.shape[0]

    neg_weights = torch.ones_like(joint, requires_grad=False)
    prior_total = torch.zeros((), device=device, dtype=dtype)
    if num_boxes > 0:
        pair_box, pair_point = _pairs(boxes, labels, levels, center_prior, force_topk)
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
        weighted = torch.exp(3 * p_pos) * prior
        weight_sum = weighted.new_zeros(num_boxes).index_add(0, pair_box, weighted)
        box_prob = weighted.new_zeros(num_boxes).index_add(0, pair_box, weighted * p_pos)
        box_prob = box_prob / weight_sum.clamp(min=EPS)  # [N]
        pos_sum = F.binary_cross_entropy(box_prob, torch.ones_like(box_prob), reduction="sum")

        if flat_point.numel():
            unique_points, pair_to_unique = _unique_ids(flat_point, batch * num_points)
            unique_pred = ltrb_to_boxes(
                levels.points[unique_points % num_points], distances.detach()[unique_points]
            )
            row_max = _row_max_iou(unique_points, unique_pred, boxes, box_start, box_count, levels)
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
        connected_zero = sum(t.sum() * 0 for t in [*cls_logits, *bbox_preds, *objectness])
        connected_zero = connected_zero + center_prior.mean.sum() * 0 + center_prior.sigma.sum() * 0
        loss_pos = loss_center = connected_zero
    return {"loss_pos": loss_pos, "loss_neg": loss_neg, "loss_center": loss_center}
