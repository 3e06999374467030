"""PASCAL VOC: ``Annotations/<id>.xml``, ``ImageSets/Main/{split}.txt``, ``JPEGImages/<id>.jpg``
(or the file the XML's ``<filename>`` names, when it exists there).

XML boxes are 1-based inclusive integer pixels; a box becomes
``(xmin - 1, ymin - 1, xmax, ymax)`` in continuous 0-based pixels (the pixel ``xmax`` ends at
``xmax`` in continuous coordinates). ``difficult`` objects are kept as ignore regions. The
labels are the 20 standard classes in the standard order, or the dataset's own class list
(``classes``, see :mod:`autoassign.data.class_lists`): without a list an object of any other
class is an error, with one it is left out and counted.
VOC 07+12 is two roots: ``DataConfig.root`` plus ``extra_train_roots`` (see ``build_dataset``).
"""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from autoassign.data.class_lists import LeftOutClasses, warn_unused_classes
from autoassign.data.errors import (
    DUPLICATE_ID,
    MALFORMED,
    MISSING_FILE,
    UNKNOWN_CATEGORY,
    DatasetError,
    Problem,
    ProblemLog,
    check_boxes,
)
from autoassign.data.images import check_image
from autoassign.data.records import DetectionDataset, ImageRecord

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def default_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(annotations_dir, image_dir)``; the id list is always ``ImageSets/Main/{split}.txt``."""
    return root / "Annotations", root / "JPEGImages"


def split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def read_voc(
    root: str | Path,
    split: str,
    *,
    annotations_dir: str | Path | None = None,
    image_dir: str | Path | None = None,
    check_images: bool = False,
    problems: ProblemLog | None = None,
    classes: list[str] | None = None,
) -> DetectionDataset:
    """Read the images listed in ``root/ImageSets/Main/{split}.txt``.

    Args:
        root: a VOC year folder (``VOCdevkit/VOC2007``).
        annotations_dir, image_dir: override ``root/Annotations`` and ``root/JPEGImages``.
        check_images: also check every image exists and has the XML's size.
        problems: default a strict log raising :class:`DatasetError` on the first error.
        classes: the class names in label order; default the 20 VOC classes.

    Returns:
        Records with ``image_id`` the id string and ``file_name`` the XML's ``<filename>``
        when that file exists in ``image_dir``, else ``<id>.jpg``; ``meta`` keys
        ``root``, ``image_ids``, ``annotations_dir``, ``image_dir``, ``problems`` and
        ``left_out_classes`` (name -> objects left out because ``classes`` lacks it).
    """
    root = Path(root)
    default_annotations, default_images = default_paths(root, split)
    annotations_dir = Path(annotations_dir) if annotations_dir else default_annotations
    image_dir = Path(image_dir) if image_dir else default_images
    log = problems if problems is not None else ProblemLog()
    class_names = list(classes) if classes is not None else list(VOC_CLASSES)
    label_of = {name: label for label, name in enumerate(class_names)}
    left_out = LeftOutClasses() if classes is not None else None

    records = []
    for image_id in read_split_ids(split_file(root, split), log):
        xml = annotations_dir / f"{image_id}.xml"
        record = _read_annotation(xml, image_id, image_dir, log, label_of, left_out)
        if record is None:
            continue
        if check_images:
            where = f"image id {image_id}"
            size = (record.width, record.height)
            xml = annotations_dir / f"{image_id}.xml"
            if check_image(record.path, size, log, xml, where) is None:
                continue
        records.append(record)
    if classes is not None:
        labels = (int(label) for record in records for label in record.labels)
        warn_unused_classes(class_names, labels, log, annotations_dir)
    return DetectionDataset(
        format="voc",
        split=split,
        records=records,
        class_names=class_names,
        meta={
            "root": root,
            "image_ids": [r.image_id for r in records],
            "annotations_dir": annotations_dir,
            "image_dir": image_dir,
            "problems": log.warnings,
            "left_out_classes": left_out.as_dict() if left_out is not None else {},
        },
    )


def read_split_ids(path: Path, log: ProblemLog) -> list[str]:
    """The image ids of a split file, one per line; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise DatasetError.from_problem(
            Problem("error", MISSING_FILE, str(path), "", "split list does not exist")
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError.from_problem(
            Problem("error", MALFORMED, str(path), "", f"cannot read: {error}")
        ) from error
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            log.error(MALFORMED, path, f"line {number}", f"expected one image id, got {line!r}")
            continue
        image_id = fields[0]
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            log.error(
                MALFORMED,
                path,
                f"line {number}",
                f"{image_id!r} is not a VOC image id "
                "(an id names files in Annotations/ and JPEGImages/, never a folder)",
            )
            continue
        if image_id in first_line:
            log.error(
                DUPLICATE_ID,
                path,
                f"line {number}",
                f"image id {image_id} already listed on line {first_line[image_id]}",
            )
            continue
        first_line[image_id] = number
        ids.append(image_id)
    return ids


def _parse_xml(path: Path) -> ElementTree.Element:
    """The root element of ``path``; DatasetError with the line when malformed."""
    try:
        return ElementTree.parse(path).getroot()
    except FileNotFoundError as error:
        raise DatasetError.from_problem(
            Problem("error", MISSING_FILE, str(path), "", "annotation file does not exist")
        ) from error
    except ElementTree.ParseError as error:
        line = error.position[0]
        raise DatasetError.from_problem(
            Problem("error", MALFORMED, str(path), f"line {line}", f"bad XML: {error}")
        ) from error


def _object_lines(path: Path) -> list[int]:
    """1-based line of each ``<object>`` in ``path``, in order (ElementTree keeps no lines,
    so this re-reads the file; only called when a problem needs a place)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<object[\s>]", text)]


def _text(element: ElementTree.Element | None, tag: str) -> str | None:
    child = element.find(tag) if element is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(float(text)) if text is not None else None
    except ValueError:
        return None


def image_file_name(tree: ElementTree.Element, image_id: str, image_dir: Path) -> str:
    """The image's file name in ``image_dir``: the XML's ``<filename>`` when a file of that
    name is there (annotation tools write ``photo.JPG``, ``scan.png``), else ``<id>.jpg``.

    Only the name's last part counts: labelImg and CVAT sometimes write a folder in front.
    """
    written = _text(tree, "filename")
    if written:
        name = Path(written.replace("\\", "/")).name
        if name and (image_dir / name).is_file():
            return name
    return f"{image_id}.jpg"


def _read_annotation(
    xml: Path,
    image_id: str,
    image_dir: Path,
    log: ProblemLog,
    label_of: dict[str, int],
    left_out: LeftOutClasses | None,
) -> ImageRecord | None:
    """One XML file as a record; None (after logging) when it is unusable.

    ``label_of`` maps class names to labels; an object of another class is counted in
    ``left_out`` when there is a class list (``left_out`` not None), an error otherwise."""
    try:
        tree = _parse_xml(xml)
    except DatasetError as error:
        if log.strict:
            raise
        log.fatal(error)
        return None
    size = tree.find("size")
    width = _int_or_none(_text(size, "width"))
    height = _int_or_none(_text(size, "height"))
    lines: list[int] = []

    def where(index: int) -> str:
        if not lines:
            lines.extend(_object_lines(xml))
        return f"line {lines[index]}" if index < len(lines) else f"object {index + 1}"

    if not width or not height or width <= 0 or height <= 0:
        log.error(MALFORMED, xml, "<size>", "needs <size> with positive width and height")
        return None

    coords: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    kept: list[int] = []  # index among the file's objects, for the messages
    for index, obj in enumerate(tree.findall("object")):
        name = _text(obj, "name")
        if name not in label_of:
            if left_out is not None and name is not None:
                left_out.add(name)
            else:
                log.error(UNKNOWN_CATEGORY, xml, where(index), f"unknown class {name!r}")
            continue
        box = obj.find("bndbox")
        try:
            values = [float(_text(box, k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            log.error(
                MALFORMED, xml, where(index), "needs <bndbox> with numeric xmin ymin xmax ymax"
            )
            continue
        if not all(np.isfinite(values)):
            log.error(MALFORMED, xml, where(index), f"non-finite box {values}")
            continue
        coords.append(values)
        labels.append(label_of[name])
        difficult.append(bool(_int_or_none(_text(obj, "difficult"))))
        kept.append(index)

    one_based = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    xyxy = one_based - np.array([1.0, 1.0, 0.0, 0.0])
    count = len(coords)
    boxes, degenerate = check_boxes(
        xyxy,
        np.full(count, width),
        np.full(count, height),
        log,
        xml,
        lambda i: where(kept[i]),
    )
    file_name = image_file_name(tree, image_id, image_dir)
    return ImageRecord(
        file_name=file_name,
        path=image_dir / file_name,
        width=width,
        height=height,
        boxes=boxes,
        labels=np.asarray(labels, dtype=np.int64),
        ignore=np.asarray(difficult, dtype=bool) | degenerate,
        image_id=image_id,
    )
