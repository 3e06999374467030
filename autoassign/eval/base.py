"""What every evaluator shares: collecting predictions per image and gathering them from ranks.

An evaluator follows the ``reset / process / evaluate`` cycle:

    evaluator.reset()
    for batch in loader:
        evaluator.process(model_outputs_for_batch)   # one dict per image
    metrics = evaluator.evaluate()                   # every rank gets the same dict

``process`` stores each image's predictions under its ``file_name``. Under
``torch.distributed``, ``evaluate`` gathers the stores of all ranks on rank 0 only
(``torch.distributed.gather_object``; with NCCL the current CUDA device must be set, as
:func:`autoassign.engine.device.resolve_device` does), merges them with
:func:`merge_prediction_shards` (an image two ranks saw, as a padded ``DistributedSampler``
makes happen, counts once), runs the protocol's :meth:`compute` there, and broadcasts the
metrics so that every rank returns the same dict. Alone, it computes on its own store.
Images that received no predictions count as images where the detector found nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autoassign.data.records import DetectionDataset
from autoassign.distributed import broadcast_object, is_distributed
from autoassign.errors import AutoAssignError

logger = logging.getLogger(__name__)

MAX_CURVE_POINTS = 400  # what a plot or a JSON artifact needs of a curve of many detections


class EvaluationError(AutoAssignError):
    """Bad predictions or ground truth given to an evaluator; the message names the culprit."""


@dataclass(frozen=True)
class ImagePredictions:
    """The detections of one image.

    Attributes:
        boxes: ``[K, 4]`` float64, ``x1, y1, x2, y2`` in continuous 0-based pixels of the
            original image.
        scores: ``[K]`` float64 confidences.
        labels: ``[K]`` int64 contiguous 0-based class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @staticmethod
    def empty() -> ImagePredictions:
        return ImagePredictions(
            boxes=np.zeros((0, 4), dtype=np.float64),
            scores=np.zeros(0, dtype=np.float64),
            labels=np.zeros(0, dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])


PredictionStore = dict[str, ImagePredictions]
"""file_name -> that image's detections."""


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_image_predictions(
    prediction: Mapping[str, Any], num_classes: int, where: str
) -> ImagePredictions:
    """Check one ``{"boxes", "scores", "labels"}`` dict and turn it into numpy arrays.

    ``where`` names the prediction in error messages (an image name, a file and entry).
    """
    for key in ("boxes", "scores", "labels"):
        if key not in prediction:
            raise EvaluationError(f"{where}: missing field {key!r}")
    boxes = _as_numpy(prediction["boxes"]).astype(np.float64)
    scores = _as_numpy(prediction["scores"]).astype(np.float64).reshape(-1)
    labels_raw = _as_numpy(prediction["labels"]).reshape(-1)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise EvaluationError(f"{where}: 'boxes' must have shape [K, 4], got {list(boxes.shape)}")
    if not (len(boxes) == len(scores) == len(labels_raw)):
        raise EvaluationError(
            f"{where}: 'boxes', 'scores' and 'labels' have different lengths "
            f"({len(boxes)}, {len(scores)}, {len(labels_raw)})"
        )
    if len(labels_raw) and not np.issubdtype(labels_raw.dtype, np.integer):
        raise EvaluationError(f"{where}: 'labels' must be integer class indices")
    labels = labels_raw.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise EvaluationError(f"{where}: label {bad} is outside 0..{num_classes - 1}")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise EvaluationError(f"{where}: 'boxes' or 'scores' contain NaN or infinity")
    return ImagePredictions(boxes=boxes, scores=scores, labels=labels)


def merge_prediction_shards(shards: Iterable[PredictionStore]) -> PredictionStore:
    """Merge the stores of several ranks; an image present in several counts once.

    The first shard (lowest rank) that holds an image wins: ranks that saw the same image (the
    padding of a ``DistributedSampler``) ran the same model on it, so their copies agree.
    """
    merged: PredictionStore = {}
    for shard in shards:
        for file_name, predictions in shard.items():
            merged.setdefault(file_name, predictions)
    return merged


def gather_prediction_store(local: PredictionStore) -> PredictionStore:
    """The merged store of all ranks, or ``local`` alone outside ``torch.distributed``."""
    if not is_distributed():
        return dict(local)
    world_size = torch.distributed.get_world_size()
    shards: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(shards, local)
    return merge_prediction_shards(shards)


def gather_prediction_store_to_main(local: PredictionStore) -> PredictionStore | None:
    """The merged store of all ranks on rank 0 (``None`` on the others); ``local`` alone
    outside ``torch.distributed``."""
    if not is_distributed():
        return dict(local)
    dist = torch.distributed
    shards: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, shards, dst=0)
    return merge_prediction_shards(shards) if shards is not None else None


@dataclass(frozen=True)
class PRCurve:
    """One precision-recall curve as an evaluator accumulated it.

    ``recall`` and ``precision`` are ``[P]`` float arrays of the same length, in the order the
    protocol walks them (descending score, or ascending recall threshold); ``ap`` is the AP
    the protocol computes from this curve (COCO: AP50 of the class; VOC: its AP in the
    configured kind; WiderFace: the setting's AP).
    """

    recall: np.ndarray
    precision: np.ndarray
    ap: float

    def thinned(self, max_points: int = MAX_CURVE_POINTS) -> PRCurve:
        """At most ``max_points`` evenly spaced points, the first and last kept."""
        if len(self.recall) <= max_points:
            return self
        keep = np.unique(np.linspace(0, len(self.recall) - 1, max_points).round().astype(int))
        return PRCurve(self.recall[keep], self.precision[keep], self.ap)


class Evaluator:
    """Base class: collects predictions per image; subclasses implement :meth:`compute`.

    Attributes:
        primary_metric: the name of the protocol's headline metric among those
            :meth:`compute` returns (what model selection compares).
        dataset: the split being evaluated (records and ``meta``).
        notes: what the last :meth:`evaluate` did differently from the official protocol
            (for example a fallback); empty when it followed it exactly.
        curves: the precision-recall curves of the last :meth:`evaluate`, as the protocol
            accumulated them, on rank 0 only (empty elsewhere): curve name ->
            :class:`PRCurve`.
    """

    primary_metric: str = ""

    def __init__(self, dataset: DetectionDataset):
        self.dataset = dataset
        self.notes: list[str] = []
        self.curves: dict[str, PRCurve] = {}
        self._file_names = {record.file_name for record in dataset.records}
        self._store: PredictionStore = {}

    def reset(self) -> None:
        """Forget every processed prediction."""
        self._store = {}
        self.notes = []
        self.curves = {}

    def process(self, predictions: list[dict]) -> None:
        """Store the predictions of a batch of images.

        Args:
            predictions: one dict per image: ``file_name`` (str, as the dataset names it),
                ``boxes`` (``[K, 4]`` xyxy continuous pixels of the original image),
                ``scores`` (``[K]``) and ``labels`` (``[K]`` int, 0-based); numpy arrays,
                tensors or lists. An image processed twice keeps its first predictions.
        """
        for prediction in predictions:
            file_name = prediction.get("file_name")
            if not isinstance(file_name, str):
                raise EvaluationError("a prediction has no 'file_name' string")
            if file_name not in self._file_names:
                raise EvaluationError(
                    f"prediction for image {file_name!r}, which is not in the "
                    f"{self.dataset.format} split {self.dataset.split!r}"
                )
            if file_name in self._store:
                continue
            self._store[file_name] = to_image_predictions(
                prediction, self.dataset.num_classes, where=f"prediction for {file_name!r}"
            )

    def local_store(self) -> PredictionStore:
        """This rank's processed predictions (what :func:`gather_prediction_store` sends)."""
        return dict(self._store)

    def evaluate(self) -> dict[str, float]:
        """The metrics of the predictions of all ranks; every rank returns the same dict.

        Rank 0 gathers and computes; the others wait for its result. An error in
        :meth:`compute` is raised on rank 0 as is and, as :class:`EvaluationError` with the
        same message, on the other ranks (so none waits forever).
        """
        self.notes = []
        self.curves = {}
        store = gather_prediction_store_to_main(self._store)
        outcome: tuple[str, Any, list[str]] | None = None
        error: Exception | None = None
        if store is not None:
            try:
                metrics = {name: float(value) for name, value in self.compute(store).items()}
                for note in self.notes:
                    logger.warning("%s evaluation: %s", self.dataset.format, note)
                outcome = ("ok", metrics, list(self.notes))
            except Exception as raised:
                error = raised
                outcome = ("error", f"{type(raised).__name__}: {raised}", [])
        outcome = broadcast_object(outcome, src=0)
        if error is not None:
            raise error
        kind, value, self.notes = outcome
        if kind == "error":
            raise EvaluationError(f"evaluation failed on rank 0: {value}")
        return value

    def compute(self, store: PredictionStore) -> dict[str, float]:
        """The protocol's metrics for ``store`` (images missing from it found nothing).

        Subclasses also fill :attr:`curves` with the curves behind those metrics.
        """
        raise NotImplementedError


def nan_if_negative(value: float) -> float:
    """pycocotools writes -1 where a metric has no ground truth; we report NaN there."""
    return float("nan") if value < 0 or math.isnan(value) else float(value)
