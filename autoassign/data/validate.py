"""A fast scan of a dataset split before training: counts, and every problem with its place.

The scan reads the annotations with the normal readers in their collecting mode and checks
each image's header (no pixel decoding): the file exists, is a readable image, still ends
with its end marker (a JPEG or PNG without one is decoded to confirm it is cut short) and has
the size the annotations give, in the displayed frame of an EXIF-rotated JPEG
(:func:`autoassign.data.images.check_image`). It also counts what training will not use,
per rule: the annotations the COCO-style readers leave out
(:data:`autoassign.data.coco.TRAINING_FILTERS`) and, for the training split, the images skipped
(:data:`autoassign.data.building.TRAINING_IMAGE_FILTERS`). Training calls
:func:`scan_dataset` first and refuses to start when :attr:`ScanReport.ok` is False. From the
command line::

    python -m autoassign.data validate --format voc --root data/VOC2007 --split trainval [--json]
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from autoassign.config import DataConfig
from autoassign.data.building import (
    TRAINING_IMAGE_FILTERS,
    count_boxes,
    read_root,
    split_roots,
    training_image_rule,
)
from autoassign.data.coco import TRAINING_FILTERS
from autoassign.data.errors import DatasetError, Problem, ProblemLog, ProblemsBySeverity


@dataclass
class ScanReport(ProblemsBySeverity):
    """What a scan found in one split (with the extra train roots for the training split)."""

    format: str
    split: str
    roots: list[str]
    num_images: int = 0
    images_without_targets: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    """Training boxes (not ignored) per class name."""
    ignored_boxes: int = 0
    filtered_annotations: dict[str, list] = field(default_factory=dict)
    """Per rule of ``TRAINING_FILTERS``, the ids of the annotations the reader left out
    (COCO-style formats only; empty for the others)."""
    filtered_images: dict[str, list] = field(default_factory=dict)
    """Per rule of ``TRAINING_IMAGE_FILTERS``, the ids of the images training skips (the
    training split only; empty for the others)."""
    left_out_classes: dict[str, int] = field(default_factory=dict)
    """Per class name the files use but ``data.classes`` does not list, the annotations
    left out (empty without a class list)."""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Usable for training: no errors (warnings are repaired on reading)."""
        return not self.errors

    @property
    def num_boxes(self) -> int:
        return sum(self.boxes_per_class.values())

    def summary(self, max_per_kind: int = 20) -> str:
        """A readable report; at most ``max_per_kind`` problems of each kind are listed."""
        roots = self.roots[0] + (f" (+ {', '.join(self.roots[1:])})" if len(self.roots) > 1 else "")
        lines = [
            f"{self.format} {self.split} at {roots}",
            f"  images: {self.num_images} ({self.images_without_targets} without training "
            f"boxes), scanned in {self.seconds:.2f} s",
            f"  boxes: {self.num_boxes} for training, {self.ignored_boxes} ignored",
        ]
        if self.boxes_per_class:
            per_class = ", ".join(f"{name}: {n}" for name, n in self.boxes_per_class.items() if n)
            empty = sum(n == 0 for n in self.boxes_per_class.values())
            per_class += f" ({empty} classes without boxes)" if empty else ""
            lines += textwrap.wrap(per_class, 96, initial_indent="    ", subsequent_indent="    ")
        lines += _rule_lines(
            "annotations not used for training (the reference recipe's rules)",
            self.filtered_annotations,
            TRAINING_FILTERS,
        )
        lines += _rule_lines(
            "training images skipped", self.filtered_images, TRAINING_IMAGE_FILTERS
        )
        if self.left_out_classes:
            listed = ", ".join(f"{name}: {n}" for name, n in self.left_out_classes.items())
            lines += textwrap.wrap(
                f"annotations of classes not in data.classes, left out: {listed}",
                96,
                initial_indent="  ",
                subsequent_indent="    ",
            )
        errors = _plural(len(self.errors), "error")
        lines.append(f"  {errors}, {_plural(len(self.warnings), 'warning')}")
        shown: Counter[str] = Counter()
        for problem in self.errors + self.warnings:
            shown[problem.kind] += 1
            if shown[problem.kind] <= max_per_kind:
                lines.append(f"  {problem}")
        for kind, count in shown.items():
            if count > max_per_kind:
                lines.append(f"  ... and {count - max_per_kind} more [{kind}] (--json lists all)")
        lines += [f"  note: {note}" for note in self.notes]
        if self.ok:
            repaired = " (warned boxes are repaired on reading)" if self.warnings else ""
            lines.append(f"  usable{repaired}")
        else:
            lines.append("  NOT usable: fix the errors above")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "split": self.split,
            "roots": self.roots,
            "ok": self.ok,
            "num_images": self.num_images,
            "images_without_targets": self.images_without_targets,
            "num_boxes": self.num_boxes,
            "ignored_boxes": self.ignored_boxes,
            "boxes_per_class": self.boxes_per_class,
            "filtered_annotations": self.filtered_annotations,
            "filtered_images": self.filtered_images,
            "left_out_classes": self.left_out_classes,
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _rule_lines(
    title: str, ids_by_rule: dict[str, list], meanings: dict[str, str], shown_ids: int = 5
) -> list[str]:
    """A title, then one line per rule: its meaning, the count and the first few ids."""
    if not ids_by_rule:
        return []
    lines = [f"  {title}:"]
    for rule, meaning in meanings.items():
        ids = ids_by_rule.get(rule, [])
        line = f"    {meaning}: {len(ids)}"
        if ids:
            listed = ", ".join(str(i) for i in ids[:shown_ids])
            more = ", ..." if len(ids) > shown_ids else ""
            line += f" ({'id' if len(ids) == 1 else 'ids'} {listed}{more})"
        lines.append(line)
    return lines


def scan_dataset(cfg: DataConfig, split: str) -> ScanReport:
    """Scan ``split`` as :func:`autoassign.data.build_dataset` would read it.

    Never raises for bad data: a file that stops its reader (missing, malformed JSON or
    split list) is reported as an error and the other roots are still scanned.
    """
    start = time.perf_counter()
    roots = split_roots(cfg, split)
    report = ScanReport(format=cfg.format, split=split, roots=[str(r) for r in roots])
    log = ProblemLog(strict=False)
    per_class: Counter[str] = Counter()
    class_names: list[str] = []
    for index, root in enumerate(roots):
        try:
            dataset = read_root(
                cfg, root, split, overrides=(index == 0), check_images=True, log=log
            )
        except DatasetError as error:
            log.fatal(error)
            continue
        class_names = class_names or dataset.class_names
        counts, ignored = count_boxes(dataset)
        per_class.update(dict(zip(dataset.class_names, counts.tolist())))
        report.ignored_boxes += ignored
        report.num_images += len(dataset)
        report.images_without_targets += sum(r.num_targets == 0 for r in dataset.records)
        for name, count in dataset.meta.get("left_out_classes", {}).items():
            report.left_out_classes[name] = report.left_out_classes.get(name, 0) + count
        for rule, ids in dataset.meta.get("filtered_annotations", {}).items():
            report.filtered_annotations.setdefault(rule, []).extend(ids)
        if split == cfg.train_split:
            for rule in TRAINING_IMAGE_FILTERS:
                report.filtered_images.setdefault(rule, [])
            for record in dataset.records:
                rule = training_image_rule(record, skip_empty=cfg.skip_empty_train_images)
                if rule is not None:
                    report.filtered_images[rule].append(record.image_id)
    report.boxes_per_class = {name: per_class[name] for name in class_names}
    report.problems = log.problems
    report.notes = log.notes
    report.seconds = time.perf_counter() - start
    return report
