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

import json
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .voc import VOC_CLASSES

SHAPES = (
    "disc",
    "ring",
    "square",
    "l_shape",
    "diamond",
    "crescent",
    "plus",
    "right_triangle",
    "hexagon",
    "u_shape",
)
"""Class names of the COCO and Objects365 synthetic sets, in label order."""

OFF_CENTRE_CLASSES = frozenset({"ring", "l_shape", "crescent", "right_triangle", "u_shape"})
"""Shapes whose visual mass is away from the centre of their box."""

COLOURS = {
    "disc": (220, 40, 40),
    "ring": (40, 70, 230),
    "square": (40, 190, 60),
    "l_shape": (235, 215, 40),
    "diamond": (215, 50, 200),
    "crescent": (40, 210, 220),
    "plus": (245, 135, 30),
    "right_triangle": (125, 45, 205),
    "hexagon": (245, 245, 245),
    "u_shape": (20, 20, 20),
}
FACE_COLOUR = (230, 185, 145)
FORMATS = ("coco", "voc", "objects365", "widerface")
DEFAULT_NUM_CLASSES = 6
WIDERFACE_EVENTS = ("0--Parade", "1--Handshaking", "2--Demonstration", "3--Riot")
_JPEG_QUALITY = 90


def class_names(format: str, num_classes: int | None = None) -> list[str]:
    """Class names of the synthetic set: what the format's reader returns for it.

    VOC always has the 20 standard classes (only the first ``num_classes`` are drawn).
    """
    _check_format(format)
    if format == "widerface":
        return ["face"]
    if format == "voc":
        return list(VOC_CLASSES)
    return list(SHAPES[: _num_classes(format, num_classes)])


def shape_of_label(format: str, label: int) -> str:
    """The shape drawn for ``label`` (``"face"`` for WiderFace)."""
    _check_format(format)
    return "face" if format == "widerface" else SHAPES[label]


def off_centre_labels(format: str, num_classes: int | None = None) -> list[int]:
    """Labels whose shape has its visual mass off the box centre."""
    if format == "widerface":
        return []
    count = _num_classes(format, num_classes)
    return [label for label in range(count) if SHAPES[label] in OFF_CENTRE_CLASSES]


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")


def _num_classes(format: str, num_classes: int | None) -> int:
    if format == "widerface":
        if num_classes not in (None, 1):
            raise ValueError("WiderFace has one class (face); num_classes must be 1")
        return 1
    count = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    if not 1 <= count <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {count}")
    return count


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _disc(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse((0, 0, w - 1, h - 1), fill=255)


def _ring(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse((0, 0, w - 1, h - 1), fill=255)
    t = 0.28
    d.ellipse((w * t, h * t, (w - 1) * (1 - t), (h - 1) * (1 - t)), fill=0)


def _square(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.rectangle((0, 0, w - 1, h - 1), fill=255)


def _l_shape(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    t = 0.36
    d.rectangle((0, 0, w * t, h - 1), fill=255)
    d.rectangle((0, (h - 1) * (1 - t), w - 1, h - 1), fill=255)


def _diamond(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    cx, cy = (w - 1) / 2, (h - 1) / 2
    d.polygon([(cx, 0), (w - 1, cy), (cx, h - 1), (0, cy)], fill=255)


def _crescent(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.ellipse((0, 0, w - 1, h - 1), fill=255)
    # A slightly flatter disc shifted right leaves a thick left side and two horns; the box
    # centre falls in the bite.
    shift = 0.3 * w
    d.ellipse((shift, 0.1 * h, w - 1 + shift, (h - 1) * 0.9), fill=0)


def _plus(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    t = 1 / 3
    d.rectangle((w * t, 0, (w - 1) * (1 - t), h - 1), fill=255)
    d.rectangle((0, h * t, w - 1, (h - 1) * (1 - t)), fill=255)


def _right_triangle(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    d.polygon([(0, 0), (0, h - 1), (w - 1, h - 1)], fill=255)


def _hexagon(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    q, cy = (w - 1) / 4, (h - 1) / 2
    d.polygon([(q, 0), (3 * q, 0), (w - 1, cy), (3 * q, h - 1), (q, h - 1), (0, cy)], fill=255)


def _u_shape(d: ImageDraw.ImageDraw, w: int, h: int) -> None:
    t = 0.3
    d.rectangle((0, 0, w * t, h - 1), fill=255)
    d.rectangle(((w - 1) * (1 - t), 0, w - 1, h - 1), fill=255)
    d.rectangle((0, (h - 1) * (1 - t), w - 1, h - 1), fill=255)


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, int, int], None]] = {
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "l_shape": _l_shape,
    "diamond": _diamond,
    "crescent": _crescent,
    "plus": _plus,
    "right_triangle": _right_triangle,
    "hexagon": _hexagon,
    "u_shape": _u_shape,
    "face": _disc,  # the face's outline; eyes and mouth are drawn on top
}


def render_mask(shape: str, width: int, height: int) -> np.ndarray:
    """``[height, width]`` bool: the pixels ``shape`` covers when drawn in that cell."""
    mask = Image.new("L", (width, height), 0)
    _DRAWERS[shape](ImageDraw.Draw(mask), width, height)
    return np.asarray(mask) > 0


@dataclass
class DrawnObject:
    """One drawn object: ``box`` is the tight ``x1, y1, x2, y2`` of its pixels (ints,
    continuous 0-based, ``x2`` exclusive) and ``area`` its pixel count."""

    label: int
    box: tuple[int, int, int, int]
    area: int
    flags: dict[str, int] = field(default_factory=dict)


def _jittered(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in colour)


def _draw_shape(
    canvas: Image.Image,
    rng: np.random.Generator,
    shape: str,
    colour: tuple[int, int, int],
    x: int,
    y: int,
    w: int,
    h: int,
) -> tuple[tuple[int, int, int, int], int] | None:
    """Paint ``shape`` in the ``w x h`` cell at ``(x, y)``; its tight box and pixel count."""
    mask = Image.new("L", (w, h), 0)
    _DRAWERS[shape](ImageDraw.Draw(mask), w, h)
    tight = mask.getbbox()
    if tight is None:
        return None
    canvas.paste(_jittered(rng, colour), (x, y, x + w, y + h), mask)
    area = mask.histogram()[255]
    return (x + tight[0], y + tight[1], x + tight[2], y + tight[3]), area


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted gradient or low-frequency noise, with pixel noise and a few thin lines."""
    grey = rng.integers(80, 171)
    low, high = (grey + rng.integers(-20, 21, size=(2, 3))).clip(0, 255)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        pixels = low * (1 - t[..., None]) + high * t[..., None]
    else:
        coarse = (grey + rng.integers(-35, 36, size=(4, 4, 3))).clip(0, 255).astype(np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(smooth, dtype=np.float32)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    image = Image.fromarray((pixels + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(0, 3)):
        points = rng.integers(0, [width, height, width, height]).tolist()
        shade = tuple((grey + rng.integers(-40, 41, size=3)).clip(0, 255).tolist())
        draw.line(points, fill=shade, width=int(rng.integers(1, 3)))
    return image


def _free_position(
    rng: np.random.Generator,
    w: int,
    h: int,
    width: int,
    height: int,
    placed: list[tuple[int, int, int, int]],
    attempts: int = 20,
) -> tuple[int, int] | None:
    """Top-left ``(x, y)`` of a ``w x h`` box inside the image that overlaps no ``placed``
    box, from up to ``attempts`` random tries; None when every try overlaps."""
    for _attempt in range(attempts):
        x = int(rng.integers(0, width - w + 1))
        y = int(rng.integers(0, height - h + 1))
        if not _overlaps((x, y, x + w, y + h), placed):
            return x, y
    return None


def _overlaps(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    margin = 2
    x1, y1, x2, y2 = box
    return any(
        x1 < b[2] + margin and b[0] < x2 + margin and y1 < b[3] + margin and b[1] < y2 + margin
        for b in placed
    )


def _shape_scene(
    rng: np.random.Generator, width: int, height: int, num_classes: int, empty: bool
) -> tuple[Image.Image, list[DrawnObject]]:
    """Background plus 1..6 shapes of 24..160 px (15% of images: 12..20 of 24..48 px)."""
    canvas = _background(rng, width, height)
    if empty:
        return canvas, []
    scale = min(width, height) / 320
    crowded = rng.random() < 0.15
    count = int(rng.integers(12, 21) if crowded else rng.integers(1, 7))
    low, high = (24 * scale, 48 * scale) if crowded else (24 * scale, 160 * scale)
    objects: list[DrawnObject] = []
    cells: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        label = int(rng.integers(num_classes))
        side = math.exp(rng.uniform(math.log(low), math.log(high)))
        aspect = math.exp(rng.uniform(-0.35, 0.35))
        w = int(min(max(round(side * math.sqrt(aspect)), 6), width - 2))
        h = int(min(max(round(side / math.sqrt(aspect)), 6), height - 2))
        position = _free_position(rng, w, h, width, height, cells)
        if position is None:
            continue
        x, y = position
        shape = SHAPES[label]
        drawn = _draw_shape(canvas, rng, shape, COLOURS[shape], x, y, w, h)
        if drawn is None:
            continue
        cells.append((x, y, x + w, y + h))
        objects.append(DrawnObject(label, drawn[0], drawn[1]))
    return canvas, objects


def _face_scene(
    rng: np.random.Generator, width: int, height: int, kind: str
) -> tuple[Image.Image, list[DrawnObject]]:
    """Faces: ``kind`` is ``"none"``, ``"crowd"`` (hundreds of 6..16 px faces on a grid,
    plus a few zero-size annotations) or ``"few"`` (1..12 faces of 16..120 px)."""
    canvas = _background(rng, width, height)
    scale = min(width, height) / 320
    faces: list[DrawnObject] = []
    if kind == "none":
        return canvas, faces
    cells: list[tuple[int, int, int, int]] = []
    if kind == "crowd":
        pitch = max(int(rng.integers(12, 19) * scale), 8)
        for top in range(0, height - pitch + 1, pitch):
            for left in range(0, width - pitch + 1, pitch):
                if rng.random() < 0.3:
                    continue
                h = int(rng.integers(max(pitch // 2, 5), pitch - 1))
                w = max(int(round(h * rng.uniform(0.7, 0.9))), 4)
                x = left + int(rng.integers(0, pitch - w))
                y = top + int(rng.integers(0, pitch - h))
                faces.append(_draw_face(canvas, rng, x, y, w, h))
        for _ in range(int(rng.integers(1, 4))):
            # Zero-size annotations exist in the real data; nothing is drawn for them.
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            zero_w = rng.random() < 0.5
            size = (0, int(rng.integers(1, 8))) if zero_w else (int(rng.integers(1, 8)), 0)
            face = DrawnObject(0, (x, y, x + size[0], y + size[1]), 0)
            face.flags = _face_attributes(rng, size[1])
            faces.append(face)
        return canvas, faces
    for _ in range(int(rng.integers(1, 13))):
        h = int(math.exp(rng.uniform(math.log(16 * scale), math.log(120 * scale))))
        w = max(int(round(h * rng.uniform(0.7, 0.9))), 4)
        position = _free_position(rng, w, h, width, height, cells)
        if position is None:
            continue
        x, y = position
        cells.append((x, y, x + w, y + h))
        faces.append(_draw_face(canvas, rng, x, y, w, h))
    return canvas, faces


def _draw_face(
    canvas: Image.Image, rng: np.random.Generator, x: int, y: int, w: int, h: int
) -> DrawnObject:
    box, area = _draw_shape(canvas, rng, "face", FACE_COLOUR, x, y, w, h)
    draw = ImageDraw.Draw(canvas)
    if h >= 8:  # eyes and mouth stay inside the outline, so the tight box is the outline's
        r = max(w / 12, 0.6)
        for ex in (0.32, 0.68):
            cx, cy = x + ex * (w - 1), y + 0.4 * (h - 1)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(40, 30, 30))
        my = y + 0.72 * (h - 1)
        draw.line((x + 0.36 * (w - 1), my, x + 0.64 * (w - 1), my), fill=(150, 60, 60))
    face = DrawnObject(0, box, area)
    face.flags = _face_attributes(rng, box[3] - box[1])
    return face


def _face_attributes(rng: np.random.Generator, height: int) -> dict[str, int]:
    """WiderFace's per-face columns; blur follows the size as in the real data."""
    return {
        "blur": 0 if height >= 40 else (1 if height >= 16 else 2),
        "expression": int(rng.random() < 0.1),
        "illumination": int(rng.random() < 0.1),
        "invalid": int(rng.random() < 0.03),
        "occlusion": int(rng.choice(3, p=[0.8, 0.15, 0.05])),
        "pose": int(rng.random() < 0.1),
    }


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


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
    _check_format(format)
    count = _num_classes(format, num_classes)
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    if min(width, height) < 64:
        raise ValueError(f"image_size must be at least 64 px, got {width}x{height}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    writer = {
        "coco": _write_coco_split,
        "objects365": _write_objects365_split,
        "voc": _write_voc_split,
        "widerface": _write_widerface_split,
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


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=_JPEG_QUALITY)


def _coco_category_ids(num_classes: int) -> list[int]:
    """1, 2, 4, 5, 7, 8, ...: ids with gaps, like COCO's."""
    return [1 + label + label // 2 for label in range(num_classes)]


def _write_coco_like(
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
        canvas, objects = _shape_scene(rng, width, height, num_classes, empty)
        _save_jpeg(canvas, path)
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


def _write_coco_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    ids = _coco_category_ids(num_classes)
    # Listed in reverse id order: readers must sort by id, not trust the order.
    categories = [
        {"id": ids[label], "name": SHAPES[label], "supercategory": "shape"}
        for label in reversed(range(num_classes))
    ]

    def entry(index: int) -> tuple[int, str, Path]:
        file_name = f"{index:012d}.jpg"
        return 100 + 3 * index, file_name, root / split / file_name

    return _write_coco_like(
        root / "annotations" / f"instances_{split}.json",
        rngs,
        size,
        num_classes,
        categories,
        entry,
        empty_every=10,
    )


def _write_objects365_split(
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
    return _write_coco_like(
        root / "annotations" / annotation_name,
        rngs,
        size,
        num_classes,
        categories,
        entry,
        empty_every=0,
    )


def _write_voc_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    width, height = size
    ids, written = [], []
    for index, rng in enumerate(rngs):
        image_id = f"{split}_{index:06d}"
        canvas, objects = _shape_scene(rng, width, height, num_classes, empty=False)
        _save_jpeg(canvas, root / "JPEGImages" / f"{image_id}.jpg")
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


def _write_widerface_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    width, height = size
    image_dir = root / f"WIDER_{split}" / "images"
    lines: list[str] = []
    entries: list[tuple[str, str, list[DrawnObject]]] = []
    for index, rng in enumerate(rngs):
        event = WIDERFACE_EVENTS[index % len(WIDERFACE_EVENTS)]
        number, word = event.split("--")
        name = f"{number}_{word}_synthetic_{split}_{index}"
        kind = "none" if index % 12 == 11 else ("crowd" if index % 4 == 1 else "few")
        canvas, faces = _face_scene(rng, width, height, kind)
        _save_jpeg(canvas, image_dir / event / f"{name}.jpg")
        lines += [f"{event}/{name}.jpg", str(len(faces))]
        for face in faces:
            x1, y1, x2, y2 = face.box
            columns = [face.flags[key] for key in _FACE_COLUMNS]
            lines.append(" ".join(str(v) for v in (x1, y1, x2 - x1, y2 - y1, *columns)) + " ")
        if not faces:
            lines.append("0 0 0 0 0 0 0 0 0 0 ")
        entries.append((event, name, faces))
    gt_file = root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
    gt_file.parent.mkdir(parents=True, exist_ok=True)
    gt_file.write_text("\n".join(lines) + "\n")
    if split != "train":
        write_widerface_mat(root / "ground_truth", split, entries)
    return [(f"{event}/{name}.jpg", faces) for event, name, faces in entries]


_FACE_COLUMNS = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")


def widerface_settings(faces: list[DrawnObject]) -> dict[str, np.ndarray]:
    """1-based indices of the faces that count in each evaluation setting.

    hard: every valid face of non-zero size; medium: hard faces at least 12 px tall and not
    heavily occluded; easy: medium faces at least 30 px tall, sharp and not occluded.
    """
    hard, medium, easy = [], [], []
    for index, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = face.box
        f = face.flags
        if f["invalid"] or x2 <= x1 or y2 <= y1:
            continue
        hard.append(index)
        if y2 - y1 >= 12 and f["occlusion"] < 2:
            medium.append(index)
            if y2 - y1 >= 30 and f["blur"] == 0 and f["occlusion"] == 0:
                easy.append(index)
    return {
        name: np.asarray(indices, dtype=np.int32).reshape(-1, 1)
        for name, indices in (("easy", easy), ("medium", medium), ("hard", hard))
    }


def write_widerface_mat(
    directory: Path, split: str, entries: list[tuple[str, str, list[DrawnObject]]]
) -> None:
    """The official ground-truth files: ``wider_face_{split}.mat`` with ``event_list``,
    ``file_list``, ``face_bbx_list``, and ``wider_{easy,medium,hard}_{split}.mat`` with
    ``gt_list`` (cell arrays indexed ``[event][0][image][0]`` as the evaluators read them).
    """
    from scipy.io import savemat

    events = list(dict.fromkeys(event for event, _, _ in entries))

    def cells(values: list) -> np.ndarray:
        array = np.empty((len(values), 1), dtype=object)
        for i, value in enumerate(values):
            array[i, 0] = value
        return array

    per_event = {event: [(n, f) for e, n, f in entries if e == event] for event in events}
    file_list = cells([cells([name for name, _ in per_event[e]]) for e in events])
    boxes = cells(
        [
            cells(
                [
                    np.asarray(
                        [(b[0], b[1], b[2] - b[0], b[3] - b[1]) for b in (f.box for f in faces)],
                        dtype=np.float64,
                    ).reshape(-1, 4)
                    for _, faces in per_event[e]
                ]
            )
            for e in events
        ]
    )
    directory.mkdir(parents=True, exist_ok=True)
    _savemat_reproducible(
        savemat,
        directory / f"wider_face_{split}.mat",
        {"event_list": cells(events), "file_list": file_list, "face_bbx_list": boxes},
    )
    for setting in ("easy", "medium", "hard"):
        gt = cells(
            [
                cells([widerface_settings(faces)[setting] for _, faces in per_event[e]])
                for e in events
            ]
        )
        _savemat_reproducible(savemat, directory / f"wider_{setting}_{split}.mat", {"gt_list": gt})


def _savemat_reproducible(savemat: Callable, path: Path, variables: dict) -> None:
    """scipy writes the creation time into the 116-byte MAT header; overwrite it so the same
    data gives the same bytes."""
    savemat(path, variables, do_compression=False)
    data = bytearray(path.read_bytes())
    data[:116] = b"MATLAB 5.0 MAT-file, written by autoassign.data.synthetic".ljust(116)
    path.write_bytes(bytes(data))
