"""The synthetic set in Objects365's layout (v2 ``patchN`` folders, or v1 flat)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoassign.data.synthetic.coco import write_coco_like
from autoassign.data.synthetic.scenes import (
    DrawnObject,
)
from autoassign.data.synthetic.shapes import (
    SHAPES,
)


def write_objects365_split(
    root: Path,
    split: str,
    rngs: list[np.random.Generator],
    size,
    num_classes: int,
    version: int,
) -> list[tuple[str, list[DrawnObject]]]:
    # Trailing spaces on every other name, as in the real v2 json.
    categories = [
        {"id": label + 1, "name": SHAPES[label] + (" " if label % 2 else "")}
        for label in reversed(range(num_classes))
    ]

    def entry(index: int) -> tuple[int, str, Path]:
        image_id = index + 1
        if version == 2:
            relative = f"patch{index % 2}/objects365_v2_{image_id:08d}.jpg"
            return image_id, f"images/v2/{relative}", root / split / relative
        name = f"obj365_{split}_{image_id:012d}.jpg"
        return image_id, name, root / split / name

    annotation_name = f"zhiyuan_objv2_{split}.json" if version == 2 else f"objects365_{split}.json"
    return write_coco_like(
        root / "annotations" / annotation_name,
        rngs,
        size,
        num_classes,
        categories,
        entry,
        empty_every=0,
    )
