"""Objects365: COCO-style json, in its v1 and v2 layouts.

* v2: ``annotations/zhiyuan_objv2_{split}.json`` with images in ``{split}/patchN/NAME``;
  the json's ``file_name`` is ``images/v2/patchN/NAME`` and only its last two parts locate
  the file. Three images listed in the v2 json do not exist in the release
  (:data:`KNOWN_MISSING_V2`); when absent they are skipped with a note.
* v1: ``annotations/objects365_{split}.json`` with images in ``{split}/NAME``.

Classes are mapped by sorted category id, never by name: v1's train and val jsons list the
categories in different orders and v2's names carry typos and trailing spaces. A class list
(``classes``) is the exception: it is matched by name, stripped of those spaces. ``iscrowd``
annotations are ignore regions, as for COCO, and the same annotations are left out of the
records as the reference recipe leaves them out of training (an ``ignore`` flag, ``area``
0 or less, a box under 1 px wide or high or outside its image: the rules and their order are
:data:`autoassign.data.coco.TRAINING_FILTERS`, documented in :mod:`autoassign.data.coco`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from autoassign.data.coco import load_json, parse_coco_json
from autoassign.data.errors import ProblemLog
from autoassign.data.records import DetectionDataset

KNOWN_MISSING_V2 = frozenset(
    {
        "patch16/objects365_v2_00908726.jpg",
        "patch6/objects365_v1_00320532.jpg",
        "patch6/objects365_v1_00320534.jpg",
    }
)
"""``patchN/NAME`` of the v2 images the json lists but the release lacks."""


def default_paths(root: Path, split: str, version: int = 2) -> tuple[Path, Path]:
    """``(annotation_file, image_dir)`` of a split in the standard layout of ``version``."""
    if version == 2:
        return root / "annotations" / f"zhiyuan_objv2_{split}.json", root / split
    if version == 1:
        return root / "annotations" / f"objects365_{split}.json", root / split
    raise ValueError(f"Objects365 version must be 1 or 2, got {version!r}")


def image_relative_path(file_name: str, version: int) -> str:
    """Where an image is under the split's image folder, from the json's ``file_name``.

    v2 ``images/v2/patch8/objects365_v2_00420917.jpg`` -> ``patch8/objects365_v2_00420917.jpg``;
    v1 names are already relative.
    """
    if version == 2:
        parts = PurePosixPath(file_name.replace("\\", "/")).parts
        return "/".join(parts[-2:])
    return file_name


def read_objects365(
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    version: int = 2,
    split: str = "",
    check_images: bool = False,
    problems: ProblemLog | None = None,
    classes: list[str] | None = None,
) -> DetectionDataset:
    """Read an Objects365 json of the given layout ``version`` (1 or 2).

    Same contract as :func:`autoassign.data.coco.read_coco`; ``meta`` adds ``version`` and
    ``skipped_missing`` (the known-missing v2 images left out).
    """
    if version not in (1, 2):
        raise ValueError(f"Objects365 version must be 1 or 2, got {version!r}")
    annotation_file = Path(annotation_file)
    image_dir = Path(image_dir)
    log = problems if problems is not None else ProblemLog()
    skipped: list[str] = []

    def skip_known_missing(image: dict, path: Path) -> bool:
        relative = image_relative_path(image["file_name"], version)
        if version == 2 and relative in KNOWN_MISSING_V2 and not path.exists():
            skipped.append(relative)
            return True
        return False

    data = load_json(annotation_file)
    dataset = parse_coco_json(
        data,
        annotation_file,
        image_path=lambda image: image_dir / image_relative_path(image["file_name"], version),
        format_name="objects365",
        split=split,
        log=log,
        check_images=check_images,
        skip_image=skip_known_missing,
        meta={"image_dir": image_dir, "version": version},
        classes=classes,
    )
    dataset.meta["skipped_missing"] = skipped
    for relative in skipped:
        log.note(f"{annotation_file}: skipped {relative}, known to be missing from Objects365 v2")
    return dataset
