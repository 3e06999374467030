"""Problems found in dataset files: the exception readers raise and the log the validator keeps.

Every problem names the file and the place in it (``line 12``, ``image id 5``,
``annotation id 17``, ``object 2``) so a user can open the file and fix it.

Two severities:

* ``error``: the entry is unusable (malformed file or line, missing or unreadable image,
  unknown category, duplicate id, image size disagreeing with the file). A strict reader
  raises :class:`DatasetError` on the first one; the validator collects them all.
* ``warning``: the reader repairs it (a box partly outside the image is clipped, a box with
  non-positive size becomes an ignore region) and goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from autoassign.errors import AutoAssignError

Severity = Literal["error", "warning"]

# Problem kinds, the vocabulary of ``Problem.kind``.
MALFORMED = "malformed"  # unparsable file, line, field or value
MISSING_FILE = "missing_file"  # an annotation file or list the format requires
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
SIZE_MISMATCH = "size_mismatch"  # annotated image size differs from the image file's header
UNKNOWN_CATEGORY = "unknown_category"
UNKNOWN_IMAGE = "unknown_image"  # a COCO annotation pointing at no listed image
DUPLICATE_ID = "duplicate_id"
BOX_OUTSIDE = "box_outside"  # warning: clipped to the image
BOX_SIZE = "box_size"  # warning: non-positive width or height, becomes an ignore region


@dataclass(frozen=True)
class Problem:
    """One problem in one place of one file."""

    severity: Severity
    kind: str
    file: str
    where: str
    message: str

    def __str__(self) -> str:
        place = f"{self.file}: {self.where}" if self.where else self.file
        return f"{self.severity.upper()} [{self.kind}] {place}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class DatasetError(AutoAssignError):
    """Malformed or unusable dataset input; the message names the file and the line or id
    (a reader's first error), or it is the report of a scan that found errors.

    An :class:`~autoassign.errors.AutoAssignError`, so the command-line entry points print it
    without a traceback (exit status 1).
    """

    def __init__(self, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.problem = problem

    @classmethod
    def from_problem(cls, problem: Problem) -> DatasetError:
        place = f"{problem.file}: {problem.where}" if problem.where else problem.file
        return cls(f"{place}: {problem.message}", problem)


class ProblemsBySeverity:
    """``errors`` and ``warnings`` views of a ``problems: list[Problem]`` attribute."""

    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass
class ProblemLog(ProblemsBySeverity):
    """Collects problems while reading.

    With ``strict=True`` (what the readers use by default) the first error raises
    :class:`DatasetError`; warnings are only collected. With ``strict=False`` (the validator)
    errors are collected too and the reader skips the unusable entry and goes on.
    """

    strict: bool = True
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, kind: str, file: str | Path, where: str, message: str) -> None:
        problem = Problem("error", kind, str(file), where, message)
        if self.strict:
            raise DatasetError.from_problem(problem)
        self.problems.append(problem)

    def warning(self, kind: str, file: str | Path, where: str, message: str) -> None:
        self.problems.append(Problem("warning", kind, str(file), where, message))

    def note(self, message: str) -> None:
        """Something the user should know that is neither wrong nor repaired."""
        self.notes.append(message)

    def fatal(self, error: DatasetError) -> None:
        """Record an error that stopped a reader (only reached when not strict)."""
        problem = error.problem or Problem("error", MALFORMED, "", "", str(error))
        self.problems.append(problem)


def check_boxes(
    boxes: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    log: ProblemLog,
    file: str | Path,
    where: Callable[[int], str],
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to their images and flag the ones with no area.

    Args:
        boxes: ``[N, 4]`` float ``x1, y1, x2, y2`` in continuous 0-based pixels.
        widths, heights: ``[N]`` size in pixels of each box's image.
        log: receives one warning per repaired box.
        file: the annotation file, for the messages.
        where: box index -> its place in ``file`` (only called for boxes with a problem,
            so building the string can be slow).

    Returns:
        ``(clipped, degenerate)``: ``[N, 4]`` float32 boxes inside their images with
        ``x2 >= x1`` and ``y2 >= y1``, and ``[N]`` bool, True for boxes of zero width or
        height after clipping (they must become ignore regions).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    widths = np.asarray(widths, dtype=np.float64)
    heights = np.asarray(heights, dtype=np.float64)
    x1, y1, x2, y2 = boxes.T
    non_positive = (x2 <= x1) | (y2 <= y1)
    # A tolerance of a thousandth of a pixel keeps float round-off from raising warnings.
    outside = (x1 < -1e-3) | (y1 < -1e-3) | (x2 > widths + 1e-3) | (y2 > heights + 1e-3)
    clipped = np.empty_like(boxes)
    clipped[:, 0] = np.clip(x1, 0, widths)
    clipped[:, 1] = np.clip(y1, 0, heights)
    clipped[:, 2] = np.maximum(np.clip(x2, 0, widths), clipped[:, 0])
    clipped[:, 3] = np.maximum(np.clip(y2, 0, heights), clipped[:, 1])
    degenerate = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])

    for i in np.flatnonzero(non_positive | outside):
        box = "x1 y1 x2 y2 = " + " ".join(f"{v:g}" for v in boxes[i])
        if non_positive[i]:
            log.warning(
                BOX_SIZE,
                file,
                where(i),
                f"box ({box}) has non-positive width or height: it will be ignored",
            )
        elif degenerate[i]:
            log.warning(
                BOX_OUTSIDE,
                file,
                where(i),
                f"box ({box}) lies outside the {widths[i]:g}x{heights[i]:g} image: "
                "it will be ignored",
            )
        else:
            log.warning(
                BOX_OUTSIDE,
                file,
                where(i),
                f"box ({box}) is partly outside the {widths[i]:g}x{heights[i]:g} image: "
                "it will be clipped",
            )
    return clipped.astype(np.float32), degenerate
