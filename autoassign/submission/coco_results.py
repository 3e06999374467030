"""COCO results JSON: what the COCO and Objects365 evaluation servers take.

A JSON list with one object per detection::

    {"image_id": 397133, "category_id": 18, "bbox": [x, y, w, h], "score": 0.93}

with the image and category ids of the dataset's own annotation file (COCO's category ids
run 1..90 with gaps) and ``bbox`` in original-image pixels, ``x, y`` its top-left corner.
A model's labels are contiguous indices over the file's category ids sorted ascending, as the
readers assign them (:mod:`autoassign.data.coco`), so they map back through any json of the
same dataset: the split's instances json, or a server's image-info file (COCO's
``image_info_test-dev2017.json``: images and categories, no annotations).

``python -m autoassign.eval`` reads this file too (COCO and Objects365 formats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from autoassign.data.coco import load_json, parse_categories
from autoassign.data.errors import DatasetError, ProblemLog
from autoassign.eval.base import PredictionStore
from autoassign.eval.coco import store_to_coco_results
from autoassign.submission import SubmissionError


@dataclass(frozen=True)
class CocoIds:
    """The ids a results file needs, from the dataset's annotation file."""

    image_ids: dict[str, int | str]
    """Image name (as ``autoassign.predict`` names it) -> the json's image id."""
    category_ids: list[int]
    """Label -> the json's category id."""
    unlisted: list[str]
    """The names the json does not list (COCO's test2017 folder holds more images than
    test-dev's image-info json): they get no results."""


def read_coco_ids(annotation_file: str | Path, image_names: list[str], num_classes: int) -> CocoIds:
    """The json ids of ``image_names`` and of a model's ``num_classes`` labels.

    A name matches the json image whose ``file_name`` is the name or ends with ``/`` and the
    name: Objects365 v2 lists ``images/v2/patch8/NAME.jpg``, found by ``patch8/NAME.jpg`` (a
    name relative to the split's image folder) or by ``NAME.jpg``. Names the json does not
    list are returned in :attr:`CocoIds.unlisted`.

    Raises:
        DatasetError: the json is missing or malformed (file, line or entry named).
        SubmissionError: the json lists none of the names, or one name twice; its category
            count differs from ``num_classes``.
    """
    annotation_file = Path(annotation_file)
    data = load_json(annotation_file)
    images, categories = data.get("images"), data.get("categories")
    if not isinstance(images, list) or not isinstance(categories, list):
        raise DatasetError(f"{annotation_file}: needs 'images' and 'categories' lists")
    category_ids = sorted(parse_categories(categories, annotation_file, ProblemLog()))
    if len(category_ids) != num_classes:
        raise SubmissionError(
            f"{annotation_file}: {len(category_ids)} categories, but the model has "
            f"{num_classes} classes; give the annotation file of the dataset it was trained on"
        )

    by_base_name: dict[str, list[tuple[str, int | str]]] = {}
    for index, image in enumerate(images):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("id"), (int, str))
            or isinstance(image.get("id"), bool)
            or not isinstance(image.get("file_name"), str)
        ):
            raise DatasetError(
                f"{annotation_file}: images[{index}]: needs an 'id' and a 'file_name'"
            )
        file_name = image["file_name"].replace("\\", "/")
        by_base_name.setdefault(PurePosixPath(file_name).name, []).append((file_name, image["id"]))

    image_ids: dict[str, int | str] = {}
    unlisted: list[str] = []
    for name in image_names:
        candidates = by_base_name.get(PurePosixPath(name).name, [])
        found = [
            image_id
            for file_name, image_id in candidates
            if file_name == name or file_name.endswith("/" + name)
        ]
        if not found:
            unlisted.append(name)
            continue
        if len(found) > 1:
            raise SubmissionError(
                f"{annotation_file}: {len(found)} images match {name!r} (ids "
                f"{', '.join(map(str, found[:5]))}); name the images by their folder too "
                "(--root)"
            )
        image_ids[name] = found[0]
    if image_names and not image_ids:
        raise SubmissionError(
            f"{annotation_file}: lists none of the {len(image_names)} images (the first is "
            f"named {image_names[0]!r}; names are relative to --root, or base names without it)"
        )
    return CocoIds(image_ids=image_ids, category_ids=category_ids, unlisted=unlisted)


def write_coco_results(path: str | Path, store: PredictionStore, ids: CocoIds) -> int:
    """Write ``store`` as a COCO results JSON list at ``path``; returns the detections written.

    Every image of ``store`` must be in ``ids.image_ids``. Values are written at full float
    precision, so scoring the file gives exactly the metrics of the detections themselves.
    """
    results = store_to_coco_results(store, ids.image_ids, ids.category_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results) + "\n")
    return len(results)
