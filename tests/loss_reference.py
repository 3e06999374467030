"""A plain dense per-image AutoAssign loss, written straight from the specification.

It builds every ``[P, G]`` pairwise tensor of each image and loops over images and boxes,
so it is slow and memory-hungry with many boxes. It exists as the obviously-correct peer of
:func:`autoassign.model.loss.autoassign_loss` for the unit tests and the benchmark; training
uses the sparse implementation. It runs in one process (no averaging across workers).

Ties in ``force_topk`` are broken towards the lower point index (a stable sort), as in
the sparse implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from autoassign.model.center_prior import CenterPrior
from autoassign.model.points import level_points

EPS = 1e-12
BOX_EPS = 1e-6


def _pairwise_iou_giou(pred: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """``pred [P, 4]`` against ``boxes [G, 4]`` -> IoU and GIoU, each ``[P, G]``."""
    pred = pred[:, None, :]
    boxes = boxes[None, :, :]
    area_pred = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_box = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    inter_w = torch.min(pred[..., 2], boxes[..., 2]) - torch.max(pred[..., 0], boxes[..., 0])
    inter_h = torch.min(pred[..., 3], boxes[..., 3]) - torch.max(pred[..., 1], boxes[..., 1])
    overlap = inter_w.clamp(min=0) * inter_h.clamp(min=0)
    union = (area_pred + area_box - overlap).clamp(min=BOX_EPS)
    iou = overlap / union
    encl_w = torch.max(pred[..., 2], boxes[..., 2]) - torch.min(pred[..., 0], boxes[..., 0])
    encl_h = torch.max(pred[..., 3], boxes[..., 3]) - torch.min(pred[..., 1], boxes[..., 1])
    enclose = (encl_w.clamp(min=0) * encl_h.clamp(min=0)).clamp(min=BOX_EPS)
    return iou, iou - (enclose - union) / enclose


def _to_images(per_level: list[Tensor]) -> Tensor:
    """``[B, K, H_l, W_l]`` per level -> ``[B, P, K]``."""
    return torch.cat(
        [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]) for x in per_level], 1
    )


def dense_autoassign_loss(
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
    """Same contract as :func:`autoassign.model.loss.autoassign_loss`, computed densely."""
    dtype, device = cls_logits[0].dtype, cls_logits[0].device
    points = torch.cat(
        [
            level_points(x.shape[2], x.shape[3], s, device, dtype)
            for x, s in zip(cls_logits, strides)
        ]
    )  # [P, 2]
    point_stride = torch.cat(
        [
            torch.full((x.shape[2] * x.shape[3],), float(s), dtype=dtype)
            for x, s in zip(cls_logits, strides)
        ]
    )  # [P]
    cls_all = _to_images(cls_logits).sigmoid()  # [B, P, C]
    obj_all = _to_images(objectness).sigmoid()[..., 0]  # [B, P]
    reg_all = _to_images(ltrb_distances)  # [B, P, 4]
    px, py = points[:, 0], points[:, 1]

    pos_terms, neg_terms, center_terms = [], [], []
    prior_total = torch.zeros((), dtype=dtype)
    num_gt = 0
    for image in range(cls_all.shape[0]):
        boxes = gt_boxes[image].to(dtype)
        labels = gt_labels[image]
        num_boxes = boxes.shape[0]
        num_gt += num_boxes
        joint = cls_all[image] * obj_all[image][:, None]  # [P, C]

        # inside[p, g]: all four distances to the box edges strictly positive.
        distances = torch.stack(
            [
                px[:, None] - boxes[None, :, 0],
                py[:, None] - boxes[None, :, 1],
                boxes[None, :, 2] - px[:, None],
                boxes[None, :, 3] - py[:, None],
            ],
            dim=-1,
        )  # [P, G, 4]
        inside = (
            distances.min(dim=-1).values > 0
            if num_boxes
            else distances.new_zeros((len(points), 0), dtype=torch.bool)
        )

        centre = torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), 1)
        offset = (points[:, None, :] - centre[None]) / point_stride[:, None, None]  # [P, G, 2]
        mean = center_prior.mean[labels].to(dtype)[None]  # [1, G, 2]
        sigma = center_prior.sigma[labels].to(dtype)[None]
        prior = torch.exp(-((offset - mean) ** 2) / (2 * sigma**2)).prod(dim=-1)  # [P, G]

        if force_topk > 0:
            for g in range(num_boxes):
                if not inside[:, g].any():
                    order = torch.sort(prior[:, g].detach(), descending=True, stable=True).indices
                    inside[order[:force_topk], g] = True
        if center_prior.kind == "uniform":  # the Gaussian only ranked the forced points
            prior = torch.ones_like(prior)
        prior = torch.where(inside, prior, torch.zeros_like(prior))
        prior_total = prior_total + prior.detach().sum()

        pred = torch.stack(
            (
                px - reg_all[image, :, 0],
                py - reg_all[image, :, 1],
                px + reg_all[image, :, 2],
                py + reg_all[image, :, 3],
            ),
            dim=1,
        )  # [P, 4]
        iou, giou = _pairwise_iou_giou(pred, boxes)

        # Positive loss.
        p_pos = joint[:, labels] * torch.exp(-giou_weight * (1 - giou))  # [P, G]
        conf = torch.exp(3 * p_pos) if confidence_weighting else torch.ones_like(p_pos)
        weight = conf * prior / (conf * prior).sum(dim=0, keepdim=True).clamp(min=EPS)
        box_prob = (weight * p_pos).sum(dim=0)  # [G]
        pos_terms.append(
            F.binary_cross_entropy(box_prob, torch.ones_like(box_prob), reduction="sum")
        )

        # Negative loss: the row max of the IoU over ALL boxes, then masked.
        iou = iou.detach()
        row_max = iou.max(dim=1, keepdim=True).values.expand_as(iou) if num_boxes else iou
        iou_masked = torch.where(inside, row_max, torch.zeros_like(row_max))
        neg_weight_map = torch.ones_like(joint).detach()
        for g in range(num_boxes):  # in box order: a higher box index writes last
            rows = inside[:, g].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            t = 1 / (1 - iou_masked[rows, g]).clamp(min=EPS)
            t = (t - t.min() + EPS) / (t.max() - t.min() + EPS)
            neg_weight_map[rows, labels[g]] = 1 - t
        x = joint * neg_weight_map
        neg_terms.append(
            (x**2 * F.binary_cross_entropy(x, torch.zeros_like(x), reduction="none")).sum()
        )

        # Center loss: images whose boxes have no inside point contribute a connected zero.
        if inside.any():
            center_terms.append(num_boxes / prior.sum().clamp(min=EPS))
        else:
            center_terms.append(prior.sum() * 0)

    loss_pos = pos_weight * sum(pos_terms) / max(num_gt, 1)
    loss_neg = neg_weight * sum(neg_terms) / prior_total.clamp(min=1)
    loss_center = center_weight * torch.stack(center_terms).mean()
    if num_gt == 0:
        zero = sum(x.sum() * 0 for x in [*cls_logits, *ltrb_distances, *objectness])
        zero = zero + center_prior.mean.sum() * 0 + center_prior.sigma.sum() * 0
        loss_pos, loss_center = zero, zero
    return {"loss_pos": loss_pos, "loss_neg": loss_neg, "loss_center": loss_center}
