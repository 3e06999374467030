"""PASCAL VOC results: the devkit's ``comp4_det_<split>_<class>.txt`` files.

One file per class (``comp4``: trained on data of one's own choosing), each line one
detection of that class::

    000004 0.702 13.00 311.00 84.00 362.00      image id, score, xmin ymin xmax ymax

Coordinates are the devkit's 1-based pixels, the inverse of the reader's
(:mod:`autoassign.data.voc`: an XML box becomes ``(xmin - 1, ymin - 1, xmax, ymax)``), so a
box read from an XML file and written back gives the XML's numbers. The image id is the
image's file name without its extension (``JPEGImages/000004.jpg`` -> ``000004``). Every
class gets its file, also one with no detection. For the evaluation server, put them in
``results/VOC2012/Main/`` of the archive.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np

from autoassign.eval.base import PredictionStore
from autoassign.submission import SubmissionError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def image_id(name: str) -> str:
    """``"000004.jpg"`` (or ``"JPEGImages/000004.jpg"``) -> ``"000004"``."""
    return PurePosixPath(name.replace("\\", "/")).stem


def results_file_name(split: str, class_name: str) -> str:
    """``comp4_det_<split>_<class>.txt``.

    Raises:
        SubmissionError: the split or class name is not a plain file-name part (letters,
            digits, ``_ . -``).
    """
    for what, value in (("split", split), ("class name", class_name)):
        if not _PLAIN_NAME.match(value):
            raise SubmissionError(f"VOC results: {what} {value!r} cannot be part of a file name")
    return f"comp4_det_{split}_{class_name}.txt"


def check_names(names: list[str]) -> None:
    """Raise :class:`SubmissionError` when two images have the same id (or an id with a
    space, which would break the devkit's line format)."""
    seen: dict[str, str] = {}
    for name in names:
        key = image_id(name)
        if not key or any(c.isspace() for c in key):
            raise SubmissionError(f"image {name!r}: {key!r} is not a VOC image id")
        if key in seen:
            raise SubmissionError(f"images {seen[key]!r} and {name!r} have the same VOC id {key}")
        seen[key] = name


def write_voc(
    out_dir: str | Path, store: PredictionStore, class_names: list[str], split: str
) -> list[Path]:
    """Write ``<out_dir>/comp4_det_<split>_<class>.txt`` for every class; returns the files.

    Within a file, images come in ``store``'s order and each image's detections best first.
    """
    out_dir = Path(out_dir)
    file_names = [results_file_name(split, name) for name in class_names]
    check_names(list(store))
    lines: list[list[str]] = [[] for _ in class_names]
    for name, predictions in store.items():
        key = image_id(name)
        for index in np.argsort(-predictions.scores, kind="stable"):
            x1, y1, x2, y2 = (float(v) for v in predictions.boxes[index])
            score = float(predictions.scores[index])
            lines[int(predictions.labels[index])].append(
                f"{key} {score:.6g} {x1 + 1:.2f} {y1 + 1:.2f} {x2:.2f} {y2:.2f}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, class_lines in zip(file_names, lines):
        path = out_dir / file_name
        path.write_text("".join(line + "\n" for line in class_lines))
        written.append(path)
    return written
