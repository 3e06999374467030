"""The AutoAssign detector: input normalisation and padding, backbone, FPN, head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoassign.config import ModelConfig
from autoassign.data.transforms import padded_size
from autoassign.model.backbone import ResNetBackbone, build_resnet
from autoassign.model.fpn import FPN
from autoassign.model.head import AutoAssignHead
from autoassign.model.weights import load_backbone_weights, load_detector_checkpoint

__all__ = ["AutoAssign", "build_autoassign", "build_detector", "CAFFE_PIXEL_MEAN_BGR"]

CAFFE_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
"""Per-channel means (B, G, R) subtracted from 0..255 BGR input for caffe-style backbones."""
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


def pixel_statistics(style: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel, on the 0..255 scale, that a backbone of ``style`` was
    trained with: caffe's BGR means and unit std, or torchvision's ImageNet RGB mean and std."""
    if style == "caffe":
        return CAFFE_PIXEL_MEAN_BGR, (1.0, 1.0, 1.0)
    if style == "pytorch":
        mean = tuple(255.0 * m for m in IMAGENET_MEAN_RGB)
        return mean, tuple(255.0 * s for s in IMAGENET_STD_RGB)
    raise ValueError(f"unknown input style {style!r}; expected 'caffe' or 'pytorch'")


class AutoAssign(nn.Module):
    """AutoAssign (Zhu et al., 2020): a ResNet-FPN dense detector with learned assignment.

    The model owns input normalisation (``style="caffe"``: BGR minus the caffe means;
    ``"pytorch"``: RGB / 255, ImageNet mean and std) and zero-pads the normalised batch at the
    bottom and right to a multiple of ``size_divisor``. It does not resize.

    ``forward(images, targets=None, image_sizes=None, original_sizes=None)``:

    - ``images``: a list of ``[3, H_i, W_i]`` RGB tensors with values 0..255 (uint8 or float),
      or a padded batch ``[B, 3, Hp, Wp]`` (zero-padded bottom/right) with ``image_sizes``
      giving each image's (h, w) before padding.
    - training: ``targets[i]`` has ``boxes`` ``[N, 4]`` float ``x1, y1, x2, y2`` with
      ``0 <= x1 < x2 <= W`` in input pixels and ``labels`` ``[N]`` int64 (0-based);
      returns ``{"loss_pos", "loss_neg", "loss_center"}`` (scalars).
    - eval: per image ``{"boxes": [K, 4], "scores": [K], "labels": [K] int64}`` in input
      pixels, or in ``original_sizes[i]`` = (h, w) pixels when given.
    """

    loss_terms = ("loss_pos", "loss_neg", "loss_center")
    """The keys of the training loss dict (the engine sums and logs them)."""
    loss_all_reduces = True
    """Under DDP the loss all-reduces its normalisers (see :mod:`autoassign.model.loss`)."""

    def __init__(
        self,
        *,
        backbone: ResNetBackbone,
        fpn: FPN,
        head: AutoAssignHead,
        style: str = "caffe",
        size_divisor: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = head
        self.size_divisor = size_divisor
        self.bgr = style == "caffe"
        mean, std = pixel_statistics(style)
        # Not persistent: normalisation is a property of the style, not a checkpoint value.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _normalize(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` 0..255 RGB -> normalised float in the backbone's channel order."""
        images = images.to(self.pixel_mean.device, torch.float32)
        if self.bgr:
            images = images.flip(1)
        return (images - self.pixel_mean) / self.pixel_std

    def preprocess(
        self, images: list[Tensor] | Tensor, image_sizes: list[tuple[int, int]] | None = None
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """Normalised batch ``[B, 3, Hp, Wp]`` (Hp, Wp multiples of ``size_divisor``, zeros
        in the padding) and each image's (h, w) before padding."""
        if isinstance(images, Tensor) and images.dim() == 4:
            batch = self._normalize(images)
            full = (images.shape[-2], images.shape[-1])
            if image_sizes is None:
                image_sizes = [full] * images.shape[0]
            image_sizes = [(int(h), int(w)) for h, w in image_sizes]
            if any(size != full for size in image_sizes):
                rows = torch.arange(full[0], device=batch.device)
                cols = torch.arange(full[1], device=batch.device)
                sizes = torch.as_tensor(image_sizes, device=batch.device)
                inside = (rows[None, :, None] < sizes[:, 0, None, None]) & (
                    cols[None, None, :] < sizes[:, 1, None, None]
                )  # [B, Hp, Wp]
                batch = batch * inside[:, None]
            padded_h, padded_w = padded_size(*full, self.size_divisor)
            batch = F.pad(batch, (0, padded_w - full[1], 0, padded_h - full[0]))
        else:
            image_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
            padded_h, padded_w = padded_size(
                max(h for h, _ in image_sizes), max(w for _, w in image_sizes), self.size_divisor
            )
            batch = self.pixel_mean.new_zeros((len(images), 3, padded_h, padded_w))
            for i, image in enumerate(images):
                h, w = image_sizes[i]
                batch[i, :, :h, :w] = self._normalize(image[None])[0]
        if self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, image_sizes

    def forward(
        self,
        images: list[Tensor] | Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch, image_sizes = self.preprocess(images, image_sizes)
        features = self.fpn(self.backbone(batch))
        cls_logits, ltrb_distances, objectness_logits = self.head(features)

        if self.training:
            if targets is None:
                raise ValueError("AutoAssign in training mode needs targets (boxes and labels)")
            device = batch.device
            gt_boxes = [t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets]
            gt_labels = [t["labels"].to(device, torch.int64).reshape(-1) for t in targets]
            return self.head.loss(
                cls_logits, ltrb_distances, objectness_logits, gt_boxes, gt_labels
            )

        detections = self.head.predict(cls_logits, ltrb_distances, objectness_logits, image_sizes)
        if original_sizes is not None:
            detections = [
                rescale_detections(d, input_size, original_size)
                for d, input_size, original_size in zip(detections, image_sizes, original_sizes)
            ]
        return detections


def rescale_detections(
    detections: dict[str, Tensor], input_size: tuple[int, int], original_size: tuple[int, int]
) -> dict[str, Tensor]:
    """Map boxes from the input frame (h, w) to the original image (h, w), clipped to it."""
    (in_h, in_w), (out_h, out_w) = input_size, original_size
    boxes = detections["boxes"]
    factors = boxes.new_tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h])
    limits = boxes.new_tensor([out_w, out_h, out_w, out_h])
    boxes = torch.minimum((boxes * factors).clamp(min=0), limits)
    return {**detections, "boxes": boxes}


def build_detector(cfg: ModelConfig) -> nn.Module:
    """The detector ``cfg.kind`` names, from a ``ModelConfig``: AutoAssign, or the FCOS
    baseline (:class:`~autoassign.model.fcos.FCOSDetector`) on the same backbone and FPN,
    built and initialised the same way. Both are called alike (see :class:`AutoAssign`).
    Loads ``cfg.backbone.weights`` (ImageNet) and then ``cfg.checkpoint`` (whole detector,
    ours or mmdetection naming) when set. Named ImageNet weights (``msra:R-50``) are fetched
    into torch hub's cache when missing (:mod:`autoassign.model.pretrained`)."""
    backbone = build_resnet(
        depth=cfg.backbone.depth,
        style=cfg.backbone.style,
        norm=cfg.backbone.norm,
        frozen_stages=cfg.backbone.frozen_stages,
    )
    if cfg.backbone.weights is not None:
        load_backbone_weights(backbone, cfg.backbone.weights)
    fpn = FPN(in_channels=backbone.out_channels, out_channels=cfg.fpn_channels)
    if cfg.kind == "fcos":
        from autoassign.model.fcos import build_fcos  # fcos imports this module

        model: nn.Module = build_fcos(cfg, backbone, fpn)
    else:
        model = build_autoassign(cfg, backbone, fpn)
    if cfg.checkpoint is not None:
        load_detector_checkpoint(model, cfg.checkpoint)
    return model


def build_autoassign(cfg: ModelConfig, backbone: ResNetBackbone, fpn: FPN) -> AutoAssign:
    """The AutoAssign head of ``cfg`` on an already built backbone and FPN (see
    :func:`build_detector`, the one way to build a detector)."""
    head = AutoAssignHead(
        in_channels=cfg.fpn_channels,
        num_classes=cfg.num_classes,
        strides=fpn.strides,
        num_convs=cfg.head.num_convs,
        prior_prob=cfg.head.prior_prob,
        reg_bias_init=cfg.head.reg_bias_init,
        mean_init=tuple(cfg.center_prior.mean_init),
        sigma_init=tuple(cfg.center_prior.sigma_init),
        force_topk=cfg.center_prior.force_topk,
        prior_kind=cfg.center_prior.kind,
        prior_learnable=cfg.center_prior.learnable,
        confidence_weighting=cfg.loss.confidence_weighting,
        pos_weight=cfg.loss.pos_weight,
        neg_weight=cfg.loss.neg_weight,
        center_weight=cfg.loss.center_weight,
        giou_weight=cfg.loss.giou_weight,
        score_threshold=cfg.inference.score_threshold,
        pre_nms_top_k=cfg.inference.pre_nms_top_k,
        nms_iou=cfg.inference.nms_iou,
        max_detections=cfg.inference.max_detections,
    )
    return AutoAssign(
        backbone=backbone,
        fpn=fpn,
        head=head,
        style=cfg.backbone.style,
        size_divisor=cfg.input.size_divisor,
    )
