"""Where a batch's boxes meet its points: the (box, point) pairs the AutoAssign loss weighs,
and the IoU row maxima its negative term needs.

Each box looks only at its own range of grid cells per FPN level, so pairs are enumerated
without the dense ``[P, G]`` tensors of each image; :mod:`autoassign.model.loss` gathers the
per-pair values and reduces them per box. Shapes as there: ``B`` images, ``P`` points over all
levels, ``N`` boxes in the batch, ``K`` pairs, ``U`` unique points; boxes ``(x1, y1, x2, y2)``
in input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from autoassign.model.box_ops import aligned_iou
from autoassign.model.center_prior import CenterPrior
from autoassign.model.points import level_points

BOX_EPS = 1e-6
"""Floor of unions and enclosing areas in IoU and GIoU."""
IOU_TILE = 8
"""Points of a ``IOU_TILE x IOU_TILE`` block of one level share their candidate boxes for
the IoU row maximum (boxes that overlap the union of the block's predicted boxes)."""
IOU_CHUNK_PAIRS = 1 << 20
"""Most (point, candidate box) IoU values held at once while taking the row maximum."""


@dataclass
class Levels:
    """Geometry of the concatenated FPN levels of one batch."""

    heights: Tensor  # [L] int64
    widths: Tensor  # [L] int64
    strides: Tensor  # [L] float, input pixels per cell
    starts: Tensor  # [L] int64, index of each level's first point
    points: Tensor  # [P, 2] float (x, y) pixels

    @property
    def num_points(self) -> int:
        return self.points.shape[0]


def make_levels(feature_sizes: list[tuple[int, int]], strides: list[int], device, dtype) -> Levels:
    counts = [h * w for h, w in feature_sizes]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    points = torch.cat(
        [level_points(h, w, s, device, dtype) for (h, w), s in zip(feature_sizes, strides)]
    )
    return Levels(
        heights=torch.tensor([h for h, _ in feature_sizes], device=device),
        widths=torch.tensor([w for _, w in feature_sizes], device=device),
        strides=torch.tensor(strides, device=device, dtype=dtype),
        starts=torch.tensor(starts, device=device),
        points=points,
    )


def levels_to_images(per_level: list[Tensor]) -> Tensor:
    """``[B, K, H_l, W_l]`` per level -> ``[B, P, K]`` (levels concatenated, row-major)."""
    return torch.cat(
        [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], dim=1
    )


def inside_pairs(boxes: Tensor, levels: Levels) -> tuple[Tensor, Tensor]:
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
def forced_pairs(
    boxes: Tensor,
    labels: Tensor,
    box_ids: Tensor,
    levels: Levels,
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
    prior = center_prior.density(offsets, prior_labels)  # uniform: rank by the Gaussian
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
def row_max_iou(
    point_ids: Tensor,
    pred_boxes: Tensor,
    boxes: Tensor,
    box_start: Tensor,
    box_count: Tensor,
    levels: Levels,
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


def unique_ids(ids: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for ids in ``0..size-1``, without a sort."""
    present = torch.zeros(size, dtype=torch.bool, device=ids.device)
    present[ids] = True
    position = present.cumsum(0) - 1  # [size] rank of each present id
    return present.nonzero().squeeze(1), position[ids]


def assignment_pairs(
    boxes: Tensor, labels: Tensor, levels: Levels, center_prior: CenterPrior, force_topk: int
) -> tuple[Tensor, Tensor]:
    """``box_index [K]`` and ``point_index [K]`` of the assignment pairs: the inside pairs,
    plus the forced top-k points of boxes without any when ``force_topk > 0``."""
    pair_box, pair_point = inside_pairs(boxes, levels)
    if force_topk > 0:
        has_pair = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        has_pair[pair_box] = True
        missing = (~has_pair).nonzero().squeeze(1)
        if missing.numel():
            forced_box, forced_point = forced_pairs(
                boxes, labels, missing, levels, center_prior, force_topk
            )
            pair_box = torch.cat((pair_box, forced_box))
            pair_point = torch.cat((pair_point, forced_point))
    return pair_box, pair_point
