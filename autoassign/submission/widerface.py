"""WiderFace results in the official layout, which the official evaluation tool reads.

One folder per event and one text file per image::

    <out>/0--Parade/0_Parade_marchingband_1_20.txt

    0_Parade_marchingband_1_20          the image's name, without its extension
    2                                   the number of detections
    449.12 330.50 122.00 149.25 0.998   x y w h score, one detection a line, best first
    ...

``x, y`` is a box's top-left corner and ``w, h`` its size, in original-image pixels (the
inverse of the reader's ``x2 = x + w``); scores are the detector's own (the tool normalises
them over the whole set). Every image gets its file, also one with no detection (count 0),
because the tool looks up every image of its ground truth. The event is the folder an image
is in, so images must be named relative to the split's image folder
(``--root WIDER_val/images`` or ``WIDER_test/images``).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from autoassign.eval.base import PredictionStore
from autoassign.submission import SubmissionError


def event_and_stem(name: str) -> tuple[str, str]:
    """``"0--Parade/0_Parade_x_1.jpg"`` -> ``("0--Parade", "0_Parade_x_1")``.

    Raises:
        SubmissionError: the name has no folder (no event).
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if path.parent.name == "":
        raise SubmissionError(
            f"image {name!r} is not inside an event folder: WiderFace results need names like "
            "0--Parade/0_Parade_marchingband_1_20.jpg (give --root the split's images folder)"
        )
    return path.parent.name, path.stem


def check_names(names: list[str]) -> None:
    """Raise :class:`SubmissionError` unless every name has an event and no two images would
    write the same file."""
    seen: dict[tuple[str, str], str] = {}
    for name in names:
        key = event_and_stem(name)
        if key in seen:
            raise SubmissionError(
                f"images {seen[key]!r} and {name!r} would both write {key[0]}/{key[1]}.txt"
            )
        seen[key] = name


def write_widerface(out_dir: str | Path, store: PredictionStore) -> list[Path]:
    """Write one ``<out_dir>/<event>/<stem>.txt`` per image of ``store``; returns the files."""
    out_dir = Path(out_dir)
    check_names(list(store))
    written = []
    for name, predictions in store.items():
        event, stem = event_and_stem(name)
        order = np.argsort(-predictions.scores, kind="stable")
        lines = [stem, str(len(order))]
        for index in order:
            x1, y1, x2, y2 = (float(v) for v in predictions.boxes[index])
            score = float(predictions.scores[index])
            lines.append(f"{x1:.2f} {y1:.2f} {x2 - x1:.2f} {y2 - y1:.2f} {score:.6g}")
        path = out_dir / event / f"{stem}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
    return written
