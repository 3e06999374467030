"""Synthetic images: a textured background with shapes (or faces) placed on it, each with
the tight box of its drawn pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from autoassign.data.synthetic.shapes import (
    _DRAWERS,
    COLOURS,
    FACE_COLOUR,
    SHAPES,
)

_JPEG_QUALITY = 90


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


def shape_scene(
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


def face_scene(
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


def save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=_JPEG_QUALITY)
