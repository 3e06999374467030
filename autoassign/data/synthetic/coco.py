"""The synthetic set in COCO's layout: instances JSON with gapped category ids and crowds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from autoassign.data.synthetic.scenes import (
    DrawnObject,
    save_jpeg,
    shape_scene,
)
from autoassign.data.synthetic.shapes import (
    SHAPES,
)


def coco_category_ids(num_classes: int) -> list[int]:
    """1, 2, 4, 5, 7, 8, ...: ids with gaps, like COCO's."""
    return [1 + label + label // 2 for label in range(num_classes)]


def write_coco_like(
    annotation_file: Path,
    rngs: list[np.random.Generator],
    size: tuple[int, int],
    num_classes: int,
    categories: list[dict],
    image_entry: Callable[[int], tuple[int, str, Path]],
    empty_every: int,
) -> list[tuple[str, list[DrawnObject]]]:
    """Images plus one COCO-style json; returns what was drawn per image."""
    width, height = size
    category_ids = sorted(c["id"] for c in categories)
    images, annotations, written = [], [], []
    for index, rng in enumerate(rngs):
        image_id, file_name, path = image_entry(index)
        empty = empty_every > 0 and index % empty_every == empty_every - 1
        canvas, objects = shape_scene(rng, width, height, num_classes, empty)
        save_jpeg(canvas, path)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        written.append((file_name, objects))
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            obj.flags["iscrowd"] = int(rng.random() < 0.05)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[obj.label],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "area": float(obj.area),
                    "iscrowd": obj.flags["iscrowd"],
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                }
            )
    data = {
        "info": {"description": "autoassign synthetic dataset"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return written


def write_coco_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    ids = coco_category_ids(num_classes)
    # Listed in reverse id order: readers must sort by id, not trust the order.
    categories = [
        {"id": ids[label], "name": SHAPES[label], "supercategory": "shape"}
        for label in reversed(range(num_classes))
    ]

    def entry(index: int) -> tuple[int, str, Path]:
        file_name = f"{index:012d}.jpg"
        return 100 + 3 * index, file_name, root / split / file_name

    return write_coco_like(
        root / "annotations" / f"instances_{split}.json",
        rngs,
        size,
        num_classes,
        categories,
        entry,
        empty_every=10,
    )
