"""The synthetic set in PASCAL VOC's layout: one XML per image, ImageSets lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoassign.data.synthetic.scenes import (
    DrawnObject,
    save_jpeg,
    shape_scene,
)
from autoassign.data.voc import VOC_CLASSES


def write_voc_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    width, height = size
    ids, written = [], []
    for index, rng in enumerate(rngs):
        image_id = f"{split}_{index:06d}"
        canvas, objects = shape_scene(rng, width, height, num_classes, empty=False)
        save_jpeg(canvas, root / "JPEGImages" / f"{image_id}.jpg")
        parts = [
            "<annotation>",
            "\t<folder>VOC2007</folder>",
            f"\t<filename>{image_id}.jpg</filename>",
            f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
            "\t\t<depth>3</depth>\n\t</size>",
            "\t<segmented>0</segmented>",
        ]
        for obj in objects:
            x1, y1, x2, y2 = obj.box
            difficult = obj.flags["difficult"] = int(rng.random() < 0.08)
            # VOC is 1-based inclusive: pixels x1..x2-1 are written as x1+1..x2.
            parts.append(
                f"\t<object>\n\t\t<name>{VOC_CLASSES[obj.label]}</name>\n"
                "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                f"\t\t<difficult>{difficult}</difficult>\n\t\t<bndbox>\n"
                f"\t\t\t<xmin>{x1 + 1}</xmin>\n\t\t\t<ymin>{y1 + 1}</ymin>\n"
                f"\t\t\t<xmax>{x2}</xmax>\n\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>"
            )
        parts.append("</annotation>\n")
        xml = root / "Annotations" / f"{image_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text("\n".join(parts))
        ids.append(image_id)
        written.append((f"{image_id}.jpg", objects))
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return written
