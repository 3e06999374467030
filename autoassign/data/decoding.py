"""Decode an image file into the RGB pixels the annotation tool showed.

Every file becomes a ``[3, H, W]`` uint8 RGB tensor (values 0..255), whatever it holds:

* JPEG (decoded by torchvision's libjpeg-turbo): grayscale is replicated to three channels,
  CMYK (and YCCK) is converted to RGB, and the EXIF orientation is applied, so ``H, W`` are
  the displayed size (see :mod:`autoassign.data.images` for the convention and why).
* PNG and every other format PIL reads (BMP, GIF, WebP, TIFF, ...), decoded by PIL:
  grayscale and palette images are expanded to RGB; an image with transparency (an alpha
  channel, or a palette or colour marked transparent) is composited onto white, as a
  browser page or a viewer on a light background shows it; 16-bit images are scaled to
  8 bits, ``round(v * 255 / 65535)`` (65535 -> 255, 257 -> 1; PIL keeps the high byte of
  16-bit colour PNGs). Their orientation tags are not applied.

Anything that stops decoding (missing, truncated or corrupt file) raises
:class:`ImageLoadError` naming the file and the reason.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from autoassign.data.images import ImageHeaderError, header_from_bytes
from autoassign.errors import AutoAssignError

BACKGROUND = 255
"""The grey level (0..255, in every channel) transparent pixels are composited onto: white."""

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
"""PIL modes of 16-bit grayscale (PIL opens a 16-bit gray PNG as ``I;16``, older versions
as ``I``; ``I`` values are read as 16-bit, 0..65535)."""


class ImageLoadError(AutoAssignError, ValueError):
    """An image file is missing, unreadable, or disagrees with its annotation record."""


def decode_image_file(path: str | Path) -> Tensor:
    """Decode the image file at ``path`` into ``[3, H, W]`` uint8 RGB, as displayed.

    Raises:
        ImageLoadError: the file is missing, unreadable or not a decodable image.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ImageLoadError(f"{path}: cannot read image file ({error.strerror})") from None
    if data.startswith(b"\xff\xd8"):
        return _decode_jpeg(data, path)
    return _decode_with_pil(data, path)


def _decode_jpeg(data: bytes, path: str | Path) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        header = header_from_bytes(data, path)
    except ImageHeaderError as error:
        reason = str(error).removeprefix(f"{path}: ")
        raise ImageLoadError(f"{path}: cannot decode image ({reason})") from None
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        image = decode_jpeg(encoded, mode=ImageReadMode.RGB)
    except RuntimeError as error:
        raise ImageLoadError(f"{path}: cannot decode image ({_last_line(error)})") from None
    return apply_orientation(image, header.orientation)


def apply_orientation(image: Tensor, orientation: int) -> Tensor:
    """Turn ``[C, H, W]`` stored pixels into the displayed image of EXIF ``orientation`` 1-8
    (the same turn as ``PIL.ImageOps.exif_transpose``); 5-8 return ``[C, W, H]``.

    The result may be a strided view: making it contiguous would copy every image (torchvision
    decodes into a channels-last buffer), and the resize that follows reads any layout.
    """
    if orientation == 2:
        image = image.flip(-1)
    elif orientation == 3:
        image = image.flip(-1).flip(-2)
    elif orientation == 4:
        image = image.flip(-2)
    elif orientation == 5:
        image = image.transpose(-1, -2)
    elif orientation == 6:
        image = torch.rot90(image, k=-1, dims=(-2, -1))  # clockwise
    elif orientation == 7:
        image = image.transpose(-1, -2).flip(-1).flip(-2)
    elif orientation == 8:
        image = torch.rot90(image, k=1, dims=(-2, -1))  # counter-clockwise
    return image


def _decode_with_pil(data: bytes, path: str | Path) -> Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = rgb_pixels(image)
    # PIL's plugins raise many types for bad files (OSError, SyntaxError, zlib.error, ...);
    # all of them mean this one file cannot be used.
    except Exception as error:  # noqa: BLE001
        reason = str(error) or type(error).__name__
        raise ImageLoadError(f"{path}: cannot decode image ({reason})") from None
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def rgb_pixels(image) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 RGB pixels of a loaded PIL image of any mode (see the module
    docstring for grayscale, palette, transparency and 16-bit images)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    bands = image.getbands()
    if "A" in bands or "a" in bands or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint32)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        composite = (rgb * alpha + BACKGROUND * (255 - alpha) + 127) // 255
        return composite.astype(np.uint8)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def _last_line(error: Exception) -> str:
    # torchvision prefixes its messages with the C++ source location; keep the human part.
    return str(error).strip().splitlines()[-1].split(", ")[-1]
