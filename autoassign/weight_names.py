"""ImageNet backbone weights by name: what ``model.backbone.weights: msra:R-50`` means.

``model.backbone.weights`` is a local file, or one of these names:

- ``msra:R-50``, ``msra:R-101``: MSRA's original caffe ResNets, as detectron2 publishes them
  (``ImageNetPretrained/MSRA/R-50.pkl``, a Caffe2 blob pickle) and as the AutoAssign reference
  trains from. Caffe style: the backbone needs ``style: caffe``. The files come from
  :data:`DEFAULT_MSRA_BASE_URL`, or from the mirror named by ``AUTOASSIGN_WEIGHTS_BASE_URL``.
- ``torchvision:IMAGENET1K_V1``, ``torchvision:IMAGENET1K_V2``: torchvision's ImageNet ResNet
  weights for the backbone's ``depth`` (V2 exists for 50 and 101 only), fetched through
  torchvision's weights API. PyTorch style: the backbone needs ``style: pytorch``.

Any other string is a path, exactly as before names existed. A name whose weights do not fit
the backbone (another depth, the other style, GroupNorm) is a config error naming both.

This module only reads names (it imports no torch, so a config validates quickly);
:mod:`autoassign.model.pretrained` downloads them into torch hub's cache
(``$TORCH_HOME/hub/checkpoints``) and checks what it downloaded.

Checksums (SHA-256, per file). detectron2 publishes no checksum for its ImageNetPretrained
files (its model zoo names them without a hash, unlike its detector checkpoints), and none
could be found from an authoritative source, so :data:`MSRA_FILES` pins none: its ``sha256``
fields are ``None`` until someone records a verified value there. ``AUTOASSIGN_WEIGHTS_SHA256``
supplies the expected value per file name, for a pin of your own, for a mirror and for the
tests: ``AUTOASSIGN_WEIGHTS_SHA256="R-50.pkl=<64 hex digits>,R-101.pkl=<64 hex digits>"``.
A value there replaces the pinned one for that file; the base URL never changes which
checksum applies. torchvision's files carry the first 8 hex digits of their SHA-256 in their
file names, and torch hub checks them on download.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "MSRA_PREFIX",
    "TORCHVISION_PREFIX",
    "BASE_URL_VARIABLE",
    "SHA256_VARIABLE",
    "DEFAULT_MSRA_BASE_URL",
    "MsraFile",
    "MSRA_FILES",
    "is_weights_name",
    "check_weights_name",
    "torchvision_weights",
    "cache_dir",
    "cache_path",
    "download_url",
    "expected_sha256",
]

MSRA_PREFIX = "msra:"
TORCHVISION_PREFIX = "torchvision:"
BASE_URL_VARIABLE = "AUTOASSIGN_WEIGHTS_BASE_URL"
"""Where ``msra:`` files are downloaded from instead of :data:`DEFAULT_MSRA_BASE_URL`."""
SHA256_VARIABLE = "AUTOASSIGN_WEIGHTS_SHA256"
"""Expected SHA-256 per ``msra:`` file name, ``"R-50.pkl=<hex>,R-101.pkl=<hex>"``."""
DEFAULT_MSRA_BASE_URL = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/"


@dataclass(frozen=True)
class MsraFile:
    """One ``msra:`` file: the ResNet depth it holds, its name under the base URL, and its
    pinned SHA-256 (``None``: no authoritative value known, see the module docstring)."""

    depth: int
    filename: str
    sha256: str | None


MSRA_FILES: dict[str, MsraFile] = {
    "R-50": MsraFile(depth=50, filename="R-50.pkl", sha256=None),
    "R-101": MsraFile(depth=101, filename="R-101.pkl", sha256=None),
}
"""``msra:<key>`` -> its file. No published checksum exists for either file (module docstring)."""


def is_weights_name(value: object) -> bool:
    """A ``torchvision:`` or ``msra:`` string; anything else names a file (or nothing)."""
    return isinstance(value, str) and value.startswith((MSRA_PREFIX, TORCHVISION_PREFIX))


def _names_for_depth(depth: int) -> list[str]:
    names = [f"{MSRA_PREFIX}{key}" for key, file in MSRA_FILES.items() if file.depth == depth]
    return names + [f"{TORCHVISION_PREFIX}{key}" for key in _torchvision_keys(depth)]


def _torchvision_enum(depth: int) -> Any:
    """torchvision's ``ResNet<depth>_Weights`` enum (torchvision imported only for these)."""
    from torchvision.models import get_model_weights

    return get_model_weights(f"resnet{depth}")


def _torchvision_keys(depth: int) -> list[str]:
    """torchvision's weight names for ``resnet<depth>``, without the ``DEFAULT`` alias (whose
    meaning changes between torchvision releases)."""
    return [weights.name for weights in _torchvision_enum(depth)]


def check_weights_name(name: str, *, depth: int, style: str, norm: str | None = None) -> None:
    """Raise ``ValueError`` unless the weights ``name`` exist and fit a ResNet backbone of
    this ``depth``, ``style`` and ``norm`` (``None``: not checked); the message names the
    weights and the field."""
    if norm == "gn":
        raise ValueError(
            f"weights {name} hold BatchNorm statistics, which norm 'gn' (GroupNorm) has no "
            "place for; use norm 'frozen_bn' or 'bn', or weights: null"
        )
    if name.startswith(MSRA_PREFIX):
        key = name[len(MSRA_PREFIX) :]
        if key not in MSRA_FILES:
            known = ", ".join(MSRA_PREFIX + k for k in MSRA_FILES)
            raise ValueError(f"unknown weights {name!r}; the MSRA files are {known}")
        if MSRA_FILES[key].depth != depth:
            raise ValueError(
                f"weights {name} are a ResNet-{MSRA_FILES[key].depth} but depth is {depth}; "
                f"set depth: {MSRA_FILES[key].depth}, or name weights of ResNet-{depth}: "
                f"{', '.join(_names_for_depth(depth))}"
            )
        if style != "caffe":
            raise ValueError(
                f"weights {name} are caffe-style (stride in the first 1x1 conv, BGR input minus "
                f"the caffe means) but style is {style!r}; set style: caffe"
            )
        return
    key = name[len(TORCHVISION_PREFIX) :]
    keys = _torchvision_keys(depth)
    if key not in keys:
        raise ValueError(
            f"torchvision has no weights {key!r} for ResNet-{depth} (depth {depth}); "
            f"it has {', '.join(TORCHVISION_PREFIX + k for k in keys)}"
        )
    if style != "pytorch":
        # A caffe-style backbone would load them without complaint (same shapes) and compute
        # something else: the stride sits in another conv and the input is normalised otherwise.
        raise ValueError(
            f"weights {name} are torchvision's, pytorch-style (stride in the 3x3 conv, RGB "
            f"ImageNet-normalised input) but style is {style!r}; set style: pytorch"
        )


def torchvision_weights(name: str, depth: int) -> Any:
    """The torchvision ``WeightsEnum`` member ``torchvision:<key>`` means for ``depth``."""
    return _torchvision_enum(depth)[name[len(TORCHVISION_PREFIX) :]]


def cache_dir() -> Path:
    """torch hub's checkpoints folder (``$TORCH_HOME/hub/checkpoints`` by default), where
    torchvision keeps its downloads too."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def download_url(name: str, depth: int) -> str:
    """Where the file of weights ``name`` is downloaded from."""
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_weights(name, depth).url
    base = os.environ.get(BASE_URL_VARIABLE) or DEFAULT_MSRA_BASE_URL
    return base.rstrip("/") + "/" + MSRA_FILES[name[len(MSRA_PREFIX) :]].filename


def cache_path(name: str, depth: int) -> Path:
    """Where the file of weights ``name`` lives once downloaded (and where to place it by hand
    on a machine without internet): torchvision's own file name for ``torchvision:`` names,
    ``MSRA-R-50.pkl`` and ``MSRA-R-101.pkl`` for ``msra:`` names."""
    if name.startswith(TORCHVISION_PREFIX):
        return cache_dir() / os.path.basename(urlparse(download_url(name, depth)).path)
    return cache_dir() / f"MSRA-{MSRA_FILES[name[len(MSRA_PREFIX) :]].filename}"


def expected_sha256(name: str) -> tuple[str | None, str]:
    """The SHA-256 an ``msra:`` download must have, and where that value comes from.

    ``AUTOASSIGN_WEIGHTS_SHA256`` first (a value for this file name), then the pinned value in
    :data:`MSRA_FILES`; ``(None, why)`` when neither has one. A malformed variable raises
    ``ValueError`` naming it.
    """
    filename = MSRA_FILES[name[len(MSRA_PREFIX) :]].filename
    for entry in filter(None, (os.environ.get(SHA256_VARIABLE) or "").split(",")):
        file, _, value = entry.strip().partition("=")
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(
                f"{SHA256_VARIABLE}: {entry.strip()!r} is not <file name>=<64 hex digits> "
                "(e.g. R-50.pkl=<sha256>), entries separated by commas"
            )
        if file.strip() == filename:
            return value, f"from {SHA256_VARIABLE}"
    pinned = MSRA_FILES[name[len(MSRA_PREFIX) :]].sha256
    if pinned is not None:
        return pinned, "pinned in autoassign.weight_names.MSRA_FILES"
    return None, f"none pinned for {filename} and none in {SHA256_VARIABLE}"
