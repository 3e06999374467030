"""Image sizes from file headers, without decoding pixels, in the frame the model sees.

JPEG and PNG headers are parsed here (a few hundred bytes read per file); other formats go
through PIL's lazy ``Image.open``, which also reads the header only.

EXIF orientation (JPEG only). A camera that was held sideways stores the pixels as the
sensor read them and records in an EXIF tag (0x0112, values 1-8) how to turn them for
display. Image viewers and annotation tools (labelImg, CVAT, the browser) show the turned
image, so boxes are drawn in that displayed frame, and so is the size a tool records. The
loader therefore decodes JPEGs as displayed (``PIL.ImageOps.exif_transpose``'s
convention), and every size here is the displayed one: for orientations 5-8, which turn the
image by 90 degrees, width and height are the header's swapped. Orientation tags of other
formats (PNG ``eXIf``) are not applied, by these sizes or by the loader.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from autoassign.data.errors import (
    MISSING_IMAGE,
    SIZE_MISMATCH,
    UNREADABLE_IMAGE,
    DatasetError,
    ProblemLog,
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every PNG ends with
_JPEG_END = b"\xff\xd9"
# Start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# Markers without a length field.
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_EXIF_ORIENTATION_TAG = 0x0112
_END_SEARCH_BYTES = 4096
"""How far from a file's end its end marker is looked for (some cameras append a trailer)."""

ORIENTATION_NAMES = {
    1: "as stored",
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed (mirrored and rotated 90 degrees)",
    6: "rotated 90 degrees clockwise",
    7: "transversed (mirrored and rotated 90 degrees)",
    8: "rotated 90 degrees counter-clockwise",
}
"""What each EXIF orientation value does to the stored pixels for display."""


class ImageHeaderError(DatasetError):
    """The file is not an image whose header we can read."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says.

    Attributes:
        format: ``"jpeg"``, ``"png"`` or PIL's name of another format (``"bmp"``, ...).
        stored_width, stored_height: the pixel array's size in the file, in pixels.
        orientation: the EXIF orientation, 1-8 (1 when absent, invalid or not a JPEG).
        end_offset: for JPEG and PNG, the byte offset just past the frame header (``IHDR``,
            start-of-frame): the end marker is only looked for after it, so an embedded
            EXIF thumbnail's is never taken for it; 0 for other formats.
    """

    format: str
    stored_width: int
    stored_height: int
    orientation: int = 1
    end_offset: int = 0

    @property
    def turns_sideways(self) -> bool:
        """The orientation turns the image by 90 degrees (EXIF 5-8): width and height swap."""
        return self.orientation >= 5

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` as displayed, which is what the loader decodes."""
        if self.turns_sideways:
            return self.stored_height, self.stored_width
        return self.stored_width, self.stored_height


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels of the image file at ``path`` as displayed (EXIF
    orientation applied, see the module docstring), from its header.

    Raises:
        FileNotFoundError: no such file.
        ImageHeaderError: not a readable JPEG/PNG (or other PIL-readable) header.
    """
    return read_image_header(path).size


def read_image_header(path: str | Path) -> ImageHeader:
    """The header of the image file at ``path`` (a few hundred bytes read; for a JPEG with
    EXIF or XMP metadata, PIL also parses that segment for the orientation).

    Raises:
        FileNotFoundError: no such file.
        ImageHeaderError: not a readable JPEG/PNG (or other PIL-readable) header.
    """
    with open(path, "rb") as f:
        header = _stream_header(f, path)
    if header is not None:
        return header
    return _pil_header(path)


def header_from_bytes(data: bytes, path: str | Path) -> ImageHeader | None:
    """Like :func:`read_image_header` for a file already read into memory (``path`` only
    names it in messages); None for a format other than JPEG and PNG."""
    return _stream_header(io.BytesIO(data), path)


def _stream_header(f: BinaryIO, path: str | Path) -> ImageHeader | None:
    """The JPEG or PNG header at the start of ``f``; None for other formats."""
    head = f.read(26)
    if head.startswith(_PNG_SIGNATURE):
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ImageHeaderError(f"{path}: truncated PNG header")
        width, height = struct.unpack(">II", head[16:24])
        _check_size(path, width, height)
        return ImageHeader("png", width, height, end_offset=33)
    if head.startswith(b"\xff\xd8"):
        f.seek(2)
        width, height, has_app1 = _jpeg_frame(f, path)
        _check_size(path, width, height)
        end_offset = f.tell()
        orientation = _exif_orientation(f) if has_app1 else 1
        return ImageHeader("jpeg", width, height, orientation, end_offset)
    return None


def _jpeg_frame(f: BinaryIO, path: str | Path) -> tuple[int, int, bool]:
    """Walk the JPEG markers up to the first start-of-frame segment: ``(width, height,
    whether an APP1 segment came before it)``; APP1 holds the EXIF or XMP metadata, where
    an orientation may be."""
    has_app1 = False
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
            return width, height, has_app1
        if length < 2:
            raise ImageHeaderError(f"{path}: corrupt JPEG segment length")
        has_app1 = has_app1 or code == 0xE1
        f.seek(length - 2, 1)


def _exif_orientation(f: BinaryIO) -> int:
    """The EXIF orientation of the JPEG in ``f``, 1 when absent or not 1-8.

    PIL reads it (its lazy open parses the header segments only, about 0.1 ms), so the value
    is the one ``PIL.ImageOps.exif_transpose`` would apply (from the EXIF block, else from
    XMP's ``tiff:Orientation``); metadata PIL cannot parse counts as no orientation, for the
    loader too.
    """
    from PIL import Image

    f.seek(0)
    try:
        with Image.open(f, formats=["JPEG"]) as image:
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unusable
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _pil_header(path: str | Path) -> ImageHeader:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            format = (image.format or "unknown").lower()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageHeaderError(f"{path}: not a readable image ({error})") from error
    _check_size(path, width, height)
    return ImageHeader(format, int(width), int(height))


def _check_size(path: str | Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageHeaderError(f"{path}: header gives an empty image ({width}x{height})")


def has_end_marker(path: str | Path, header: ImageHeader) -> bool:
    """Whether a JPEG or PNG file still has its end marker (JPEG ``FFD9`` after the frame
    header, PNG ``IEND``) within its last few KiB: a file cut short while being written or
    copied has not. True for other formats (not checked)."""
    if header.format not in ("jpeg", "png"):
        return True
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        start = max(header.end_offset, size - _END_SEARCH_BYTES)
        f.seek(start)
        tail = f.read()
    if header.format == "png":
        return tail.endswith(_PNG_END) or b"IEND" in tail
    # Entropy-coded data never holds FF D9 (a data byte FF is always followed by 00).
    return _JPEG_END in tail


def check_image(
    path: Path,
    annotated_size: tuple[int, int] | None,
    log: ProblemLog,
    annotation_file: str | Path,
    where: str,
) -> tuple[int, int] | None:
    """Check that an annotated image exists, is complete and has the annotated size.

    The size compared is the displayed one (EXIF orientation applied, see the module
    docstring). A JPEG or PNG without its end marker is decoded to find out whether it is
    cut short; other damage inside the pixel data is only found by decoding, which training
    does (it then skips the image with a warning).

    Args:
        path: the image file.
        annotated_size: ``(width, height)`` the annotations give, or None when they give none.
        log: receives an error per problem, naming ``annotation_file`` and ``where``.

    Returns:
        The displayed ``(width, height)``, or None when the image is unusable (missing,
        unreadable, truncated, or of another size than annotated).
    """
    try:
        header = read_image_header(path)
        complete = has_end_marker(path, header)
    except FileNotFoundError:
        log.error(MISSING_IMAGE, annotation_file, where, f"image file {path} does not exist")
        return None
    except (ImageHeaderError, OSError) as error:
        log.error(UNREADABLE_IMAGE, annotation_file, where, f"cannot read image {path}: {error}")
        return None
    if not complete:
        reason = _decoding_failure(path)
        if reason is not None:
            log.error(
                UNREADABLE_IMAGE,
                annotation_file,
                where,
                f"cannot decode image {path}: {reason} (its end marker is missing: the file "
                "was probably cut short while being written or copied)",
            )
            return None
    size = header.size
    if annotated_size is not None and tuple(annotated_size) != size:
        log.error(
            SIZE_MISMATCH,
            annotation_file,
            where,
            size_mismatch_message(path, annotated_size, header),
        )
        return None
    return size


def _decoding_failure(path: Path) -> str | None:
    """Why the loader cannot decode ``path``, or None when it can."""
    from autoassign.data.decoding import ImageLoadError, decode_image_file

    try:
        decode_image_file(path)
    except ImageLoadError as error:
        return str(error).removeprefix(f"{path}: ")
    return None


def size_mismatch_message(
    path: str | Path, annotated_size: tuple[int, int], header: ImageHeader
) -> str:
    """Why ``annotated_size`` (width, height) is not the displayed size of ``path``; names
    the EXIF orientation when the annotated size is the image's turned by 90 degrees."""
    annotated_w, annotated_h = annotated_size
    width, height = header.size
    message = (
        f"annotated size {annotated_w}x{annotated_h} differs from the {width}x{height} of {path}"
    )
    if (annotated_w, annotated_h) != (height, width):
        return message
    if header.turns_sideways:
        return (
            f"{message}: the annotated size is the stored pixels' size, but the file's EXIF "
            f"orientation {header.orientation} ({ORIENTATION_NAMES[header.orientation]}) "
            f"turns it to {width}x{height} for display, and images are used as displayed; the "
            "annotation tool probably ignored the orientation. Re-annotate (or re-export) with "
            "a tool that applies it, or remove the orientation tag from the file"
        )
    return (
        f"{message}: the annotated size fits the image only after a turn by 90 degrees, and "
        f"the file has no EXIF orientation that turns it (orientation {header.orientation}, "
        f"{ORIENTATION_NAMES[header.orientation]}); the file was probably rotated, or its "
        "orientation tag removed, after annotation"
    )
