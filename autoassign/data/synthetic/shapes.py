"""The synthetic classes: each one fixed shape and colour, drawn as a mask of its box."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from autoassign.data.voc import VOC_CLASSES

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


def class_names(format: str, num_classes: int | None = None) -> list[str]:
    """Class names of the synthetic set: what the format's reader returns for it.

    VOC always has the 20 standard classes (only the first ``num_classes`` are drawn).
    """
    check_format(format)
    if format == "widerface":
        return ["face"]
    if format == "voc":
        return list(VOC_CLASSES)
    return list(SHAPES[: num_classes_of(format, num_classes)])


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known: {', '.join(FORMATS)}")


def num_classes_of(format: str, num_classes: int | None) -> int:
    if format == "widerface":
        if num_classes not in (None, 1):
            raise ValueError("WiderFace has one class (face); num_classes must be 1")
        return 1
    count = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    if not 1 <= count <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {count}")
    return count


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
