"""Checkpoints: their directory layout, what they hold, atomic writing, validated loading,
RNG state.

Each checkpoint is a directory of its own holding one file, :data:`CHECKPOINT_FILE`
(a directory is what Ray Train reports and hands back)::

    checkpoints/epoch_0004/checkpoint.pt      after 4 completed epochs
    checkpoints/iter_00000123/checkpoint.pt   a run stopped mid-epoch after 123 iterations
    checkpoints/last/checkpoint.pt            the latest of them (a hard link, else a copy)

Loading accepts a checkpoint directory or the file itself (:func:`resolve_checkpoint_path`).

The file is a ``torch.save``d dict::

    format            "autoassign-checkpoint"
    version           1
    model             the detector's state_dict (never DDP-wrapped names)
    optimizer         optimizer.state_dict()
    grad_scaler       GradScaler state (fp16) or None
    epoch             the epoch the run is in (0-based)
    batch_in_epoch    batches of that epoch already trained (0 at an epoch boundary)
    iteration         optimizer steps taken so far (global)
    skipped_steps     steps skipped because of a non-finite loss
    world_size        processes that trained it (data-parallel ranks)
    iters_per_epoch   iterations per epoch at that world size
    batch_size        images per process and batch
    total_batch_size  batch_size * world_size
    peak_lr           the peak learning rate (linear scaling rule for total_batch_size)
    samples_seen      images of the current epoch consumed over all ranks
                      (batch_in_epoch * batch_size * world_size)
    rng               python / numpy / torch / cuda generator states
    config            the resolved ExperimentConfig as plain data (the lr schedule is a
                      pure function of it and the iteration, so it is not stored)
    class_names       the training set's class names, in label order
    extra             free-form state of callbacks (e.g. a tracking run id)
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoassign.errors import CheckpointError

CHECKPOINT_FORMAT = "autoassign-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "epoch", "iteration")
CHECKPOINT_FILE = "checkpoint.pt"
LAST_DIR = "last"


def epoch_checkpoint_dir(checkpoint_dir: str | Path, epochs_completed: int) -> Path:
    """``checkpoint_dir / "epoch_{N:04d}"``: the checkpoint after ``N`` completed epochs."""
    return Path(checkpoint_dir) / f"epoch_{epochs_completed:04d}"


def iteration_checkpoint_dir(checkpoint_dir: str | Path, iteration: int) -> Path:
    """``checkpoint_dir / "iter_{I:08d}"``: a mid-epoch checkpoint after ``I`` iterations."""
    return Path(checkpoint_dir) / f"iter_{iteration:08d}"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file that ``path`` names: a directory holding :data:`CHECKPOINT_FILE`
    gives that file, a file gives itself.

    Raises:
        CheckpointError: ``path`` does not exist, or is a directory without the file.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / CHECKPOINT_FILE
        if candidate.is_file():
            return candidate
        raise CheckpointError(f"{path}: a directory without a {CHECKPOINT_FILE} checkpoint")
    if path.is_file():
        return path
    raise CheckpointError(f"{path}: no such checkpoint file or directory")


def save_checkpoint_dir(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` as ``directory / CHECKPOINT_FILE`` (atomically); returns ``directory``."""
    directory = Path(directory)
    save_checkpoint(state, directory / CHECKPOINT_FILE)
    return directory


def update_last(checkpoint_dir: str | Path, source: str | Path) -> Path:
    """Make ``checkpoint_dir / "last"`` hold the same checkpoint as directory ``source``.

    The new directory is built beside it and renamed into place, so ``last`` never holds a
    partial file. A directory cannot be renamed over a non-empty one, so the old ``last`` is
    first renamed away; a crash between the two renames leaves no ``last`` (the numbered
    checkpoint directories are intact), never a broken one.
    """
    checkpoint_dir, source = Path(checkpoint_dir), Path(source)
    last = checkpoint_dir / LAST_DIR
    staging = Path(tempfile.mkdtemp(prefix=".last.", suffix=".new", dir=checkpoint_dir))
    try:
        try:
            os.link(source / CHECKPOINT_FILE, staging / CHECKPOINT_FILE)
        except OSError:  # file systems without hard links
            shutil.copyfile(source / CHECKPOINT_FILE, staging / CHECKPOINT_FILE)
        retired = None
        if last.exists():
            retired = Path(tempfile.mkdtemp(prefix=".last.", suffix=".old", dir=checkpoint_dir))
            os.replace(last, retired)  # onto the empty directory just made
        os.replace(staging, last)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return last


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (plus format markers) to ``path`` atomically: a temp file, then rename.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file, or a checkpoint directory holding :data:`CHECKPOINT_FILE`.

    Raises:
        CheckpointError: the path names no checkpoint file, not a torch file, or one that
            lacks the keys of a checkpoint (e.g. a bare state_dict or another project's file).
    """
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types for a file that is not its own
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an autoassign checkpoint (no 'format: {CHECKPOINT_FORMAT}' marker)"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a training step can touch.

    Only tensors and plain Python values, so checkpoints load with ``weights_only=True``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where CUDA is in use)."""
    random.setstate(_as_python_rng_state(state["python"]))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    keys = np.asarray(keys, dtype=np.int64).astype(np.uint32)
    np.random.set_state((kind, keys, int(position), int(has_gauss), float(cached_gaussian)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _as_python_rng_state(state: Any) -> tuple:
    # random.setstate needs tuples all the way down; a round trip through a list loses that.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
