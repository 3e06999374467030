"""The training engine: the one loop (``Trainer``), its callbacks, optimizer and checkpoints."""

from autoassign.engine.callbacks import (
    Callback,
    CallbackList,
    MetricsFileWriter,
    ProgressLogger,
)
from autoassign.engine.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from autoassign.engine.device import resolve_device
from autoassign.engine.optim import WarmupStepSchedule, build_optimizer, scaled_lr
from autoassign.engine.state import TrainState
from autoassign.engine.trainer import Trainer

__all__ = [
    "CHECKPOINT_FILE",
    "Callback",
    "CallbackList",
    "MetricsFileWriter",
    "ProgressLogger",
    "TrainState",
    "Trainer",
    "WarmupStepSchedule",
    "build_optimizer",
    "load_checkpoint",
    "resolve_checkpoint_path",
    "resolve_device",
    "save_checkpoint",
    "scaled_lr",
]
