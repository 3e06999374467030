"""WiderFace: ``wider_face_split/wider_face_{split}_bbx_gt.txt`` + ``WIDER_{split}/images/``.

The gt file repeats, per image::

    0--Parade/0_Parade_marchingband_1_849.jpg      image path, relative to the images folder
    2                                              number of faces N
    449 330 122 149 0 0 0 0 0 0                    N lines: x1 y1 w h blur expression
    ...                                            illumination invalid occlusion pose

An image with no faces has ``0`` followed by one dummy line of ten zeros, which is not a
face. The attribute columns are in the official order above (torchvision's reader once
mapped them wrongly). Faces with ``invalid=1`` or zero width or height are ignore regions;
all six attributes are kept per face in ``ImageRecord.attributes``. Image sizes come from
the image headers (the gt file has none).

The test split has no ground truth: its ``wider_face_test_filelist.txt`` lists one image path
a line. A file whose lines all name images is read as such a list, giving records without
faces (for prediction), and :func:`default_paths` gives it for a split that has a list but
no gt file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoassign.data.errors import (
    DUPLICATE_ID,
    MALFORMED,
    MISSING_FILE,
    DatasetError,
    Problem,
    ProblemLog,
    check_boxes,
)
from autoassign.data.images import check_image
from autoassign.data.records import DetectionDataset, ImageRecord

ATTRIBUTES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
"""The gt file's columns after ``x1 y1 w h``, in the official order."""

CLASS_NAMES = ["face"]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def default_paths(root: Path, split: str) -> tuple[Path, Path]:
    """``(gt_file, image_dir)`` of a split in the official layout; for a split with no gt
    file but a file list (the test split), the list."""
    gt_file = root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
    file_list = root / "wider_face_split" / f"wider_face_{split}_filelist.txt"
    if not gt_file.exists() and file_list.exists():
        gt_file = file_list
    return gt_file, root / f"WIDER_{split}" / "images"


def read_widerface(
    annotation_file: str | Path,
    image_dir: str | Path,
    *,
    split: str = "",
    problems: ProblemLog | None = None,
) -> DetectionDataset:
    """Read a WiderFace gt file, or a file list (every line an image path: the test split's
    ``wider_face_test_filelist.txt``, whose images get no faces); image sizes are read from
    the image headers.

    Returns:
        Records with ``image_id`` the image's 0-based position in the gt file and
        ``file_name`` its path line; ``attributes`` holds ``[N]`` int64 arrays named by
        :data:`ATTRIBUTES`. ``meta``: ``annotation_file``, ``image_dir``, ``problems``.
    """
    annotation_file = Path(annotation_file)
    image_dir = Path(image_dir)
    log = problems if problems is not None else ProblemLog()
    try:
        lines = annotation_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as error:
        raise DatasetError.from_problem(
            Problem("error", MISSING_FILE, str(annotation_file), "", "gt file does not exist")
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError.from_problem(
            Problem("error", MALFORMED, str(annotation_file), "", f"cannot read: {error}")
        ) from error

    records: list[ImageRecord] = []
    face_lines: list[int] = []  # gt line of every face of ``records``, for the messages
    entries = (
        _list_entries(lines, annotation_file, log)
        if is_file_list(lines)
        else _entries(lines, annotation_file, log)
    )
    for file_name, line_number, faces, lines_of_faces in entries:
        size = check_image(image_dir / file_name, None, log, annotation_file, f"line {line_number}")
        if size is None:
            continue
        records.append(_record(file_name, faces, size, len(records), image_dir))
        face_lines.extend(lines_of_faces)
    # The box checks run once over all faces; each record gets its rows back.
    _check_all_boxes(records, face_lines, annotation_file, log)
    return DetectionDataset(
        format="widerface",
        split=split,
        records=records,
        class_names=list(CLASS_NAMES),
        meta={"annotation_file": annotation_file, "image_dir": image_dir, "problems": log.warnings},
    )


def _is_image_line(line: str) -> bool:
    return line.strip().lower().endswith(_IMAGE_SUFFIXES)


def is_file_list(lines: list[str]) -> bool:
    """True when every non-empty line names an image (a file list, not a gt file: a gt file
    has a face count after each image line)."""
    named = [line for line in lines if line.strip()]
    return bool(named) and all(_is_image_line(line) for line in named)


def _list_entries(lines: list[str], file: Path, log: ProblemLog):
    """Like :func:`_entries` for a file list: each image once, with no faces."""
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            log.error(
                DUPLICATE_ID,
                file,
                f"line {number}",
                f"image {name} already listed on line {seen[name]}",
            )
            continue
        seen[name] = number
        yield name, number, np.zeros((0, 10), dtype=np.int64), []


def _entries(lines: list[str], file: Path, log: ProblemLog):
    """Yield ``(file_name, line_number, faces, face_lines)``: the image's 1-based gt line,
    its faces as ``[N, 10]`` int64 rows and each face's 1-based gt line.

    After a malformed count or face line the parser reports it and resumes at the next line
    that names an image, skipping that image.
    """
    index = 0
    seen: dict[str, int] = {}
    while index < len(lines):
        name = lines[index].strip()
        start = index + 1  # 1-based line number of the image line
        index += 1
        if not name:
            continue
        if not _is_image_line(name):
            log.error(MALFORMED, file, f"line {start}", f"expected an image path, got {name!r}")
            index = _next_image_line(lines, index)
            continue
        if index >= len(lines):
            log.error(MALFORMED, file, f"line {start}", "file ends before the face count")
            return
        try:
            count = int(lines[index].strip())
            if count < 0:
                raise ValueError
        except ValueError:
            log.error(
                MALFORMED,
                file,
                f"line {index + 1}",
                f"expected the face count of {name}, got {lines[index].strip()!r}",
            )
            index = _next_image_line(lines, index + 1)
            continue
        index += 1
        rows: list[list[int]] = []
        face_lines: list[int] = []
        bad = False
        # Zero faces: the format writes one dummy line, which is not a face.
        wanted = count if count > 0 else 1
        for _ in range(wanted):
            if index >= len(lines) or (count == 0 and _is_image_line(lines[index])):
                if count > 0:
                    log.error(
                        MALFORMED, file, f"line {start}", f"file ends before the {count} faces"
                    )
                    bad = True
                break
            fields = lines[index].split()
            try:
                values = [int(float(v)) for v in fields]
                if len(values) != 10:
                    raise ValueError
            except ValueError:
                log.error(
                    MALFORMED,
                    file,
                    f"line {index + 1}",
                    "expected 10 numbers: x1 y1 w h blur expression illumination invalid "
                    f"occlusion pose, got {lines[index].strip()!r}",
                )
                bad = True
                break
            if count > 0:
                rows.append(values)
                face_lines.append(index + 1)
            index += 1
        if bad:
            index = _next_image_line(lines, index)
            continue
        if name in seen:
            log.error(
                DUPLICATE_ID,
                file,
                f"line {start}",
                f"image {name} already listed on line {seen[name]}",
            )
            continue
        seen[name] = start
        faces = np.asarray(rows, dtype=np.int64).reshape(-1, 10)
        yield name, start, faces, face_lines


def _next_image_line(lines: list[str], index: int) -> int:
    while index < len(lines) and not _is_image_line(lines[index]):
        index += 1
    return index


def _record(
    file_name: str,
    faces: np.ndarray,
    size: tuple[int, int],
    image_id: int,
    image_dir: Path,
) -> ImageRecord:
    xywh = faces[:, :4].astype(np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    attributes = {name: faces[:, 4 + k].copy() for k, name in enumerate(ATTRIBUTES)}
    return ImageRecord(
        file_name=file_name,
        path=image_dir / file_name,
        width=size[0],
        height=size[1],
        boxes=boxes,
        labels=np.zeros(len(faces), dtype=np.int64),
        ignore=attributes["invalid"] != 0,
        image_id=image_id,
        attributes=attributes,
    )


def _check_all_boxes(
    records: list[ImageRecord], face_lines: list[int], file: Path, log: ProblemLog
) -> None:
    """Clip faces to their images; zero-size faces become ignore regions (with a warning)."""
    if not records:
        return
    counts = [len(r.boxes) for r in records]
    boxes = np.concatenate([r.boxes for r in records]).reshape(-1, 4)
    widths = np.repeat([r.width for r in records], counts)
    heights = np.repeat([r.height for r in records], counts)
    clipped, degenerate = check_boxes(
        boxes, widths, heights, log, file, lambda i: f"line {face_lines[i]}"
    )
    start = 0
    for record, count in zip(records, counts):
        record.boxes = clipped[start : start + count]
        record.ignore = record.ignore | degenerate[start : start + count]
        start += count
