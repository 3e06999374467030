"""Small synthetic datasets written in the real on-disk formats.

Each image is a textured background (a smooth gradient or low-frequency noise, plus pixel
noise and a couple of thin lines) with flat-coloured shapes on it. Every class has one fixed
shape and one fixed colour, so a small detector learns them in minutes; the boxes are the
exact tight bounding boxes of the drawn pixels, so readers must give them back exactly.

The classes, in label order (a dataset with ``num_classes=K`` uses the first K):

=====  ==============  ===========  ======================================================
label  name            colour       where the visual mass is
=====  ==============  ===========  ======================================================
0      disc            red          centred
1      ring            blue         off the centre: the box centre is background
2      square          green        centred
3      l_shape         yellow       bottom-left corner
4      diamond         magenta      centred
5      crescent        cyan         left side
6      plus            orange       centred
7      right_triangle  purple       bottom-left half
8      hexagon         white        centred
9      u_shape         black        bottom and sides; the box centre is background
=====  ==============  ===========  ======================================================

The off-centre classes (:data:`OFF_CENTRE_CLASSES`) are the case AutoAssign's learnable
center prior exists for. In VOC format the class names are the standard VOC names
(``aeroplane`` is drawn as a disc, ``bicycle`` as a ring, ...); WiderFace has one class,
a face (a skin-coloured ellipse with eyes and a mouth).

What each format gets, beyond the shapes:

* COCO: category ids with gaps, listed out of order; some ``iscrowd`` objects; every tenth
  image has no annotation.
* VOC: some ``difficult`` objects; ``train.txt``, ``val.txt`` and ``trainval.txt``.
* Objects365: category names with trailing spaces; v2 (``patchN``) or v1 layout.
* WiderFace: crowded images with hundreds of small faces, some ``invalid`` faces, some
  zero-size faces, some images with no face, and the official ``ground_truth/*.mat`` files
  for every split but ``train``.

Sizes: objects are 24..160 px in a 320 px image (scaled with ``image_size``), crowded
images hold 12..20 small objects, so several FPN levels get work. Everything is
deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoassign.data.synthetic.coco import write_coco_split
from autoassign.data.synthetic.objects365 import write_objects365_split
from autoassign.data.synthetic.scenes import DrawnObject
from autoassign.data.synthetic.shapes import (
    COLOURS,
    DEFAULT_NUM_CLASSES,
    FORMATS,
    OFF_CENTRE_CLASSES,
    SHAPES,
    check_format,
    class_names,
    num_classes_of,
    render_mask,
)
from autoassign.data.synthetic.voc import write_voc_split
from autoassign.data.synthetic.widerface import (
    widerface_settings,
    write_widerface_mat,
    write_widerface_split,
)

__all__ = [
    "COLOURS",
    "DEFAULT_NUM_CLASSES",
    "FORMATS",
    "OFF_CENTRE_CLASSES",
    "SHAPES",
    "DrawnObject",
    "SyntheticDataset",
    "class_names",
    "render_mask",
    "widerface_settings",
    "write_synthetic",
    "write_synthetic_root",
    "write_widerface_mat",
]


@dataclass
class SyntheticDataset:
    """What :func:`write_synthetic` wrote: images and boxes per split."""

    format: str
    root: Path
    class_names: list[str]
    images: dict[str, int]
    boxes: dict[str, int]
    objects: dict[str, list[tuple[str, list[DrawnObject]]]] = field(default_factory=dict)
    """Per split, ``(file_name, drawn objects)`` of every image in writing order: what a
    reader must give back (``file_name`` as the format's reader names the image)."""


def write_synthetic(
    format: str,
    out_dir: str | Path,
    *,
    num_images: int | Mapping[str, int] = 160,
    num_classes: int | None = None,
    image_size: int | tuple[int, int] = 320,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
    objects365_version: int = 2,
) -> SyntheticDataset:
    """Write a synthetic dataset in ``format``'s default layout under ``out_dir``.

    Args:
        format: ``coco``, ``voc``, ``objects365`` or ``widerface``.
        num_images: per split; an int gives splits whose name contains ``train`` that many
            and the others a quarter of it (at least 4).
        num_classes: classes drawn (1..10; default 6; WiderFace: 1).
        image_size: ``W`` or ``(W, H)`` in pixels.
        seed: same seed and arguments -> byte-identical files.
        objects365_version: layout of the Objects365 set (2: ``patchN`` folders, 1: flat).
    """
    check_format(format)
    count = num_classes_of(format, num_classes)
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(width, height) < 64:
        raise ValueError(f"image_size must be at least 64 px, got {width}x{height}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    writer = {
        "coco": write_coco_split,
        "objects365": write_objects365_split,
        "voc": write_voc_split,
        "widerface": write_widerface_split,
    }[format]
    summary = SyntheticDataset(format, root, class_names(format, count), {}, {})
    for split in splits:
        n = _images_in(split, num_images)
        rngs = [
            np.random.default_rng(
                [seed, zlib.crc32(format.encode()), zlib.crc32(split.encode()), i]
            )
            for i in range(n)
        ]
        options = {"version": objects365_version} if format == "objects365" else {}
        written = writer(root, split, rngs, (width, height), count, **options)
        summary.images[split] = n
        summary.boxes[split] = sum(len(objects) for _, objects in written)
        summary.objects[split] = written
    if format == "voc" and {"train", "val"} <= set(splits):
        main = root / "ImageSets" / "Main"
        trainval = (main / "train.txt").read_text() + (main / "val.txt").read_text()
        (main / "trainval.txt").write_text(trainval)
    return summary


def _images_in(split: str, num_images: int | Mapping[str, int]) -> int:
    if isinstance(num_images, Mapping):
        return int(num_images[split])
    return num_images if "train" in split else max(4, num_images // 4)


def write_synthetic_root(format: str, root: str | Path, **options) -> bool:
    """:func:`write_synthetic` at ``root`` unless something is there; True if this call wrote.

    The set is written into a temporary sibling folder and renamed into place, so nobody
    (a reader, or another worker writing the same set at once) sees half a dataset.
    """
    root = Path(root)
    if root.exists():
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_synthetic(format, staging, **options)
        try:
            os.rename(staging, root)
        except OSError:
            if not root.exists():  # lost the race only if another worker made it
                raise
            return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
