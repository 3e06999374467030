"""COCO instances json: ``annotations/instances_{split}.json`` + ``{split}/`` images.

Labels are contiguous 0-based indices over the json's category ids sorted ascending (COCO's
ids run 1..90 with gaps), or, with a class list (``classes``), over the list: categories are
matched by name and annotations of unlisted ones are left out
(:mod:`autoassign.data.class_lists`). ``meta["category_ids"][label]`` gives the id back for
results files. ``bbox`` is ``[x, y, w, h]`` in continuous pixels and becomes ``x1, y1, x2, y2``.
``iscrowd=1`` annotations are kept as ignore regions. Images without annotations are kept
(``build_dataset`` may drop them from training).

Annotations that are not training boxes. The reference recipe (mmdetection's COCO-style
loading, under which AutoAssign's published 40.4 AP was trained) leaves some annotations out
altogether, and so do these readers: such an annotation is in no record, neither a training
box nor an ignore region. The rules, :data:`TRAINING_FILTERS`, are checked in this order and
an annotation is counted under the first one it meets:

1. ``ignore_flag``: its ``ignore`` field is set (``"ignore": 1``);
2. ``area``: its ``area`` field is 0 or less (an annotation without ``area`` passes);
3. ``under_1px``: its ``bbox`` is under 1 px wide or high (``w < 1`` or ``h < 1``; zero and
   negative sizes included);
4. ``outside_image``: its box does not overlap its image at all.

A crowd annotation that passes them is an ignore region. ``meta["filtered_annotations"]``
gives, per rule, the ids of the annotations it left out (``annotations[i]`` for one without
an id); the validator reports them. Evaluation does not depend on them: pycocotools reads the
json itself (:mod:`autoassign.eval.coco`).

The same parser reads Objects365, which is COCO-style (see ``objects365.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from autoassign.data.class_lists import LeftOutClasses, warn_unused_classes
from autoassign.data.errors import (
    DUPLICATE_ID,
    MALFORMED,
    MISSING_FILE,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    DatasetError,
    Problem,
    ProblemLog,
    check_boxes,
)
from autoassign.data.images import check_image
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.safe_paths import outside_reason

TRAINING_FILTERS: dict[str, str] = {
    "ignore_flag": "'ignore' flag set",
    "area": "'area' 0 or less",
    "under_1px": "box under 1 px wide or high",
    "outside_image": "box outside its image",
}
"""Rule name -> what it means, in the order the rules are checked (see the module docstring)."""


def default_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(annotation_file, image_dir)`` of a split in the standard COCO layout."""
    return root / "annotations" / f"instances_{split}.json", root / split


def read_coco(
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    split: str = "",
    check_images: bool = False,
    problems: ProblemLog | None = None,
    classes: list[str] | None = None,
) -> DetectionDataset:
    """Read a COCO instances json.

    Args:
        annotation_file: the instances json.
        image_dir: the folder the json's ``file_name`` entries are relative to.
        split: recorded in the result.
        check_images: also check each image file exists and its header has the size the json
            gives (the validator's job; a few thousand images per second).
        problems: where problems go; default a strict log that raises :class:`DatasetError`
            on the first error.
        classes: the class names in label order (see :mod:`autoassign.data.class_lists`);
            default every category of the json, by sorted id.

    Returns:
        A ``DetectionDataset`` with ``meta`` keys ``annotation_file`` (Path),
        ``category_ids`` (label -> json category id), ``image_ids`` (in record order),
        ``image_dir``, ``problems`` (the warnings met) and ``filtered_annotations`` (rule
        name of :data:`TRAINING_FILTERS` -> ids of the annotations it left out) and
        ``left_out_classes`` (category name -> annotations left out because ``classes``
        lacks it).
    """
    annotation_file = Path(annotation_file)
    image_dir = Path(image_dir)
    log = problems if problems is not None else ProblemLog()
    data = load_json(annotation_file)
    return parse_coco_json(
        data,
        annotation_file,
        image_path=lambda image: image_dir / image["file_name"],
        format_name="coco",
        split=split,
        log=log,
        check_images=check_images,
        meta={"image_dir": image_dir},
        classes=classes,
    )


def load_json(path: Path) -> dict[str, Any]:
    """The json object in ``path``; DatasetError naming the line and column when malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as error:
        raise _fatal(MISSING_FILE, path, "", "annotation file does not exist") from error
    except json.JSONDecodeError as error:
        raise _fatal(
            MALFORMED, path, f"line {error.lineno} column {error.colno}", f"bad JSON: {error.msg}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise _fatal(MALFORMED, path, "", f"cannot read: {error}") from error
    if not isinstance(data, dict):
        raise _fatal(MALFORMED, path, "", "top level is not a JSON object")
    return data


def _fatal(kind: str, file: Path, where: str, message: str) -> DatasetError:
    return DatasetError.from_problem(Problem("error", kind, str(file), where, message))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> int | None:
    """``value`` as an int when it is a positive integer (``640`` or ``640.0``), else None."""
    if _is_int(value) and value > 0:
        return value
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    return None


def _list_field(data: dict, key: str, file: Path, required: bool = True) -> list:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise _fatal(MALFORMED, file, f"'{key}'", f"'{key}' must be a list")
    return value


def parse_coco_json(
    data: dict[str, Any],
    annotation_file: Path,
    *,
    image_path: Callable[[dict], Path],
    format_name: str,
    split: str,
    log: ProblemLog,
    check_images: bool,
    skip_image: Callable[[dict, Path], bool] | None = None,
    meta: dict[str, Any] | None = None,
    classes: list[str] | None = None,
) -> DetectionDataset:
    """Turn a loaded COCO-style json into records.

    Args:
        image_path: json image entry -> the image file.
        skip_image: ``(entry, path) -> True`` to leave an image out silently together with
            its annotations (Objects365's known-missing files).
        classes: the class names in label order, matched against the categories' names;
            annotations of other categories are left out (``meta["left_out_classes"]``).
            Default every category, by sorted id.
    """
    categories = _list_field(data, "categories", annotation_file)
    images = _list_field(data, "images", annotation_file)
    annotations = _list_field(data, "annotations", annotation_file, required=False)

    class_names_by_id = parse_categories(categories, annotation_file, log)
    if classes is None:
        category_ids = sorted(class_names_by_id)
        class_names = [class_names_by_id[c] for c in category_ids]
    else:
        category_ids = listed_category_ids(classes, class_names_by_id, annotation_file)
        class_names = list(classes)
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    left_out = LeftOutClasses()

    kept, skipped_ids = _parse_images(
        images, annotation_file, image_path, log, check_images, skip_image
    )
    position_of = {entry[0]: position for position, entry in enumerate(kept)}

    # One pass over the annotations collects flat arrays; checks and grouping are vectorised.
    ann_where: list[str] = []
    ann_image: list[int] = []
    ann_label: list[int] = []
    ann_bbox: list[list] = []
    ann_crowd: list[bool] = []
    ann_ignore_flag: list[bool] = []
    ann_area: list[float] = []  # NaN where the annotation has no 'area'
    ann_ids: list = []  # the id, or the place of an annotation without one
    seen_ann_ids: set = set()
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            log.error(MALFORMED, annotation_file, f"annotations[{index}]", "not a JSON object")
            continue
        ann_id = ann.get("id")
        where = f"annotation id {ann_id}" if ann_id is not None else f"annotations[{index}]"
        if ann_id is not None:
            if ann_id in seen_ann_ids:
                log.error(DUPLICATE_ID, annotation_file, where, "annotation id used twice")
                continue
            seen_ann_ids.add(ann_id)
        image_id = ann.get("image_id")
        position = position_of.get(image_id)
        if position is None:
            if image_id not in skipped_ids:
                log.error(UNKNOWN_IMAGE, annotation_file, where, f"unknown image_id {image_id!r}")
            continue
        label = label_of.get(ann.get("category_id"))
        if label is None and ann.get("category_id") in class_names_by_id:
            left_out.add(class_names_by_id[ann["category_id"]])  # not in the class list
            continue
        if label is None:
            log.error(
                UNKNOWN_CATEGORY,
                annotation_file,
                where,
                f"unknown category_id {ann.get('category_id')!r}",
            )
            continue
        bbox = ann.get("bbox")
        if not _valid_bbox(bbox):
            log.error(
                MALFORMED, annotation_file, where, f"bbox must be 4 finite numbers, got {bbox!r}"
            )
            continue
        area = ann.get("area")
        if area is not None and not _finite_number(area):
            log.error(MALFORMED, annotation_file, where, f"area must be a number, got {area!r}")
            continue
        ann_where.append(where)
        ann_image.append(position)
        ann_label.append(label)
        ann_bbox.append(bbox)
        ann_crowd.append(bool(ann.get("iscrowd", 0)))
        ann_ignore_flag.append(bool(ann.get("ignore", 0)))
        ann_area.append(math.nan if area is None else float(area))
        ann_ids.append(ann_id if ann_id is not None else f"annotations[{index}]")

    xywh = np.asarray(ann_bbox, dtype=np.float64).reshape(-1, 4)
    image_index = np.asarray(ann_image, dtype=np.int64)
    sizes = np.asarray([(entry[2], entry[3]) for entry in kept], dtype=np.float64).reshape(-1, 2)
    rules = training_filter_rules(
        xywh,
        np.asarray(ann_area, dtype=np.float64),
        np.asarray(ann_ignore_flag, dtype=bool),
        sizes[image_index, 0],
        sizes[image_index, 1],
    )
    names = list(TRAINING_FILTERS)
    filtered = {
        name: [ann_ids[i] for i in np.flatnonzero(rules == k)] for k, name in enumerate(names)
    }
    used = np.flatnonzero(rules < 0)
    xywh, image_index = xywh[used], image_index[used]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes, degenerate = check_boxes(
        xyxy,
        sizes[image_index, 0],
        sizes[image_index, 1],
        log,
        annotation_file,
        lambda i: ann_where[used[i]],
    )
    labels = np.asarray(ann_label, dtype=np.int64)[used]
    if classes is not None:
        warn_unused_classes(class_names, labels, log, annotation_file)
    ignore = np.asarray(ann_crowd, dtype=bool)[used] | degenerate

    # Group by image, keeping the json's annotation order within each image.
    order = np.argsort(image_index, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(image_index, minlength=len(kept)))])
    records = []
    for position, (image_id, file_name, width, height, path) in enumerate(kept):
        rows = order[bounds[position] : bounds[position + 1]]
        records.append(
            ImageRecord(
                file_name=file_name,
                path=path,
                width=width,
                height=height,
                boxes=boxes[rows].reshape(-1, 4),
                labels=labels[rows],
                ignore=ignore[rows],
                image_id=image_id,
            )
        )
    return DetectionDataset(
        format=format_name,
        split=split,
        records=records,
        class_names=class_names,
        meta={
            "annotation_file": annotation_file,
            "category_ids": category_ids,
            "image_ids": [record.image_id for record in records],
            "problems": log.warnings,
            "filtered_annotations": filtered,
            "left_out_classes": left_out.as_dict(),
            **(meta or {}),
        },
    )


def training_filter_rules(
    xywh: np.ndarray,
    area: np.ndarray,
    ignore_flag: np.ndarray,
    image_width: np.ndarray,
    image_height: np.ndarray,
) -> np.ndarray:
    """Which rule of :data:`TRAINING_FILTERS` leaves each annotation out, if any.

    Args:
        xywh: ``[N, 4]`` the annotations' ``bbox`` as the json gives it (pixels).
        area: ``[N]`` their ``area`` field, NaN where absent.
        ignore_flag: ``[N]`` bool, their ``ignore`` field.
        image_width, image_height: ``[N]`` the size in pixels of each annotation's image.

    Returns:
        ``[N]`` int64: the index in :data:`TRAINING_FILTERS` of the first rule the annotation
        meets, or -1 for an annotation that stays (a training box, or a crowd ignore region).
    """
    x, y, w, h = np.asarray(xywh, dtype=np.float64).reshape(-1, 4).T
    overlap_w = np.minimum(x + w, image_width) - np.maximum(x, 0.0)
    overlap_h = np.minimum(y + h, image_height) - np.maximum(y, 0.0)
    met = [
        np.asarray(ignore_flag, dtype=bool),
        np.asarray(area, dtype=np.float64) <= 0,  # NaN (no area) compares False
        (w < 1) | (h < 1),
        (overlap_w <= 0) | (overlap_h <= 0),
    ]
    rules = np.full(len(x), -1, dtype=np.int64)
    for index in reversed(range(len(met))):  # the first rule met wins
        rules[met[index]] = index
    return rules


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _valid_bbox(bbox: Any) -> bool:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    return all(_finite_number(v) for v in bbox)


def parse_categories(categories: list, file: Path, log: ProblemLog) -> dict[int, str]:
    """Category id -> name (stripped: Objects365 names carry trailing spaces)."""
    names: dict[int, str] = {}
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            log.error(MALFORMED, file, f"categories[{index}]", "category needs an integer 'id'")
            continue
        category_id = category["id"]
        if category_id in names:
            log.error(DUPLICATE_ID, file, f"category id {category_id}", "category id used twice")
            continue
        names[category_id] = str(category.get("name", category_id)).strip()
    return names


def listed_category_ids(
    classes: list[str], class_names_by_id: dict[int, str], file: Path
) -> list[int]:
    """The category id of each name of ``classes``, in the list's order.

    Raises:
        DatasetError: a listed name is no category of ``file``, or two categories carry it.
    """
    ids_of: dict[str, list[int]] = {}
    for category_id in sorted(class_names_by_id):
        ids_of.setdefault(class_names_by_id[category_id], []).append(category_id)
    category_ids = []
    for position, name in enumerate(classes):
        ids = ids_of.get(name.strip(), [])
        if not ids:
            known = ", ".join(repr(n) for n in ids_of)
            raise _fatal(
                UNKNOWN_CATEGORY,
                file,
                f"data.classes[{position}]",
                f"{name!r} is no category name of this file (its categories: {known})",
            )
        if len(ids) > 1:
            raise _fatal(
                DUPLICATE_ID,
                file,
                f"data.classes[{position}]",
                f"{name!r} is the name of categories {ids}; rename one of them",
            )
        category_ids.append(ids[0])
    return category_ids


def _parse_images(
    images: list,
    file: Path,
    image_path: Callable[[dict], Path],
    log: ProblemLog,
    check_images: bool,
    skip_image: Callable[[dict, Path], bool] | None,
) -> tuple[list[tuple[Any, str, int, int, Path]], set]:
    """The usable images as ``(id, file_name, width, height, path)``, and the skipped ids."""
    kept = []
    seen: set = set()
    skipped: set = set()
    for index, image in enumerate(images):
        if not isinstance(image, dict) or not isinstance(image.get("id"), (int, str)):
            log.error(MALFORMED, file, f"images[{index}]", "image needs an integer 'id'")
            continue
        image_id = image["id"]
        where = f"image id {image_id}"
        if image_id in seen:
            log.error(DUPLICATE_ID, file, where, "image id used twice")
            skipped.add(image_id)
            continue
        seen.add(image_id)
        file_name = image.get("file_name")
        width = _positive_int(image.get("width"))
        height = _positive_int(image.get("height"))
        if not isinstance(file_name, str) or not file_name or width is None or height is None:
            log.error(
                MALFORMED, file, where, "image needs 'file_name' and positive 'width', 'height'"
            )
            skipped.add(image_id)
            continue
        outside = outside_reason(file_name)
        if outside is not None:
            log.error(MALFORMED, file, f"{where} file_name", f"{file_name!r} {outside}")
            skipped.add(image_id)
            continue
        path = image_path(image)
        if skip_image is not None and skip_image(image, path):
            skipped.add(image_id)
            continue
        if check_images and check_image(path, (width, height), log, file, where) is None:
            skipped.add(image_id)
            continue
        kept.append((image_id, file_name, width, height, path))
    return kept, skipped
