"""Checkpoint files: what they hold, atomic writing, validated loading, RNG state.

A training checkpoint is a ``torch.save``d dict::

    format            "autoassign-checkpoint"
    version           1
    model             the detector's state_dict (never DDP-wrapped names)
    optimizer         optimizer.state_dict()
    schedule          the schedule's parameters (it is a pure function of the iteration)
    grad_scaler       GradScaler state (fp16) or None
    epoch             the epoch the run is in (0-based)
    batch_in_epoch    batches of that epoch already trained (0 at an epoch boundary)
    iteration         optimizer steps taken so far (global)
    skipped_steps     steps skipped because of a non-finite loss
    rng               python / numpy / torch / cuda generator states
    config            the resolved ExperimentConfig as plain data
    extra             free-form state of callbacks (e.g. a tracking run id)
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoassign.errors import CheckpointError

CHECKPOINT_FORMAT = "autoassign-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "epoch", "iteration")


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

    Raises:
        CheckpointError: the path is not a file, not a torch file, or lacks the keys of a
            checkpoint (e.g. a bare state_dict or another project's file).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
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
