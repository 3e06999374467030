"""The AutoAssign head: shared towers, class/box/objectness outputs, loss and inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from autoassign.model.box_ops import ltrb_to_boxes
from autoassign.model.center_prior import CenterPrior, PriorKind
from autoassign.model.loss import autoassign_loss
from autoassign.model.points import level_points

__all__ = ["AutoAssignHead", "Scale", "ConvNormReLU"]


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level), initialised to ``init``."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvNormReLU(nn.Module):
    """3x3 conv with bias, GroupNorm(32), ReLU: one block of a head tower."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(32, channels)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)), inplace=True)


def _output_conv(in_channels: int, out_channels: int, bias: float) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


class AutoAssignHead(nn.Module):
    """Shared head over the FPN levels.

    Args:
        in_channels: FPN channels (256).
        num_classes: C, without a background class.
        strides: stride of each FPN level (8, 16, 32, 64, 128).
        num_convs: blocks per tower.
        prior_prob: initial class probability; the cls bias is ``-log((1 - p) / p)``.
        reg_bias_init: initial bias of the box-distance conv (4.0: boxes start at 4 strides).
        mean_init, sigma_init: initial center-prior Gaussian, in strides.
        force_topk: center-prior option for boxes with no inside point (0 = off).
        prior_kind, prior_learnable: the center prior's ablation switches (see
            :class:`~autoassign.model.center_prior.CenterPrior`).
        confidence_weighting: the loss's ablation switch (see
            :func:`~autoassign.model.loss.autoassign_loss`).
        pos_weight, neg_weight, center_weight, giou_weight: loss weights.
        score_threshold, pre_nms_top_k, nms_iou, max_detections: inference settings.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        strides: list[int],
        num_convs: int = 4,
        prior_prob: float = 0.02,
        reg_bias_init: float = 4.0,
        mean_init: tuple[float, float] = (0.0, 0.0),
        sigma_init: tuple[float, float] = (1.0, 1.0),
        force_topk: int = 0,
        prior_kind: PriorKind = "gaussian",
        prior_learnable: bool = True,
        confidence_weighting: bool = True,
        pos_weight: float = 0.25,
        neg_weight: float = 0.75,
        center_weight: float = 0.75,
        giou_weight: float = 5.0,
        score_threshold: float = 0.05,
        pre_nms_top_k: int = 1000,
        nms_iou: float = 0.6,
        max_detections: int = 100,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.strides = list(strides)
        self.cls_tower = nn.Sequential(*(ConvNormReLU(in_channels) for _ in range(num_convs)))
        self.reg_tower = nn.Sequential(*(ConvNormReLU(in_channels) for _ in range(num_convs)))
        cls_bias = -math.log((1 - prior_prob) / prior_prob)
        self.cls_logits = _output_conv(in_channels, num_classes, cls_bias)
        self.bbox_reg = _output_conv(in_channels, 4, reg_bias_init)
        self.objectness = _output_conv(in_channels, 1, 0.0)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.center_prior = CenterPrior(
            num_classes, mean_init, sigma_init, kind=prior_kind, learnable=prior_learnable
        )

        self.force_topk = force_topk
        self.confidence_weighting = confidence_weighting
        self.loss_weights = {
            "pos_weight": pos_weight,
            "neg_weight": neg_weight,
            "center_weight": center_weight,
            "giou_weight": giou_weight,
        }
        self.score_threshold = score_threshold
        self.pre_nms_top_k = pre_nms_top_k
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: class logits ``[B, C, H, W]``, box distances ``[B, 4, H, W]`` (left, top,
        right, bottom in input pixels, float32, >= 0), objectness logits ``[B, 1, H, W]``."""
        cls_logits, ltrb_distances, objectness_logits = [], [], []
        for x, scale, stride in zip(features, self.scales, self.strides):
            cls_feature = self.cls_tower(x)
            reg_feature = self.reg_tower(x)
            cls_logits.append(self.cls_logits(cls_feature))
            distances = scale(self.bbox_reg(reg_feature)).float()
            ltrb_distances.append(F.relu(distances) * stride)
            objectness_logits.append(self.objectness(reg_feature))
        return cls_logits, ltrb_distances, objectness_logits

    def loss(
        self,
        cls_logits: list[Tensor],
        ltrb_distances: list[Tensor],
        objectness_logits: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
    ) -> dict[str, Tensor]:
        """``{"loss_pos", "loss_neg", "loss_center"}`` for ground truth ``gt_boxes[i]``
        ``[G_i, 4]`` (xyxy input pixels) and ``gt_labels[i]`` ``[G_i]`` (int64, 0-based)."""
        return autoassign_loss(
            cls_logits,
            ltrb_distances,
            objectness_logits,
            self.strides,
            gt_boxes,
            gt_labels,
            self.center_prior,
            force_topk=self.force_topk,
            confidence_weighting=self.confidence_weighting,
            **self.loss_weights,
        )

    @torch.no_grad()
    def predict(
        self,
        cls_logits: list[Tensor],
        ltrb_distances: list[Tensor],
        objectness_logits: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Detections per image in the input frame (boxes clipped to ``image_sizes[i]`` =
        (h, w) before padding).

        Per level: (point, class) pairs whose class probability alone is > threshold, the
        ``pre_nms_top_k`` best by that probability, boxes decoded from the training points;
        then score = cls * objectness; over levels: positive-size boxes, NMS per class, the
        ``max_detections`` best. Returns dicts with ``boxes`` [K, 4], ``scores`` [K],
        ``labels`` [K] (int64).
        """
        batch = cls_logits[0].shape[0]
        device = cls_logits[0].device
        sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=device)  # [B, 2] (h, w)
        max_xy = sizes.flip(1).repeat(1, 2)[:, None, :]  # [B, 1, 4] (w, h, w, h)

        level_boxes, level_scores, level_labels, level_valid = [], [], [], []
        for cls, reg, obj, stride in zip(
            cls_logits, ltrb_distances, objectness_logits, self.strides
        ):
            _, num_classes, height, width = cls.shape
            probs = cls.float().sigmoid().permute(0, 2, 3, 1).reshape(batch, -1)  # [B, HW*C]
            k = min(self.pre_nms_top_k, probs.shape[1])
            top_probs, top_index = probs.topk(k, dim=1)  # [B, k], sorted
            point_index = torch.div(top_index, num_classes, rounding_mode="floor")
            labels = top_index % num_classes

            distances = reg.float().permute(0, 2, 3, 1).reshape(batch, -1, 4)  # [B, HW, 4]
            distances = distances.gather(1, point_index[..., None].expand(-1, -1, 4))
            points = level_points(height, width, stride, device, torch.float32)  # [HW, 2]
            points = points[point_index]  # [B, k, 2]
            boxes = ltrb_to_boxes(points, distances)  # [B, k, 4]
            boxes = torch.minimum(boxes.clamp(min=0), max_xy)

            obj_probs = obj.float().sigmoid().reshape(batch, -1).gather(1, point_index)
            level_boxes.append(boxes)
            level_scores.append(top_probs * obj_probs)
            level_labels.append(labels)
            level_valid.append(top_probs > self.score_threshold)

        boxes = torch.cat(level_boxes, dim=1)  # [B, N, 4]
        scores = torch.cat(level_scores, dim=1)  # [B, N]
        labels = torch.cat(level_labels, dim=1)
        valid = torch.cat(level_valid, dim=1)
        valid &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

        image_index = valid.nonzero(as_tuple=True)[0]  # row-major, like boxes[valid]
        boxes, scores, labels = boxes[valid], scores[valid], labels[valid]
        # One NMS over the batch: a group per (image, class).
        keep = batched_nms(boxes, scores, image_index * self.num_classes + labels, self.nms_iou)
        keep = self._first_per_image(keep, image_index[keep], batch)
        counts = torch.bincount(image_index[keep], minlength=batch).tolist()
        return [
            {"boxes": boxes[indices], "scores": scores[indices], "labels": labels[indices]}
            for indices in keep.split(counts)
        ]

    def _first_per_image(self, keep: Tensor, image_of_keep: Tensor, batch: int) -> Tensor:
        """``keep`` (sorted by decreasing score) regrouped by image, at most
        ``max_detections`` per image, each group still by decreasing score."""
        order = torch.sort(image_of_keep, stable=True).indices
        keep, image_of_keep = keep[order], image_of_keep[order]
        counts = torch.bincount(image_of_keep, minlength=batch)
        starts = counts.cumsum(0) - counts
        rank = torch.arange(len(keep), device=keep.device) - starts[image_of_keep]
        return keep[rank < self.max_detections]
