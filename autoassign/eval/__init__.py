"""Evaluation with each dataset's own protocol.

``build_evaluator(dataset, cfg)`` picks the evaluator of ``dataset.format``:

- ``coco``, ``objects365``: pycocotools box AP (:class:`COCOEvaluator`);
- ``voc``: VOC devkit mAP, 11-point and area (:class:`VOCEvaluator`);
- ``widerface``: the official easy / medium / hard AP (:class:`WiderFaceEvaluator`).

All share the ``reset / process / evaluate`` interface of :class:`Evaluator`.
"""

from __future__ import annotations

from autoassign.config import EvalConfig
from autoassign.data.records import DetectionDataset
from autoassign.eval.base import (
    EvaluationError,
    Evaluator,
    ImagePredictions,
    gather_prediction_store,
    merge_prediction_shards,
)
from autoassign.eval.coco import COCOEvaluator
from autoassign.eval.voc import VOCEvaluator
from autoassign.eval.widerface import WiderFaceEvaluator

__all__ = [
    "COCOEvaluator",
    "EvaluationError",
    "Evaluator",
    "ImagePredictions",
    "VOCEvaluator",
    "WiderFaceEvaluator",
    "build_evaluator",
    "gather_prediction_store",
    "merge_prediction_shards",
]


def build_evaluator(dataset: DetectionDataset, cfg: EvalConfig | None = None) -> Evaluator:
    """The evaluator of the dataset's protocol, configured by ``cfg`` (defaults if None)."""
    cfg = cfg if cfg is not None else EvalConfig()
    if dataset.format in ("coco", "objects365"):
        return COCOEvaluator(dataset)
    if dataset.format == "voc":
        return VOCEvaluator(dataset, metric=cfg.voc_metric)
    if dataset.format == "widerface":
        return WiderFaceEvaluator(dataset, ground_truth_dir=cfg.widerface_ground_truth)
    raise EvaluationError(f"no evaluator for dataset format {dataset.format!r}")
