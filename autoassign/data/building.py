"""Building a split's dataset from a :class:`~autoassign.config.DataConfig`: which roots it
reads (the extra training roots of VOC 07+12), the reader of its format with the configured
paths, the synthetic set written on demand, and the training images left out.

Training images left out, as the reference recipe does (mmdetection's ``filter_cfg``:
``filter_empty_gt=True, min_size=32``), in this order (:data:`TRAINING_IMAGE_FILTERS`; an
image is counted under the first rule it meets):

1. ``no_training_boxes``: the image has no training box (no box at all, or only ignore
   regions), when ``DataConfig.skip_empty_train_images`` (the default);
2. ``small_image``: its width or height is under :data:`MIN_TRAIN_IMAGE_SIDE` (32) pixels.

Only the training split loses images; every other split keeps all of them, so evaluation
sees every image. (Annotations that are not training boxes are left out by the readers
themselves, see :mod:`autoassign.data.coco`.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoassign.config import DataConfig
from autoassign.data import coco, objects365, voc, widerface
from autoassign.data.coco import read_coco
from autoassign.data.errors import DatasetError, ProblemLog
from autoassign.data.objects365 import read_objects365
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.voc import read_voc
from autoassign.data.widerface import read_widerface

MIN_TRAIN_IMAGE_SIDE = 32
"""Training images with a side under this many pixels are skipped (the reference's
``min_size=32``)."""

TRAINING_IMAGE_FILTERS: dict[str, str] = {
    "no_training_boxes": "no training box",
    "small_image": f"a side under {MIN_TRAIN_IMAGE_SIDE} px",
}
"""Rule name -> what it means, in the order the rules are checked (see the module docstring)."""


def build_dataset(cfg: DataConfig, split: str) -> DetectionDataset:
    """The records of ``split`` as ``cfg`` describes them.

    For the training split (``split == cfg.train_split``) the same split of every
    ``cfg.extra_train_roots`` is appended (VOC 07+12), and the images of
    :data:`TRAINING_IMAGE_FILTERS` are dropped (see the module docstring):
    ``meta["skipped_images"]`` maps each rule to the ids of the images it dropped and
    ``meta["skipped_empty"]`` counts those without a training box. Other splits keep every
    image.

    Raises:
        DatasetError: a file is missing or malformed; the message names the file and the
            line or id.
    """
    ensure_dataset(cfg)
    dataset = read_split(cfg, split)
    if split == cfg.train_split:
        skipped: dict[str, list] = {name: [] for name in TRAINING_IMAGE_FILTERS}
        kept = []
        for record in dataset.records:
            rule = training_image_rule(record, skip_empty=cfg.skip_empty_train_images)
            if rule is None:
                kept.append(record)
            else:
                skipped[rule].append(record.image_id)
        dataset.meta["skipped_images"] = skipped
        dataset.meta["skipped_empty"] = len(skipped["no_training_boxes"])
        dataset.records = kept
    return dataset


def training_image_rule(record: ImageRecord, *, skip_empty: bool) -> str | None:
    """The rule of :data:`TRAINING_IMAGE_FILTERS` that leaves ``record`` out of training, or
    None when it trains; ``skip_empty`` is ``DataConfig.skip_empty_train_images``."""
    if skip_empty and record.num_targets == 0:
        return "no_training_boxes"
    if min(record.width, record.height) < MIN_TRAIN_IMAGE_SIDE:
        return "small_image"
    return None


def read_split(
    cfg: DataConfig,
    split: str,
    *,
    check_images: bool = False,
    problems: ProblemLog | None = None,
) -> DetectionDataset:
    """All images of ``split`` (with the extra train roots for the training split).

    ``check_images`` and ``problems`` are passed to the readers (the validator uses them).
    """
    roots = split_roots(cfg, split)
    parts = [
        read_root(cfg, root, split, overrides=(i == 0), check_images=check_images, log=problems)
        for i, root in enumerate(roots)
    ]
    return _concatenate(parts, roots)


def split_roots(cfg: DataConfig, split: str) -> list[Path]:
    """The roots ``split`` is read from: ``cfg.root``, and for the training split every
    ``cfg.extra_train_roots`` after it."""
    roots = [Path(cfg.root)]
    if split == cfg.train_split:
        roots += [Path(root) for root in cfg.extra_train_roots]
    return roots


def ensure_dataset(cfg: DataConfig) -> None:
    """Write a synthetic dataset at ``cfg.root`` if asked to and the root does not exist
    (renamed into place when complete, so concurrent workers never see half of it)."""
    if not cfg.synthesize_if_missing:
        return
    from autoassign.data.synthetic import write_synthetic_root

    write_synthetic_root(
        cfg.format,
        cfg.root,
        splits=tuple(dict.fromkeys((cfg.train_split, cfg.val_split))),
        objects365_version=cfg.objects365_version,
    )


def _resolve(root: Path, path: Path | None, default: Path) -> Path:
    if path is None:
        return default
    return path if path.is_absolute() else root / path


def read_root(
    cfg: DataConfig,
    root: Path,
    split: str,
    *,
    overrides: bool,
    check_images: bool,
    log: ProblemLog | None,
) -> DetectionDataset:
    """One split of one root with its format's reader; ``cfg.paths`` (``overrides``) applies
    to the main root only. ``meta["root"]`` says which root it came from."""
    dataset = _read_with_reader(cfg, root, split, overrides, check_images, log)
    dataset.meta.setdefault("root", root)
    return dataset


def _read_with_reader(cfg, root, split, overrides, check_images, log) -> DetectionDataset:
    override = cfg.paths.get(split) if overrides else None
    annotations = override.annotations if override else None
    images = override.images if override else None
    if cfg.format == "coco":
        default_annotations, default_images = coco.default_paths(root, split)
        return read_coco(
            _resolve(root, annotations, default_annotations),
            _resolve(root, images, default_images),
            split=split,
            check_images=check_images,
            problems=log,
            classes=cfg.classes,
        )
    if cfg.format == "objects365":
        version = cfg.objects365_version
        default_annotations, default_images = objects365.default_paths(root, split, version)
        return read_objects365(
            _resolve(root, annotations, default_annotations),
            _resolve(root, images, default_images),
            version=version,
            split=split,
            check_images=check_images,
            problems=log,
            classes=cfg.classes,
        )
    if cfg.format == "voc":
        default_annotations, default_images = voc.default_paths(root, split)
        return read_voc(
            root,
            split,
            annotations_dir=_resolve(root, annotations, default_annotations),
            image_dir=_resolve(root, images, default_images),
            check_images=check_images,
            problems=log,
            classes=cfg.classes,
        )
    if cfg.format == "widerface":
        default_annotations, default_images = widerface.default_paths(root, split)
        return read_widerface(
            _resolve(root, annotations, default_annotations),
            _resolve(root, images, default_images),
            split=split,
            problems=log,
        )
    raise ValueError(f"unknown dataset format {cfg.format!r}")


def _concatenate(parts: list[DetectionDataset], roots: list[Path]) -> DetectionDataset:
    """One dataset from the same split of several roots (the first one's meta, plus ``roots``)."""
    first = parts[0]
    for root, part in zip(roots[1:], parts[1:]):
        if part.class_names != first.class_names:
            raise DatasetError(
                f"{root}: its classes {part.class_names} differ from those of {roots[0]}"
            )
    if len(parts) == 1:
        first.meta["roots"] = roots
        return first
    meta = dict(first.meta)
    meta["roots"] = roots
    meta["image_ids"] = [record.image_id for part in parts for record in part.records]
    meta["problems"] = [p for part in parts for p in part.meta.get("problems", [])]
    meta["left_out_classes"] = _summed_counts(p.meta.get("left_out_classes", {}) for p in parts)
    if "filtered_annotations" in first.meta:
        meta["filtered_annotations"] = {
            rule: [i for part in parts for i in part.meta["filtered_annotations"].get(rule, [])]
            for rule in first.meta["filtered_annotations"]
        }
    return DetectionDataset(
        format=first.format,
        split=first.split,
        records=[record for part in parts for record in part.records],
        class_names=list(first.class_names),
        meta=meta,
    )


def _summed_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in counts:
        for name, count in part.items():
            total[name] = total.get(name, 0) + count
    return dict(sorted(total.items(), key=lambda item: -item[1]))


def count_boxes(dataset: DetectionDataset) -> tuple[np.ndarray, int]:
    """``([num_classes] training boxes per class, ignored boxes)`` of ``dataset``."""
    per_class = np.zeros(dataset.num_classes, dtype=np.int64)
    ignored = 0
    for record in dataset.records:
        per_class += np.bincount(record.labels[~record.ignore], minlength=dataset.num_classes)
        ignored += int(record.ignore.sum())
    return per_class, ignored
