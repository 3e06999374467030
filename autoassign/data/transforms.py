"""Per-image input transforms: decode, resize keeping aspect ratio, horizontal flip, targets.

Everything here works on one image at a time and is a pure function of its arguments, so it
runs the same in the main process and in any data-loader worker. Images are ``uint8``
``[3, H, W]`` RGB tensors with values 0..255 (the model normalises them); boxes are ``[N, 4]``
float32 ``x1, y1, x2, y2`` in continuous pixels of the image they belong to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from autoassign.data.decoding import ImageLoadError, decode_image_file
from autoassign.data.records import ImageRecord

MIN_BOX_SIDE = 1e-3
"""Training boxes narrower or shorter than this (pixels, after clipping) are dropped."""


@dataclass
class Sample:
    """One transformed image and its targets, before batching.

    Attributes:
        image: ``[3, H, W]`` uint8 RGB after resize (and flip).
        target: ``"boxes"`` ``[N, 4]`` float32 xyxy in ``image`` pixels and ``"labels"`` ``[N]``
            int64; boxes flagged ``ignore`` (crowds) are never targets and are not kept.
        index: the record's index in ``DetectionDataset.records``.
        original_size: ``(h, w)`` of the decoded file.
        flipped: whether the image (and its boxes) were mirrored left-right.
        skipped: ``(file, warning)`` of each image that could not be used and that this
            sample stands in for (the loader logs each file's warning once).
    """

    image: Tensor
    target: dict[str, Tensor]
    index: int
    original_size: tuple[int, int]
    flipped: bool
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def image_size(self) -> tuple[int, int]:
        """``(h, w)`` after resize, before any batch padding."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Tensor:
    """Decode an image file into a ``[3, H, W]`` uint8 RGB tensor, as displayed.

    Grayscale is replicated to three channels, palette images are expanded, transparency is
    composited onto white, 16-bit images are scaled to 8 bits, CMYK JPEGs are converted and
    the EXIF orientation of JPEGs is applied (:mod:`autoassign.data.decoding`).

    Raises:
        ImageLoadError: the file is missing or is not a decodable image.
    """
    return decode_image_file(path)


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)``: short side ``min_size`` unless that makes the long side exceed
    ``max_size``; the scale is ``min(min_size / short, max_size / long)`` and each side is
    rounded half up, ``int(side * scale + 0.5)``."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_image(image: Tensor, min_size: int, max_size: int) -> tuple[Tensor, tuple[float, float]]:
    """Resize ``[C, H, W]`` keeping its aspect ratio (see :func:`resized_size`).

    Bilinear with antialiasing on the uint8 tensor itself (no float round trip).

    Returns:
        the resized image and ``(scale_y, scale_x)`` = ``(new_h / h, new_w / w)``, the exact
        per-axis factors to apply to boxes.
    """
    height, width = int(image.shape[-2]), int(image.shape[-1])
    new_height, new_width = resized_size(height, width, min_size, max_size)
    resized = F.resize(
        image,
        [new_height, new_width],
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    return resized, (new_height / height, new_width / width)


def hflip_image(image: Tensor) -> Tensor:
    """Mirror ``[..., H, W]`` left-right."""
    return image.flip(-1)


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------


def scale_boxes(boxes: Tensor, scale_y: float, scale_x: float) -> Tensor:
    """Multiply x coordinates of ``[N, 4]`` xyxy boxes by ``scale_x`` and y by ``scale_y``."""
    factors = torch.tensor([scale_x, scale_y, scale_x, scale_y], dtype=boxes.dtype)
    return boxes * factors


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror ``[N, 4]`` xyxy boxes in an image ``width`` pixels wide: ``x1' = W - x2``,
    ``x2' = W - x1``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def clip_boxes(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clamp ``[N, 4]`` xyxy boxes to ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        [x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)],
        dim=-1,
    )


def non_degenerate(boxes: Tensor, min_side: float = MIN_BOX_SIDE) -> Tensor:
    """``[N]`` bool: width and height both at least ``min_side`` pixels."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)


def record_boxes(record: ImageRecord) -> tuple[Tensor, Tensor, Tensor]:
    """The record's ``boxes [N, 4]`` float32, ``labels [N]`` int64 and ``ignore [N]`` bool."""
    boxes = torch.from_numpy(np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4))
    labels = torch.from_numpy(np.asarray(record.labels, dtype=np.int64).reshape(-1))
    ignore = torch.from_numpy(np.asarray(record.ignore, dtype=bool).reshape(-1))
    if not (len(boxes) == len(labels) == len(ignore)):
        raise ImageLoadError(
            f"{record.path}: record has {len(boxes)} boxes, {len(labels)} labels and "
            f"{len(ignore)} ignore flags; they must be equal"
        )
    return boxes, labels, ignore


# --------------------------------------------------------------------------------------------
# Whole samples
# --------------------------------------------------------------------------------------------


def load_record_image(record: ImageRecord) -> Tensor:
    """Decode the record's file and check it has the size the annotations claim."""
    image = load_image(record.path)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if (height, width) != (record.height, record.width):
        turned = (height, width) == (record.width, record.height)
        hint = " (the same turned by 90 degrees; the validator says why)" if turned else ""
        raise ImageLoadError(
            f"{record.path}: decoded image is {width}x{height} (w x h) but its annotation "
            f"record says {record.width}x{record.height}{hint}"
        )
    return image


def train_sample(
    record: ImageRecord, index: int, *, min_size: int, max_size: int, flip: bool
) -> Sample:
    """Decode, resize, optionally flip, and build the training targets of one record.

    Boxes flagged ``ignore`` are left out (the loss has no ignore regions, as in the
    reference). The others are clipped to the resized image, then boxes with a side under
    :data:`MIN_BOX_SIDE` pixels are dropped.
    """
    image = load_record_image(record)
    original_size = (int(image.shape[-2]), int(image.shape[-1]))
    image, (scale_y, scale_x) = resize_image(image, min_size, max_size)
    height, width = int(image.shape[-2]), int(image.shape[-1])

    boxes, labels, ignore = record_boxes(record)
    boxes = scale_boxes(boxes, scale_y, scale_x)
    if flip:
        image = hflip_image(image)
        boxes = hflip_boxes(boxes, width)
    boxes = clip_boxes(boxes, height, width)
    keep = non_degenerate(boxes)
    target = {"boxes": boxes[keep & ~ignore], "labels": labels[keep & ~ignore]}
    return Sample(image, target, index, original_size, flip)


def eval_sample(
    record: ImageRecord, index: int, *, min_size: int, max_size: int, image: Tensor | None = None
) -> Sample:
    """Decode and resize one record for inference; never flipped.

    Boxes are only scaled into the resized frame (no clipping, nothing dropped): evaluators
    read ground truth from the records, these targets are for inspection only. ``image``
    (``[3, record.height, record.width]`` uint8) is used instead of decoding the file.
    """
    if image is None:
        image = load_record_image(record)
    original_size = (int(image.shape[-2]), int(image.shape[-1]))
    image, (scale_y, scale_x) = resize_image(image, min_size, max_size)
    boxes, labels, ignore = record_boxes(record)
    boxes = scale_boxes(boxes, scale_y, scale_x)
    target = {"boxes": boxes[~ignore], "labels": labels[~ignore]}
    return Sample(image, target, index, original_size, flipped=False)


def padded_size(height: int, width: int, size_divisor: int) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``size_divisor``."""
    return (
        math.ceil(height / size_divisor) * size_divisor,
        math.ceil(width / size_divisor) * size_divisor,
    )
