"""COCO and Objects365 box AP with pycocotools' ``COCOeval`` (the official tool).

The ground truth is the original instances json named by ``dataset.meta["annotation_file"]``
(segmentation areas and crowd regions exactly as the file has them). Without that file it is
rebuilt from the records: areas become box areas (which can move objects between the small,
medium and large ranges) and ignored boxes become crowd regions; the evaluator says so in
:attr:`notes`.

Detections go to pycocotools as ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
with the json's own category ids (``dataset.meta["category_ids"]``: contiguous index -> id).
Only the images of the dataset's records are evaluated (``params.imgIds``): images a reader
dropped, such as the three Objects365 v2 images listed in the json but absent on disk, count
nowhere.

Metrics (fractions, NaN where the split has no ground truth for them): ``bbox_mAP``
(IoU 0.50:0.95), ``bbox_mAP_50``, ``bbox_mAP_75``, ``bbox_mAP_s``, ``bbox_mAP_m``,
``bbox_mAP_l`` (all at maxDets 100) and ``AP/<class name>`` (IoU 0.50:0.95, all areas).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from autoassign.data.records import DetectionDataset
from autoassign.eval.base import (
    EvaluationError,
    Evaluator,
    PRCurve,
    PredictionStore,
    nan_if_negative,
)

SUMMARY_NAMES = (
    "bbox_mAP",
    "bbox_mAP_50",
    "bbox_mAP_75",
    "bbox_mAP_s",
    "bbox_mAP_m",
    "bbox_mAP_l",
)
"""Names of ``COCOeval.stats[0:6]``, in that order."""


def category_id_list(dataset: DetectionDataset) -> list[int]:
    """Contiguous class index -> the json's category id, from ``meta["category_ids"]``.

    Accepts a list, or a mapping keyed by int or str indices. Without the entry, ids are
    ``index + 1`` (the layout of a json written from contiguous labels).
    """
    raw = dataset.meta.get("category_ids")
    if raw is None:
        return list(range(1, dataset.num_classes + 1))
    ids: list[int] = []
    for index in range(dataset.num_classes):
        if isinstance(raw, Mapping):
            value = raw.get(index, raw.get(str(index)))
        elif isinstance(raw, Sequence) and index < len(raw):
            value = raw[index]
        else:
            value = None
        if value is None:
            raise EvaluationError(f"dataset meta 'category_ids' has no entry for class {index}")
        ids.append(int(value))
    return ids


def coco_image_ids(dataset: DetectionDataset) -> dict[str, int]:
    """file_name -> the json's image id, from the records' ``image_id``."""
    ids: dict[str, int] = {}
    for record in dataset.records:
        try:
            ids[record.file_name] = int(record.image_id)
        except (TypeError, ValueError) as error:
            raise EvaluationError(
                f"record {record.file_name!r} has image_id {record.image_id!r}, not a COCO id"
            ) from error
    return ids


def ground_truth_from_records(dataset: DetectionDataset, category_ids: list[int]) -> dict:
    """A COCO instances dict holding the records' boxes (ignored boxes as crowd regions)."""
    images, annotations = [], []
    for record in dataset.records:
        images.append(
            {
                "id": int(record.image_id),
                "file_name": record.file_name,
                "width": record.width,
                "height": record.height,
            }
        )
        for box, label, ignore in zip(record.boxes, record.labels, record.ignore):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": category_ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(bool(ignore)),
                }
            )
    categories = [
        {"id": category_id, "name": name}
        for category_id, name in zip(category_ids, dataset.class_names)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def store_to_coco_results(
    store: PredictionStore, image_ids: dict[str, int], category_ids: list[int]
) -> list[dict[str, Any]]:
    """Detections in the COCO results format (``bbox`` as ``[x, y, w, h]``)."""
    results = []
    for file_name, predictions in store.items():
        image_id = image_ids[file_name]
        for box, score, label in zip(predictions.boxes, predictions.scores, predictions.labels):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results


class COCOEvaluator(Evaluator):
    """pycocotools bbox evaluation of a COCO-format split (COCO, Objects365)."""

    primary_metric = "bbox_mAP"

    def __init__(self, dataset: DetectionDataset):
        super().__init__(dataset)
        self._category_ids = category_id_list(dataset)
        self._image_ids = coco_image_ids(dataset)
        self._ground_truth: COCO | None = None
        self._ground_truth_note: str | None = None

    def ground_truth(self) -> COCO:
        """The pycocotools ground truth, loaded once."""
        if self._ground_truth is None:
            annotation_file = self.dataset.meta.get("annotation_file")
            with contextlib.redirect_stdout(io.StringIO()):
                if annotation_file is not None and Path(annotation_file).is_file():
                    self._ground_truth = COCO(str(annotation_file))
                else:
                    self._ground_truth_note = (
                        "no instances json in dataset meta ('annotation_file'); ground truth "
                        "rebuilt from the records, object areas are box areas"
                    )
                    self._ground_truth = COCO()
                    self._ground_truth.dataset = ground_truth_from_records(
                        self.dataset, self._category_ids
                    )
                    self._ground_truth.createIndex()
            source = annotation_file or "the ground truth"
            unknown = sorted(set(self._category_ids) - set(self._ground_truth.getCatIds()))
            if unknown:
                raise EvaluationError(f"category ids {unknown} of the dataset are not in {source}")
            unknown = sorted(set(self._image_ids.values()) - set(self._ground_truth.getImgIds()))
            if unknown:
                raise EvaluationError(
                    f"image ids {unknown[:5]} of the dataset's records are not in {source}"
                )
        if self._ground_truth_note:
            self.notes.append(self._ground_truth_note)
        return self._ground_truth

    def compute(self, store: PredictionStore) -> dict[str, float]:
        ground_truth = self.ground_truth()
        results = store_to_coco_results(store, self._image_ids, self._category_ids)
        with contextlib.redirect_stdout(io.StringIO()):
            if results:
                detections = ground_truth.loadRes(results)
            else:  # loadRes cannot take an empty list
                detections = COCO()
                detections.dataset = {
                    "images": list(ground_truth.dataset["images"]),
                    "categories": list(ground_truth.dataset["categories"]),
                    "annotations": [],
                }
                detections.createIndex()
            coco_eval = COCOeval(ground_truth, detections, iouType="bbox")
            coco_eval.params.imgIds = sorted(set(self._image_ids.values()))
            # Only the dataset's classes are scored: with a class list, the json's other
            # categories are not classes of this model (without one this is every category).
            coco_eval.params.catIds = sorted(self._category_ids)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()

        metrics = {
            name: nan_if_negative(value)
            for name, value in zip(SUMMARY_NAMES, coco_eval.stats[: len(SUMMARY_NAMES)])
        }
        metrics.update(self._per_class_ap(coco_eval))
        self.curves = self._curves_at_iou50(coco_eval)
        return metrics

    def _curves_at_iou50(self, coco_eval: COCOeval) -> dict[str, PRCurve]:
        """Per class with ground truth: pycocotools' interpolated precision at its 101 recall
        thresholds, IoU 0.50, all areas, 100 detections (``AP`` is that curve's mean)."""
        precision = coco_eval.eval["precision"]
        recall_thresholds = np.asarray(coco_eval.params.recThrs, dtype=np.float64)
        position = {category_id: k for k, category_id in enumerate(coco_eval.params.catIds)}
        curves = {}
        for name, category_id in zip(self.dataset.class_names, self._category_ids):
            values = np.asarray(precision[0, :, position[category_id], 0, -1], dtype=np.float64)
            if (values < 0).all():  # no ground truth of this class
                continue
            values = np.maximum(values, 0.0)
            curves[name] = PRCurve(recall_thresholds, values, float(values.mean()))
        return curves

    def _per_class_ap(self, coco_eval: COCOeval) -> dict[str, float]:
        # precision: [IoU thresholds, recall thresholds, categories, area ranges, maxDets];
        # area range 0 is "all", maxDets index -1 is 100; -1 marks "no ground truth".
        precision = coco_eval.eval["precision"]
        position = {category_id: k for k, category_id in enumerate(coco_eval.params.catIds)}
        per_class = {}
        for name, category_id in zip(self.dataset.class_names, self._category_ids):
            values = precision[:, :, position[category_id], 0, -1]
            values = values[values > -1]
            per_class[f"AP/{name}"] = float(np.mean(values)) if values.size else float("nan")
        return per_class
