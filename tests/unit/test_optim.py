"""Learning-rate schedule values at given iterations, lr scaling, and SGD parameter groups."""

import pytest
import torch
from torch import nn

from autoassign.config import TrainConfig
from autoassign.engine.optim import (
    WarmupStepSchedule,
    build_optimizer,
    parameter_groups,
    scaled_lr,
)


def test_1x_schedule_values():
    # 100 iterations per epoch: warmup over 50 iterations from 0.001x, x0.1 after epochs 8, 11.
    cfg = TrainConfig(lr=0.01, warmup_iters=50, warmup_ratio=0.001, schedule="1x")
    schedule = WarmupStepSchedule.from_config(cfg, base_lr=0.01, iters_per_epoch=100)
    expected = {
        0: 0.01 * 0.001,  # warmup start
        25: 0.01 * (0.001 + 0.999 * 0.5),  # mid-warmup
        49: 0.01 * (0.001 + 0.999 * 49 / 50),  # last warmup step
        50: 0.01,  # end of warmup
        799: 0.01,  # last iteration of epoch index 7 (8th epoch)
        800: 0.001,  # first iteration after milestone 8
        1099: 0.001,
        1100: 0.0001,  # after milestone 11
        1199: 0.0001,  # last iteration of the 12th epoch
    }
    for iteration, lr in expected.items():
        assert schedule.lr(iteration) == pytest.approx(lr, rel=1e-12), iteration


def test_13e_and_explicit_schedules():
    named = WarmupStepSchedule.from_config(
        TrainConfig(schedule="13e", warmup_iters=0), base_lr=0.02, iters_per_epoch=10
    )
    assert [named.lr(i) for i in (89, 90, 119, 120)] == pytest.approx([0.02, 0.002, 0.002, 2e-4])
    explicit = WarmupStepSchedule.from_config(
        TrainConfig(schedule=None, epochs=4, milestones=[3, 1], gamma=0.5, warmup_iters=0),
        base_lr=1.0,
        iters_per_epoch=3,
    )
    assert [explicit.lr(i) for i in range(12)] == pytest.approx([1.0] * 3 + [0.5] * 6 + [0.25] * 3)


def test_warmup_spanning_a_milestone_multiplies_both():
    schedule = WarmupStepSchedule(
        base_lr=1.0,
        iters_per_epoch=2,
        milestones=(1,),
        gamma=0.1,
        warmup_iters=4,
        warmup_ratio=0.5,
    )
    assert schedule.lr(2) == pytest.approx(0.1 * (0.5 + 0.5 * 2 / 4))


def test_apply_sets_every_group():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    optimizer = build_optimizer(model, TrainConfig(), lr=0.01)
    schedule = WarmupStepSchedule(base_lr=0.01, iters_per_epoch=5, milestones=(1,))
    assert schedule.apply(optimizer, 7) == pytest.approx(0.001)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.001, 0.001])


def test_linear_lr_scaling():
    cfg = TrainConfig(lr=0.01, base_batch_size=16)
    assert scaled_lr(cfg, 16) == pytest.approx(0.01)
    assert scaled_lr(cfg, 4) == pytest.approx(0.0025)
    assert scaled_lr(cfg, 2 * 8 * 2) == pytest.approx(0.02)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gn = nn.GroupNorm(4, 8)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_norm_parameters_get_no_weight_decay():
    model = Tiny()
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=1e-4, norm_weight_decay=0)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["norm"]["params"]}
    assert groups["decay"]["weight_decay"] == 1e-4 and groups["norm"]["weight_decay"] == 0
    assert decayed == {id(model.conv.weight), id(model.conv.bias), id(model.scale)}
    assert no_decay == {id(p) for m in (model.gn, model.bn) for p in m.parameters()}


def test_sgd_settings():
    optimizer = build_optimizer(Tiny(), TrainConfig(momentum=0.8, weight_decay=5e-4), lr=0.3)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert all(g["momentum"] == 0.8 and g["lr"] == 0.3 for g in optimizer.param_groups)


def test_the_center_prior_gets_its_own_learning_rate_factor_only_when_asked():
    from autoassign.model.center_prior import CenterPrior

    class WithPrior(Tiny):
        def __init__(self):
            super().__init__()
            self.prior = CenterPrior(3)

    model = WithPrior()
    default = build_optimizer(model, TrainConfig(), lr=0.1)
    assert [g["name"] for g in default.param_groups] == ["decay", "norm"]  # as before
    optimizer = build_optimizer(model, TrainConfig(prior_lr_mult=20.0, weight_decay=1e-4), lr=0.1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {id(p) for p in groups["prior"]["params"]} == {
        id(model.prior.mean),
        id(model.prior.sigma),
    }
    assert groups["prior"]["weight_decay"] == 1e-4  # decayed, like the reference
    schedule = WarmupStepSchedule(base_lr=0.1, iters_per_epoch=10, milestones=(1,))
    assert schedule.apply(optimizer, 3) == pytest.approx(0.1)
    assert groups["decay"]["lr"] == pytest.approx(0.1)
    assert groups["prior"]["lr"] == pytest.approx(2.0)
    schedule.apply(optimizer, 10)  # after the milestone
    assert groups["prior"]["lr"] == pytest.approx(0.2) and groups["norm"]["lr"] == pytest.approx(
        0.01
    )
