"""Datasets: one reader per on-disk format, all returning :class:`DetectionDataset`.

``build_dataset(cfg, split)`` (:mod:`autoassign.data.building`) is the entry point the
training and evaluation code uses; the readers (``read_coco``, ``read_voc``,
``read_objects365``, ``read_widerface``) work alone.

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

from autoassign.data.building import build_dataset, ensure_dataset, read_split
from autoassign.data.coco import read_coco
from autoassign.data.errors import DatasetError, Problem, ProblemLog
from autoassign.data.objects365 import read_objects365
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.voc import VOC_CLASSES, read_voc
from autoassign.data.widerface import read_widerface

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
