"""PASCAL VOC mAP, matching detections to objects as the official devkit does.

Per class, detections of all images are sorted by descending score (a stable sort, so equal
scores keep image order; the devkit's sort leaves their order unspecified). Each detection
looks at its best-overlapping object of that class in its image:

- IoU > 0.5 with a ``difficult`` object (``record.ignore``): neither true nor false positive;
- IoU > 0.5 with an object not matched yet: true positive, the object is now matched;
- otherwise (already matched, or IoU <= 0.5): false positive.

The devkit computes IoU with ``+1`` widths on 1-based inclusive pixel boxes. Our boxes are
continuous ``(xmin - 1, ymin - 1, xmax, ymax)``, so the plain IoU used here is equal to it.

Metrics (fractions): ``mAP_11pt`` (VOC2007: mean over recall 0, 0.1, ..., 1 of the best
precision at recall >= t), ``mAP_area`` (VOC2010+: area under the monotone precision
envelope), each averaged over the classes with at least one non-difficult object in the split;
``mAP`` is the one that ``EvalConfig.voc_metric`` names, and ``AP/<class name>`` the per-class
value of that same kind (NaN for a class without non-difficult objects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from autoassign.data.records import DetectionDataset
from autoassign.eval.base import Evaluator, PRCurve, PredictionStore

IOU_THRESHOLD = 0.5


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of ``[N, 4]`` and ``[M, 4]`` xyxy continuous boxes -> ``[N, M]``."""
    top_left = np.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = np.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    size = np.clip(bottom_right - top_left, 0, None)
    intersection = size[..., 0] * size[..., 1]
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersection / union, 0.0)
    return iou


def average_precision_11pt(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t (0 if none)."""
    total = 0.0
    # np.arange as the Python devkit ports: its 0.3, 0.6 and 0.7 are a hair above the decimal
    # values, so a recall of exactly 3/10 does not reach the 0.3 point there either.
    for threshold in np.arange(0.0, 1.1, 0.1):
        reached = recall >= threshold
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / 11.0


def average_precision_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+: area under the precision envelope (precision made non-increasing in recall).

    NaN precisions (WiderFace's thresholds that nothing passes) are passed over, as Matlab's
    ``max`` does in both devkits; VOC's curves have none.
    """
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    envelope = np.fmax.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * envelope[steps + 1]))


@dataclass(frozen=True)
class ClassCurve:
    """The precision/recall curve of one class over the split.

    ``recall`` and ``precision`` are ``[D]`` for the D detections that are TP or FP (those on
    difficult objects are dropped), in descending score order; ``num_positives`` counts the
    non-difficult objects.
    """

    recall: np.ndarray
    precision: np.ndarray
    num_positives: int


def class_curve(
    detections: list[tuple[str, np.ndarray, np.ndarray]],
    objects: dict[str, tuple[np.ndarray, np.ndarray]],
) -> ClassCurve:
    """Match one class's detections to its objects.

    Args:
        detections: per image: (file_name, boxes ``[K, 4]``, scores ``[K]``) of this class.
        objects: file_name -> (boxes ``[N, 4]``, difficult ``[N]`` bool) of this class.
    """
    num_positives = int(sum((~difficult).sum() for _, difficult in objects.values()))
    if not detections:
        return ClassCurve(np.zeros(0), np.zeros(0), num_positives)
    # The devkit's best object of a detection does not depend on what is matched already, so
    # it is found per image in one IoU matrix; only the matching itself is sequential.
    names, best_object, best_overlap = [], [], []
    for name, boxes, _ in detections:
        object_boxes = objects.get(name, (np.zeros((0, 4)), None))[0]
        names += [name] * len(boxes)
        if len(object_boxes) == 0:
            best_object.append(np.full(len(boxes), -1))
            best_overlap.append(np.full(len(boxes), -np.inf))
            continue
        overlaps = pairwise_iou(boxes, object_boxes)  # [K, N]
        best_object.append(overlaps.argmax(axis=1))
        best_overlap.append(overlaps.max(axis=1))
    best_objects = np.concatenate(best_object)
    best_overlaps = np.concatenate(best_overlap)
    scores = np.concatenate([scores for _, _, scores in detections])
    order = np.argsort(-scores, kind="stable")

    matched = {name: np.zeros(len(obj_boxes), bool) for name, (obj_boxes, _) in objects.items()}
    outcome = np.zeros(len(order), dtype=np.int8)  # 1 true positive, -1 false positive, 0 neither
    for rank, index in enumerate(order):
        if best_overlaps[index] <= IOU_THRESHOLD:
            outcome[rank] = -1
            continue
        name, best = names[index], best_objects[index]
        if objects[name][1][best]:
            outcome[rank] = 0
        elif not matched[name][best]:
            matched[name][best] = True
            outcome[rank] = 1
        else:
            outcome[rank] = -1
    counted = outcome[outcome != 0]
    true_positives = np.cumsum(counted == 1)
    false_positives = np.cumsum(counted == -1)
    recall = true_positives / max(num_positives, 1)
    precision = true_positives / np.maximum(true_positives + false_positives, 1)
    return ClassCurve(recall, precision, num_positives)


class VOCEvaluator(Evaluator):
    """VOC mAP (11-point and area) of a split whose difficult objects are ``ignore``."""

    primary_metric = "mAP"

    def __init__(self, dataset: DetectionDataset, metric: Literal["11pt", "area"] = "11pt"):
        super().__init__(dataset)
        if metric not in ("11pt", "area"):
            raise ValueError(f"VOC metric must be '11pt' or 'area', got {metric!r}")
        self.metric = metric

    def compute(self, store: PredictionStore) -> dict[str, float]:
        ap_11pt: dict[str, float] = {}
        ap_area: dict[str, float] = {}
        for label, name in enumerate(self.dataset.class_names):
            curve = class_curve(self._detections(store, label), self._objects(label))
            if curve.num_positives == 0:
                continue
            ap_11pt[name] = average_precision_11pt(curve.recall, curve.precision)
            ap_area[name] = average_precision_area(curve.recall, curve.precision)
            chosen_ap = ap_11pt[name] if self.metric == "11pt" else ap_area[name]
            self.curves[name] = PRCurve(curve.recall, curve.precision, chosen_ap).thinned()
        if not ap_11pt:
            self.notes.append("no class has a non-difficult object in this split; mAP is NaN")

        def mean(values: dict[str, float]) -> float:
            return float(np.mean(list(values.values()))) if values else float("nan")

        chosen = ap_11pt if self.metric == "11pt" else ap_area
        metrics = {"mAP": mean(chosen), "mAP_11pt": mean(ap_11pt), "mAP_area": mean(ap_area)}
        for name in self.dataset.class_names:
            metrics[f"AP/{name}"] = chosen.get(name, float("nan"))
        return metrics

    def _detections(
        self, store: PredictionStore, label: int
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        detections = []
        for file_name, predictions in store.items():
            keep = predictions.labels == label
            if keep.any():
                detections.append((file_name, predictions.boxes[keep], predictions.scores[keep]))
        return detections

    def _objects(self, label: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        objects = {}
        for record in self.dataset.records:
            keep = record.labels == label
            objects[record.file_name] = (
                record.boxes[keep].astype(np.float64),
                record.ignore[keep].astype(bool),
            )
        return objects
