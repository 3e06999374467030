"""The one record type every dataset reader returns.

Boxes are ``xyxy`` float32 in continuous 0-based pixels of the original image, whatever the
on-disk convention (COCO and WiderFace ``xywh``, VOC 1-based inclusive).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ImageRecord:
    """One image and its annotations.

    Attributes:
        file_name: the image's name as its annotations name it; predictions files and
            evaluators identify images by it (COCO/Objects365: the json's ``file_name``;
            VOC: ``<id>.jpg``; WiderFace: the image's line in the gt file).
        path: where the image file is on disk.
        width, height: original image size in pixels.
        boxes: ``[N, 4]`` float32, ``x1, y1, x2, y2`` in original-image pixels.
        labels: ``[N]`` int64, contiguous 0-based class indices.
        ignore: ``[N]`` bool; True for boxes that are never training targets and that the
            evaluator treats as ignore regions (COCO ``iscrowd``, VOC ``difficult``,
            WiderFace ``invalid`` or zero-size faces).
        image_id: the dataset's own id of the image (COCO id, VOC id string, WiderFace index).
        attributes: per-box arrays of extra attributes, each of length N (WiderFace
            ``blur``, ``expression``, ``illumination``, ``invalid``, ``occlusion``, ``pose``).
    """

    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    image_id: int | str = 0
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        """Boxes usable as training targets (not ignored)."""
        return int((~self.ignore).sum())


@dataclass
class DetectionDataset:
    """The records of one split of one dataset, with its class names.

    ``meta`` holds what a format's evaluator needs beyond the records (COCO: the annotation
    file path and the contiguous-index -> category-id mapping; WiderFace: the gt file path).
    """

    format: str
    split: str
    records: list[ImageRecord]
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
