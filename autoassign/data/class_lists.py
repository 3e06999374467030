"""A dataset's own class list (``DataConfig.classes``): which annotations are classes, in
which label order, and what is left out.

Without a list every reader keeps its format's classes (VOC's 20, every category of a COCO
json). With one, label ``k`` is ``classes[k]``; VOC ``<name>`` s and COCO category ``name`` s
are matched against it as written (COCO names stripped of surrounding spaces, as Objects365's
carry them), and an annotation of a class that is not listed is left out of the records:
neither a training box nor an ignore region, and not scored (evaluation is restricted to the
listed classes). The readers count what they left out per class name
(``meta["left_out_classes"]``) and warn about a listed class that no annotation of the split
uses.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from autoassign.data.errors import ProblemLog

UNUSED_CLASS = "unused_class"
"""Problem kind (a warning): a class of ``data.classes`` that no annotation of the split uses."""


class LeftOutClasses:
    """Counts, per class name as the files write it, the annotations a class list left out."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, name: str) -> None:
        self.counts[name] += 1

    def as_dict(self) -> dict[str, int]:
        """Name -> annotations left out, most first."""
        return dict(self.counts.most_common())


def parse_class_list(text: str) -> list[str]:
    """``"helmet, vest"`` (a command line's ``--classes``) -> ``["helmet", "vest"]``."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return names


def warn_unused_classes(
    classes: Sequence[str], labels: Iterable[int], log: ProblemLog, file: str | Path
) -> None:
    """A warning per listed class that none of ``labels`` (the split's kept annotations'
    labels, indices into ``classes``) uses; ``file`` is where the annotations are."""
    used = np.bincount(np.fromiter(labels, dtype=np.int64), minlength=len(classes))
    for label, name in enumerate(classes):
        if used[label] == 0:
            log.warning(
                UNUSED_CLASS, file, "data.classes", f"no annotation of this split is a {name!r}"
            )
