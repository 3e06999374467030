"""Datasets: one reader per on-disk format, all returning :class:`DetectionDataset`.

``build_dataset(cfg, split)`` is the entry point the training and evaluation code uses; the
readers (``read_coco``, ``read_voc``, ``read_objects365``, ``read_widerface``) work alone.

Default layouts under ``DataConfig.root`` (``DataConfig.paths[split]`` overrides
``annotations`` and ``images``, relative to the root or absolute):

==========  ==================================================  =============================
format      annotations                                          images
==========  ==================================================  =============================
coco        ``annotations/instances_{split}.json``               ``{split}/``
voc         ``Annotations/`` (ids: ``ImageSets/Main/{split}.txt``) ``JPEGImages/``
objects365  v2 ``annotations/zhiyuan_objv2_{split}.json``        ``{split}/`` (``patchN/NAME``)
            v1 ``annotations/objects365_{split}.json``           ``{split}/``
widerface   ``wider_face_split/wider_face_{split}_bbx_gt.txt``   ``WIDER_{split}/images/``
==========  ==================================================  =============================
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import DataConfig
from . import coco, objects365, voc, widerface
from .coco import read_coco
from .errors import DatasetError, Problem, ProblemLog
from .objects365 import read_objects365
from .records import DetectionDataset, ImageRecord
from .voc import VOC_CLASSES, read_voc
from .widerface import read_widerface

__all__ = [
    "VOC_CLASSES",
    "DatasetError",
    "DetectionDataset",
    "ImageRecord",
    "Problem",
    "ProblemLog",
    "build_dataset",
    "ensure_dataset",
    "read_coco",
    "read_objects365",
    "read_split",
    "read_voc",
    "read_widerface",
]


def build_dataset(cfg: DataConfig, split: str) -> DetectionDataset:
    """The records of ``split`` as ``cfg`` describes them.

    For the training split (``split == cfg.train_split``) the same split of every
    ``cfg.extra_train_roots`` is appended (VOC 07+12), and when
    ``cfg.skip_empty_train_images`` images with no training target (no box, or only ignore
    regions) are dropped; ``meta["skipped_empty"]`` counts them. Other splits keep every image.

    Raises:
        DatasetError: a file is missing or malformed; the message names the file and the
            line or id.
    """
    ensure_dataset(cfg)
    dataset = read_split(cfg, split)
    if split == cfg.train_split and cfg.skip_empty_train_images:
        kept = [record for record in dataset.records if record.num_targets > 0]
        dataset.meta["skipped_empty"] = len(dataset.records) - len(kept)
        dataset.records = kept
    return dataset


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
    roots = [Path(cfg.root)]
    if split == cfg.train_split:
        roots += [Path(root) for root in cfg.extra_train_roots]
    parts = [
        _read_root(cfg, root, split, overrides=(i == 0), check_images=check_images, log=problems)
        for i, root in enumerate(roots)
    ]
    return _concatenate(parts, roots)


def ensure_dataset(cfg: DataConfig) -> None:
    """Write a synthetic dataset at ``cfg.root`` if asked to and the root does not exist.

    Writes into a temporary sibling folder and renames it, so concurrent workers never see
    a half-written dataset.
    """
    root = Path(cfg.root)
    if not cfg.synthesize_if_missing or root.exists():
        return
    from .synthetic import write_synthetic

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        write_synthetic(
            cfg.format,
            staging,
            splits=tuple(dict.fromkeys((cfg.train_split, cfg.val_split))),
            objects365_version=cfg.objects365_version,
        )
        try:
            os.rename(staging, root)
        except OSError:
            if not root.exists():  # lost the race only if another worker made it
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _resolve(root: Path, path: Path | None, default: Path) -> Path:
    if path is None:
        return default
    return path if path.is_absolute() else root / path


def _read_root(
    cfg: DataConfig,
    root: Path,
    split: str,
    *,
    overrides: bool,
    check_images: bool,
    log: ProblemLog | None,
) -> DetectionDataset:
    """One split of one root; ``cfg.paths`` applies to the main root only."""
    dataset = _read_format(cfg, root, split, overrides, check_images, log)
    dataset.meta.setdefault("root", root)
    return dataset


def _read_format(
    cfg: DataConfig,
    root: Path,
    split: str,
    overrides: bool,
    check_images: bool,
    log: ProblemLog | None,
) -> DetectionDataset:
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
    return DetectionDataset(
        format=first.format,
        split=first.split,
        records=[record for part in parts for record in part.records],
        class_names=list(first.class_names),
        meta=meta,
    )


def count_boxes(dataset: DetectionDataset) -> tuple[np.ndarray, int]:
    """``([num_classes] training boxes per class, ignored boxes)`` of ``dataset``."""
    per_class = np.zeros(dataset.num_classes, dtype=np.int64)
    ignored = 0
    for record in dataset.records:
        per_class += np.bincount(record.labels[~record.ignore], minlength=dataset.num_classes)
        ignored += int(record.ignore.sum())
    return per_class, ignored
