"""Which torch device a process computes on (shared by training and prediction)."""

from __future__ import annotations

import os

import torch

from autoassign.errors import ConfigError


def local_rank() -> int:
    """This process's index among the processes of its machine: ``$LOCAL_RANK`` (set by
    torchrun and Ray Train), 0 when unset."""
    text = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"LOCAL_RANK={text!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"LOCAL_RANK={value} is negative")
    return value


def resolve_device(device: str | torch.device) -> torch.device:
    """The device to compute on, made the current CUDA device when it is a GPU.

    - ``"cpu"``; ``"auto"`` without CUDA: the CPU.
    - ``"auto"`` / ``"cuda"`` with CUDA: ``cuda:{LOCAL_RANK}``, so that each process of a
      machine takes its own GPU.
    - an explicit ``torch.device`` (or a string such as ``"cuda:1"``): used as is.

    Setting the current CUDA device matters beyond this process's tensors: NCCL collectives
    on Python objects (``gather_object``, ``broadcast_object_list``) use it.

    Raises:
        ConfigError: CUDA was asked for but is not available, or ``LOCAL_RANK`` is invalid.
    """
    if isinstance(device, str) and device in ("auto", "cpu", "cuda"):
        if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but CUDA is not available")
        device = torch.device("cuda", local_rank())
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device} was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device
