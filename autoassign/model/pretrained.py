"""Fetching named ImageNet weights (``msra:R-50``, ``torchvision:IMAGENET1K_V2``) into torch
hub's cache; :mod:`autoassign.weight_names` says what the names mean.

:func:`weights_file` turns ``model.backbone.weights`` into a local file: a path as is, a name
into its file in the cache, downloaded first when it is not there yet.

- ``msra:`` files are downloaded with ``torch.hub.download_url_to_file`` (with a progress bar)
  to a temporary file beside the cache entry, checked, and renamed into place, so nobody ever
  reads half a file. The check is the SHA-256 when one is known
  (:func:`autoassign.weight_names.expected_sha256`); without one, the download must at least
  load into a ResNet of its depth, and its SHA-256 is printed so that it can be pinned.
  A file already in the cache is checked against a known SHA-256 on every use.
- ``torchvision:`` files go through torchvision's weights API
  (``ResNet50_Weights.IMAGENET1K_V2.get_state_dict``), which downloads into the same cache and
  checks the SHA-256 prefix in the file name. A file already there is used as is (as
  torchvision does).

One download per machine: the download holds an exclusive lock (``<cache file>.lock``,
``fcntl.flock``), and whoever waited on it finds the file in place. In a process group,
:func:`fetch_on_main_process_first` lets rank 0 download while the others wait, so that a
trial of 8 workers downloads once.

A download that fails raises :class:`PretrainedWeightsError` (a config error: exit status 2)
naming the URL and the file to place by hand on a machine without internet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from autoassign import distributed as dist_utils
from autoassign.errors import ConfigError
from autoassign.weight_names import (
    BASE_URL_VARIABLE,
    MSRA_FILES,
    MSRA_PREFIX,
    SHA256_VARIABLE,
    cache_path,
    download_url,
    expected_sha256,
    is_weights_name,
    torchvision_weights,
)

__all__ = ["PretrainedWeightsError", "weights_file", "fetch_on_main_process_first"]

# What urllib and torch.hub raise when a download cannot be had: URLError and HTTPError are
# OSErrors, a connection cut mid-file is an HTTPException, a malformed URL a ValueError.
_DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, ValueError)


class PretrainedWeightsError(ConfigError):
    """Named weights that cannot be had: the download failed or its file was refused."""


def weights_file(weights: str | Path, *, depth: int, progress: bool = True) -> Path:
    """The local file of ``model.backbone.weights``: a path as is; a name's file in torch
    hub's cache, downloaded first when missing (see the module docstring). ``depth`` is the
    backbone's: a ``torchvision:`` name means the weights of that depth.

    Raises:
        PretrainedWeightsError: the download failed, or the file fails its check.
    """
    if not is_weights_name(weights):
        return Path(weights)
    name = str(weights)
    if name.startswith(MSRA_PREFIX):
        return _msra_file(name, progress=progress)
    return _torchvision_file(name, depth, progress=progress)


def fetch_on_main_process_first(weights: str | Path | None, *, depth: int) -> None:
    """Rank 0 fetches named ``weights`` into the cache while the other ranks wait; then every
    rank stops if rank 0 failed, with its message. Without a process group: just fetch.

    Call it on every rank before building the model. Ranks on other machines (other caches)
    fetch when they build their model, one of them per machine (the cache's lock).
    """
    if not is_weights_name(weights):
        return
    failure: Exception | None = None
    if dist_utils.is_main_process():
        try:
            weights_file(weights, depth=depth)
        except Exception as error:  # shared with the other ranks before anyone raises
            failure = error
    # The broadcast is the barrier: the other ranks wait here until rank 0 is done.
    message = dist_utils.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise PretrainedWeightsError(f"rank 0 could not fetch {weights}: {message}")


# --------------------------------------------------------------------------------------------
# msra: files
# --------------------------------------------------------------------------------------------


def _msra_file(name: str, *, progress: bool) -> Path:
    file = MSRA_FILES[name[len(MSRA_PREFIX) :]]
    target, url = cache_path(name, file.depth), download_url(name, file.depth)
    try:
        expected, origin = expected_sha256(name)
    except ValueError as error:
        raise PretrainedWeightsError(str(error)) from None
    if target.is_file():
        _check_cached(name, target, expected, origin)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target):
        if target.is_file():  # another process downloaded it while this one waited
            _check_cached(name, target, expected, origin)
            return target
        # The same suffix as the target: the file is read by its suffix (.pkl: a pickle).
        partial = target.with_name(f".partial-{os.getpid()}-{target.name}")
        try:
            print(f"downloading {name} from {url} to {target}", file=sys.stderr)
            try:
                import torch.hub

                torch.hub.download_url_to_file(url, str(partial), progress=progress)
            except _DOWNLOAD_ERRORS as error:
                raise PretrainedWeightsError(_unavailable(name, url, target, error)) from None
            actual = _sha256(partial)
            if expected is not None and actual != expected:
                raise PretrainedWeightsError(
                    f"{name}: the file downloaded from {url} has SHA-256 {actual}, expected "
                    f"{expected} ({origin}); refused, nothing kept in {target.parent}"
                )
            if expected is None:
                _check_loads(name, partial, url)
                print(
                    f"{name}: no SHA-256 to check it against ({origin}); the downloaded file "
                    f"has SHA-256 {actual} (pin it with {SHA256_VARIABLE}={file.filename}="
                    f"{actual})",
                    file=sys.stderr,
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _check_cached(name: str, path: Path, expected: str | None, origin: str) -> None:
    """A cached (or hand-placed) file must have the known SHA-256, when one is known."""
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected:
        raise PretrainedWeightsError(
            f"{name}: {path} has SHA-256 {actual}, expected {expected} ({origin}); delete the "
            "file to download it again, or place the right one there"
        )


def _check_loads(name: str, path: Path, url: str) -> None:
    """Without a checksum, a download must at least be weights of the right ResNet."""
    from autoassign.model.backbone import build_resnet
    from autoassign.model.weights import WeightsError, load_backbone_weights

    depth = MSRA_FILES[name[len(MSRA_PREFIX) :]].depth
    try:
        load_backbone_weights(build_resnet(depth=depth, style="caffe"), path)
    except WeightsError as error:
        raise PretrainedWeightsError(
            f"{name}: the file downloaded from {url} is not ResNet-{depth} weights, refused "
            f"and not kept: {error}"
        ) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# torchvision: files
# --------------------------------------------------------------------------------------------


def _torchvision_file(name: str, depth: int, *, progress: bool) -> Path:
    target = cache_path(name, depth)
    if target.is_file():
        return target
    weights = torchvision_weights(name, depth)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target):
        if target.is_file():
            return target
        print(f"downloading {name} (ResNet-{depth}) from {weights.url}", file=sys.stderr)
        try:
            # torchvision's own API: torch hub downloads beside the target, checks the
            # SHA-256 prefix in the file name, then moves the file into place.
            weights.get_state_dict(progress=progress, check_hash=True)
        except _DOWNLOAD_ERRORS as error:
            raise PretrainedWeightsError(_unavailable(name, weights.url, target, error)) from None
        except RuntimeError as error:
            if "invalid hash value" not in str(error):
                raise
            raise PretrainedWeightsError(
                f"{name}: the file downloaded from {weights.url} was refused by torch hub: "
                f"{error}; nothing kept in {target.parent}"
            ) from None
    return target


# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` exclusively: one download of ``target`` per machine at a time."""
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _unavailable(name: str, url: str, target: Path, error: BaseException) -> str:
    mirror = f", or set {BASE_URL_VARIABLE} to a mirror" if name.startswith(MSRA_PREFIX) else ""
    return (
        f"weights {name}: cannot download {url} ({error}); without internet, download it "
        f"elsewhere and place it at {target}{mirror}"
    )
