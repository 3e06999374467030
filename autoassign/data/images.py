"""Image sizes from file headers, without decoding pixels.

JPEG and PNG headers are parsed here (a few hundred bytes read per file); other formats go
through PIL's lazy ``Image.open``, which also reads the header only.
"""

from __future__ import annotations

import struct
from pathlib import Path

from autoassign.data.errors import (
    MISSING_IMAGE,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    DatasetError,
    ProblemLog,
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field.
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class ImageHeaderError(DatasetError):
    """The file is not an image whose header we can read."""


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels of the image file at ``path``, from its header.

    Raises:
        FileNotFoundError: no such file.
        ImageHeaderError: not a readable JPEG/PNG (or other PIL-readable) header.
    """
    with open(path, "rb") as f:
        head = f.read(26)
        if head.startswith(_PNG_SIGNATURE):
            if len(head) < 24 or head[12:16] != b"IHDR":
                raise ImageHeaderError(f"{path}: truncated PNG header")
            width, height = struct.unpack(">II", head[16:24])
            return _checked(path, width, height)
        if head.startswith(b"\xff\xd8"):
            f.seek(2)
            return _checked(path, *_jpeg_size(f, path))
    return _pil_size(path)


def _jpeg_size(f, path: str | Path) -> tuple[int, int]:
    """Walk the JPEG markers up to the first start-of-frame segment."""
    while True:
        byte = f.read(1)
        if not byte:
            raise ImageHeaderError(f"{path}: JPEG ends before its frame header")
        if byte != b"\xff":
            raise ImageHeaderError(f"{path}: corrupt JPEG marker stream")
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            raise ImageHeaderError(f"{path}: JPEG ends before its frame header")
        code = marker[0]
        if code in _JPEG_STANDALONE:
            continue
        if code in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            raise ImageHeaderError(f"{path}: JPEG has no frame header")
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            raise ImageHeaderError(f"{path}: truncated JPEG segment")
        (length,) = struct.unpack(">H", length_bytes)
        if code in _JPEG_SOF:
            frame = f.read(5)
            if len(frame) < 5:
                raise ImageHeaderError(f"{path}: truncated JPEG frame header")
            height, width = struct.unpack(">HH", frame[1:5])
            return width, height
        if length < 2:
            raise ImageHeaderError(f"{path}: corrupt JPEG segment length")
        f.seek(length - 2, 1)


def _pil_size(path: str | Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return _checked(path, *image.size)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageHeaderError(f"{path}: not a readable image ({error})") from error


def _checked(path: str | Path, width: int, height: int) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise ImageHeaderError(f"{path}: header gives an empty image ({width}x{height})")
    return int(width), int(height)


def check_image(
    path: Path,
    annotated_size: tuple[int, int] | None,
    log: ProblemLog,
    annotation_file: str | Path,
    where: str,
) -> tuple[int, int] | None:
    """Check that an annotated image exists, has a readable header and the annotated size.

    Args:
        path: the image file.
        annotated_size: ``(width, height)`` the annotations give, or None when they give none.
        log: receives an error per problem, naming ``annotation_file`` and ``where``.

    Returns:
        The header's ``(width, height)``, or None when the image is unusable (missing,
        unreadable, or of another size than annotated).
    """
    try:
        size = read_image_size(path)
    except FileNotFoundError:
        log.error(MISSING_IMAGE, annotation_file, where, f"image file {path} does not exist")
        return None
    except (ImageHeaderError, OSError) as error:
        log.error(UNREADABLE_IMAGE, annotation_file, where, f"cannot read image {path}: {error}")
        return None
    if annotated_size is not None and tuple(annotated_size) != size:
        log.error(
            SIZE_MISMATCH,
            annotation_file,
            where,
            f"annotated size {annotated_size[0]}x{annotated_size[1]} differs from the "
            f"{size[0]}x{size[1]} of {path}",
        )
        return None
    return size
