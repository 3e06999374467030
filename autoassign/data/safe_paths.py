"""Image names from annotation files that stay inside their image folder.

An annotation file names its images (COCO's ``file_name``, a VOC id, a WiderFace path line).
Those names end up in paths the project reads (``image_dir / name``) and writes (drawn
images, submission files, validation samples), so a name that is absolute or climbs out with
``..`` is refused where it is read, with the file and the field named, before anything uses it.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath


def outside_reason(name: str) -> str | None:
    """Why ``name`` would leave the folder it is relative to, or None when it stays inside.

    Both separators count (annotation tools on Windows write ``folder\\image.jpg``).
    """
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    if ".." in posix.parts:
        return "climbs out of the image folder with '..'"
    return None
