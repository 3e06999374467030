"""SGD with the reference's parameter groups, and the warmup + step learning-rate schedule.

The reference (mmdetection's AutoAssign config, ``paramwise_cfg=dict(norm_decay_mult=0.)``)
excludes only normalisation layers (GroupNorm / BatchNorm weights and biases) from weight
decay. Everything else is decayed, including conv biases, the per-level ``Scale`` scalars and
the center-prior ``mean`` / ``sigma``; we follow it. ``train.prior_lr_mult`` (1 in the
reference) scales the prior's learning rate, for schedules too short to move it.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import torch
from torch import nn

from autoassign.config import TrainConfig
from autoassign.model.center_prior import CenterPrior

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def scaled_lr(train_cfg: TrainConfig, total_batch_size: int) -> float:
    """The linear scaling rule: ``lr * total_batch_size / base_batch_size``."""
    return train_cfg.lr * total_batch_size / train_cfg.base_batch_size


def parameter_groups(
    model: nn.Module, *, weight_decay: float, norm_weight_decay: float, prior_lr_mult: float = 1.0
) -> list[dict]:
    """Trainable parameters split into a decayed group and a normalisation-layer group, and
    with ``prior_lr_mult != 1`` a third, ``prior``: the center prior's ``mean`` and
    ``sigma`` (decayed), whose ``lr_mult`` :meth:`WarmupStepSchedule.apply` applies.

    Shared parameters appear once. Groups with no parameters are left out.
    """
    norm_params: list[nn.Parameter] = []
    prior_params: list[nn.Parameter] = []
    other_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NORM_LAYERS):
            bucket = norm_params
        elif isinstance(module, CenterPrior) and prior_lr_mult != 1.0:
            bucket = prior_params
        else:
            bucket = other_params
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            bucket.append(param)
    groups = [
        {"params": other_params, "weight_decay": weight_decay, "name": "decay"},
        {"params": norm_params, "weight_decay": norm_weight_decay, "name": "norm"},
        {
            "params": prior_params,
            "weight_decay": weight_decay,
            "name": "prior",
            "lr_mult": prior_lr_mult,
        },
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, *, lr: float) -> torch.optim.SGD:
    """SGD with momentum over :func:`parameter_groups`; ``lr`` is the (scaled) peak rate."""
    groups = parameter_groups(
        model,
        weight_decay=train_cfg.weight_decay,
        norm_weight_decay=train_cfg.norm_weight_decay,
        prior_lr_mult=train_cfg.prior_lr_mult,
    )
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum)


@dataclass(frozen=True)
class WarmupStepSchedule:
    """Linear warmup by iterations, then step decay by epochs; a pure function of the iteration.

    ``lr(i) = base_lr * warmup(i) * gamma ** (number of milestones <= i // iters_per_epoch)``
    with ``warmup(i) = warmup_ratio + (1 - warmup_ratio) * i / warmup_iters`` for
    ``i < warmup_iters`` and 1 afterwards. A milestone ``m`` means "after ``m`` epochs": the
    first iteration of epoch index ``m`` (0-based) already runs at the decayed rate.
    """

    base_lr: float
    iters_per_epoch: int
    milestones: tuple[int, ...]
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_ratio: float = 0.001

    def __post_init__(self) -> None:
        if self.iters_per_epoch <= 0:
            raise ValueError(f"iters_per_epoch must be > 0, got {self.iters_per_epoch}")
        object.__setattr__(self, "milestones", tuple(sorted(self.milestones)))

    @classmethod
    def from_config(
        cls, train_cfg: TrainConfig, *, base_lr: float, iters_per_epoch: int
    ) -> WarmupStepSchedule:
        _, milestones = train_cfg.resolved_schedule()
        return cls(
            base_lr=base_lr,
            iters_per_epoch=iters_per_epoch,
            milestones=tuple(milestones),
            gamma=train_cfg.gamma,
            warmup_iters=train_cfg.warmup_iters,
            warmup_ratio=train_cfg.warmup_ratio,
        )

    def lr(self, iteration: int) -> float:
        """The learning rate of the step that runs as global iteration ``iteration`` (0-based)."""
        epoch = iteration // self.iters_per_epoch
        factor = self.gamma ** bisect_right(self.milestones, epoch)
        if iteration < self.warmup_iters:
            progress = iteration / self.warmup_iters
            factor *= self.warmup_ratio + (1.0 - self.warmup_ratio) * progress
        return self.base_lr * factor

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> float:
        """Set every parameter group's lr for ``iteration`` (times the group's ``lr_mult``,
        when it has one); returns the schedule's value."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr
