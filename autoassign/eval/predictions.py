"""Predictions files: what ``autoassign.predict`` writes and ``python -m autoassign.eval`` reads.

The project's format is a JSON list (or JSON lines) with one object per image::

    {"file_name": "000123.jpg",
     "boxes": [[x1, y1, x2, y2], ...],     # continuous pixels of the original image
     "scores": [0.93, ...],
     "labels": ["person", ...]}            # class names of the dataset

For COCO and Objects365 the COCO results format is read as well: a list of
``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` with the json's ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from autoassign.data.records import DetectionDataset
from autoassign.eval.base import EvaluationError, to_image_predictions
from autoassign.eval.coco import category_id_list, coco_image_ids


class PredictionsFileError(EvaluationError):
    """A predictions file that cannot be read; the message names the file and entry."""


def write_predictions(
    path: Path | str, dataset: DetectionDataset, predictions: Iterable[Mapping[str, Any]]
) -> None:
    """Write predictions (the ``Evaluator.process`` format) as a JSON list with class names."""
    entries = []
    for prediction in predictions:
        file_name = prediction["file_name"]
        image = to_image_predictions(
            prediction, dataset.num_classes, where=f"prediction for {file_name!r}"
        )
        entries.append(
            {
                "file_name": file_name,
                "boxes": [[float(v) for v in box] for box in image.boxes],
                "scores": [float(s) for s in image.scores],
                "labels": [dataset.class_names[int(label)] for label in image.labels],
            }
        )
    Path(path).write_text(json.dumps(entries, indent=None) + "\n")


def _read_entries(path: Path) -> list[tuple[str, Any]]:
    """(where, object) for each entry of a JSON list or JSON lines file."""
    try:
        text = path.read_text()
    except OSError as error:
        raise PredictionsFileError(f"{path}: cannot read ({error.strerror})") from error
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        content = None
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise PredictionsFileError(
                    f"{path} line {number}: not JSON ({error.msg})"
                ) from error
        return entries
    if isinstance(content, dict):
        return [(f"{path} line 1", content)]
    if not isinstance(content, list):
        raise PredictionsFileError(f"{path}: expected a JSON list of objects")
    return [(f"{path} entry {index}", entry) for index, entry in enumerate(content)]


def _is_coco_result(entry: Any) -> bool:
    return isinstance(entry, dict) and "image_id" in entry and "category_id" in entry


def load_predictions(path: Path | str, dataset: DetectionDataset) -> list[dict]:
    """Read a predictions file into the ``Evaluator.process`` format.

    Returns one dict per image in the file: ``file_name``, ``boxes`` ``[K, 4]`` float64 xyxy,
    ``scores`` ``[K]`` float64, ``labels`` ``[K]`` int64 class indices.

    Raises:
        PredictionsFileError: unreadable file, malformed entry, an image that is not in the
            dataset, a class name (or category id) the dataset does not have, an image given
            twice.
    """
    path = Path(path)
    entries = _read_entries(path)
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise PredictionsFileError(f"{where}: expected an object, got {type(entry).__name__}")
    if entries and all(_is_coco_result(entry) for _, entry in entries):
        return _from_coco_results(path, entries, dataset)

    known_images = {record.file_name for record in dataset.records}
    class_index = {name: index for index, name in enumerate(dataset.class_names)}
    seen: dict[str, str] = {}
    loaded = []
    for where, entry in entries:
        file_name = entry.get("file_name")
        if not isinstance(file_name, str):
            raise PredictionsFileError(f"{where}: missing 'file_name' string")
        if file_name not in known_images:
            raise PredictionsFileError(
                f"{where}: image {file_name!r} is not in the {dataset.format} split "
                f"{dataset.split!r}"
            )
        if file_name in seen:
            raise PredictionsFileError(
                f"{where}: image {file_name!r} already has predictions at {seen[file_name]}"
            )
        seen[file_name] = where
        names = entry.get("labels")
        if not isinstance(names, list):
            raise PredictionsFileError(f"{where}: 'labels' must be a list of class names")
        labels = []
        for name in names:
            if not isinstance(name, str):
                raise PredictionsFileError(f"{where}: label {name!r} is not a class name")
            if name not in class_index:
                raise PredictionsFileError(
                    f"{where}: unknown class name {name!r} (the dataset's classes: "
                    f"{', '.join(dataset.class_names[:10])}"
                    f"{', ...' if len(dataset.class_names) > 10 else ''})"
                )
            labels.append(class_index[name])
        try:
            boxes = np.asarray(entry.get("boxes", []), dtype=np.float64)
            scores = np.asarray(entry.get("scores", []), dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise PredictionsFileError(
                f"{where}: 'boxes' must be a list of [x1, y1, x2, y2] and 'scores' of numbers"
            ) from error
        try:
            image = to_image_predictions(
                {"boxes": boxes, "scores": scores, "labels": np.asarray(labels, dtype=np.int64)},
                dataset.num_classes,
                where=where,
            )
        except EvaluationError as error:
            raise PredictionsFileError(str(error)) from error
        loaded.append(
            {
                "file_name": file_name,
                "boxes": image.boxes,
                "scores": image.scores,
                "labels": image.labels,
            }
        )
    return loaded


def _from_coco_results(
    path: Path, entries: list[tuple[str, dict]], dataset: DetectionDataset
) -> list[dict]:
    """Group COCO results (``bbox`` xywh, json ids) into per-image predictions."""
    if dataset.format not in ("coco", "objects365"):
        raise PredictionsFileError(
            f"{path}: COCO results format (image_id, category_id) given for a "
            f"{dataset.format} dataset; use the file_name/boxes/scores/labels format"
        )
    file_by_id = {image_id: name for name, image_id in coco_image_ids(dataset).items()}
    label_by_category = {cat: index for index, cat in enumerate(category_id_list(dataset))}
    grouped: dict[str, list[tuple[list[float], float, int]]] = {}
    for where, entry in entries:
        image_id, category_id = entry["image_id"], entry["category_id"]
        if image_id not in file_by_id:
            raise PredictionsFileError(
                f"{where}: image_id {image_id!r} is not in the {dataset.format} split "
                f"{dataset.split!r}"
            )
        if category_id not in label_by_category:
            raise PredictionsFileError(
                f"{where}: unknown category_id {category_id!r} (not a category of the dataset)"
            )
        bbox, score = entry.get("bbox"), entry.get("score")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) for v in bbox)
            or not isinstance(score, (int, float))
        ):
            raise PredictionsFileError(f"{where}: needs 'bbox' [x, y, w, h] and a 'score' number")
        x, y, w, h = (float(v) for v in bbox)
        grouped.setdefault(file_by_id[image_id], []).append(
            ([x, y, x + w, y + h], float(score), label_by_category[category_id])
        )
    return [
        {
            "file_name": file_name,
            "boxes": np.array([box for box, _, _ in items], dtype=np.float64).reshape(-1, 4),
            "scores": np.array([score for _, score, _ in items], dtype=np.float64),
            "labels": np.array([label for _, _, label in items], dtype=np.int64),
        }
        for file_name, items in grouped.items()
    ]
