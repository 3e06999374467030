"""FCOS, the baseline AutoAssign is measured against, as a detector of this project.

``model.kind: fcos`` builds :class:`FCOSDetector`: torchvision's FCOS head
(:class:`torchvision.models.detection.fcos.FCOSHead`), its label assignment (center sampling
within 1.5 strides of a box centre, each FPN level responsible for one range of box sizes)
and its losses (sigmoid focal loss, GIoU loss, centerness binary cross-entropy) and its
post-processing, all used as torchvision wrote them, on the project's own ResNet backbone and
FPN. Input normalisation and padding are AutoAssign's own, so both models see the same batch.

Everything around the model is shared with AutoAssign: the loader, the optimizer and schedule,
checkpoints (the config inside says which model a checkpoint holds), evaluation, prediction
and the model registry.

What of ``model`` FCOS uses: ``backbone``, ``fpn_channels``, ``head.num_convs``, ``inference``
(``score_threshold`` applies to FCOS's score ``sqrt(class probability * centerness)``,
``pre_nms_top_k`` per level, ``nms_iou``, ``max_detections``), ``input`` and ``checkpoint``.
What it ignores: ``center_prior``, ``loss`` (FCOS's loss terms are not weighted) and
``head.prior_prob`` / ``head.reg_bias_init`` (torchvision initialises its head itself: class
bias for a probability of 0.01, box and centerness biases 0). The head's GroupNorm has 32
groups, as AutoAssign's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead

from autoassign.config import ModelConfig
from autoassign.model.backbone import ResNetBackbone
from autoassign.model.detector import AutoAssign, pixel_statistics, rescale_detections
from autoassign.model.fpn import FPN

__all__ = ["FCOSDetector", "FCOS_LOSS_TERMS", "build_fcos"]

FCOS_LOSS_TERMS = ("loss_classification", "loss_bbox_regression", "loss_bbox_ctrness")
"""torchvision's three FCOS losses (``classification``, ``bbox_regression``, ``bbox_ctrness``)
under the project's ``loss_`` prefix; each is a sum over the batch's positive locations (all
locations for classification) divided by the number of positives."""


class FCOSDetector(nn.Module):
    """FCOS (Tian et al., 2019) on the project's backbone and FPN, called like
    :class:`~autoassign.model.detector.AutoAssign`.

    ``forward(images, targets=None, image_sizes=None, original_sizes=None)``:

    - ``images``: a list of ``[3, H_i, W_i]`` RGB tensors with values 0..255, or a padded
      batch ``[B, 3, Hp, Wp]`` with ``image_sizes`` giving each image's (h, w) before padding.
    - training: ``targets[i]`` has ``boxes`` ``[N, 4]`` float ``x1, y1, x2, y2`` in input
      pixels and ``labels`` ``[N]`` int64 (0-based); returns :data:`FCOS_LOSS_TERMS`
      (scalars).
    - eval: per image ``{"boxes": [K, 4], "scores": [K], "labels": [K] int64}`` in input
      pixels, or in ``original_sizes[i]`` = (h, w) pixels when given.

    The locations are torchvision's: one per feature-map cell ``(x * stride, y * stride)``,
    an "anchor" of side ``stride`` whose size sets the level's range of box sizes. They are
    laid out with the FPN's own strides (8 to 128), which torchvision's FCOS would infer from
    the padded image size instead (off for P6 and P7 unless that is a multiple of 128).

    Args:
        backbone, fpn: the project's modules, built as for AutoAssign.
        num_classes: C, without a background class.
        num_convs: conv + GroupNorm + ReLU blocks in each of the head's two towers.
        style: the backbone's input style, ``"caffe"`` or ``"pytorch"`` (see
            :class:`~autoassign.config.BackboneConfig`).
        size_divisor: the padded batch's sides are multiples of it.
        center_sampling_radius: a location is a positive of a box within this many strides of
            the box centre (torchvision's and the FCOS paper's 1.5).
        score_threshold, pre_nms_top_k, nms_iou, max_detections: inference settings.
    """

    loss_terms = FCOS_LOSS_TERMS
    """The keys of the training loss dict (the engine sums and logs them)."""
    loss_all_reduces = False
    """The loss is normalised by this process's positives: under DDP its forward pass takes
    part in no collective (AutoAssign's all-reduces its normalisers)."""

    # AutoAssign's input handling as it is (it reads pixel_mean, pixel_std, bgr, size_divisor
    # and backbone), so that both models are given exactly the same batch.
    _normalize = AutoAssign._normalize
    preprocess = AutoAssign.preprocess

    # torchvision's FCOS rules as they are: the assignment and the losses (compute_loss, which
    # calls self.head.compute_loss) and decoding, top-k and NMS (postprocess_detections). They
    # read the attributes set in __init__: head, center_sampling_radius, box_coder,
    # score_thresh, topk_candidates, nms_thresh and detections_per_img.
    compute_loss = FCOS.compute_loss
    postprocess_detections = FCOS.postprocess_detections

    def __init__(
        self,
        *,
        backbone: ResNetBackbone,
        fpn: FPN,
        num_classes: int,
        num_convs: int = 4,
        style: str = "caffe",
        size_divisor: int = 32,
        center_sampling_radius: float = 1.5,
        score_threshold: float = 0.05,
        pre_nms_top_k: int = 1000,
        nms_iou: float = 0.6,
        max_detections: int = 100,
    ):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.head = FCOSHead(fpn.out_channels, 1, num_classes, num_convs=num_convs)
        self.box_coder = self.head.box_coder
        self.strides = list(fpn.strides)
        self.anchor_generator = AnchorGenerator(
            tuple((stride,) for stride in self.strides), ((1.0,),) * len(self.strides)
        )
        self.center_sampling_radius = center_sampling_radius
        self.score_thresh = score_threshold
        self.topk_candidates = pre_nms_top_k
        self.nms_thresh = nms_iou
        self.detections_per_img = max_detections

        self.size_divisor = size_divisor
        self.bgr = style == "caffe"
        mean, std = pixel_statistics(style)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def locations(self, features: list[Tensor]) -> list[Tensor]:
        """Per FPN level ``[H_l * W_l, 4]`` float32 "anchors" ``x1, y1, x2, y2`` in input
        pixels: side ``stride``, centred on ``(x * stride, y * stride)``, row-major."""
        device = features[0].device
        self.anchor_generator.set_cell_anchors(torch.float32, device)
        grid_sizes = [list(feature.shape[-2:]) for feature in features]
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        return self.anchor_generator.grid_anchors(grid_sizes, strides)

    def forward(
        self,
        images: list[Tensor] | Tensor,
        targets: list[dict[str, Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        batch, image_sizes = self.preprocess(images, image_sizes)
        features = self.fpn(self.backbone(batch))  # five [B, C, H_l, W_l], strides 8..128
        # cls_logits [B, N, C], bbox_regression [B, N, 4], bbox_ctrness [B, N, 1] over the
        # N = sum of H_l * W_l locations, level by level.
        head_outputs = {name: value.float() for name, value in self.head(features).items()}
        per_level = self.locations(features)
        counts = [len(level) for level in per_level]

        if self.training:
            if targets is None:
                raise ValueError("FCOS in training mode needs targets (boxes and labels)")
            device = batch.device
            targets = [
                {
                    "boxes": t["boxes"].to(device, torch.float32).reshape(-1, 4),
                    "labels": t["labels"].to(device, torch.int64).reshape(-1),
                }
                for t in targets
            ]
            anchors = [torch.cat(per_level)] * len(image_sizes)
            losses = self.compute_loss(targets, head_outputs, anchors, counts)
            return {f"loss_{name}": value for name, value in losses.items()}

        split = {name: list(value.split(counts, dim=1)) for name, value in head_outputs.items()}
        with torch.no_grad():
            detections = self.postprocess_detections(split, [per_level] * len(image_sizes),
                                                     image_sizes)  # fmt: skip
        if original_sizes is not None:
            detections = [
                rescale_detections(d, input_size, original_size)
                for d, input_size, original_size in zip(detections, image_sizes, original_sizes)
            ]
        return detections


def build_fcos(cfg: ModelConfig, backbone: ResNetBackbone, fpn: FPN) -> FCOSDetector:
    """The FCOS of ``cfg`` (``kind: fcos``) on an already built backbone and FPN (see
    :func:`autoassign.model.build_detector`, the one way to build a detector)."""
    inference = cfg.inference
    return FCOSDetector(
        backbone=backbone,
        fpn=fpn,
        num_classes=cfg.num_classes,
        num_convs=cfg.head.num_convs,
        style=cfg.backbone.style,
        size_divisor=cfg.input.size_divisor,
        score_threshold=inference.score_threshold,
        pre_nms_top_k=inference.pre_nms_top_k,
        nms_iou=inference.nms_iou,
        max_detections=inference.max_detections,
    )
