"""Center prior and point grid: hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from autoassign.model.center_prior import CenterPrior
from autoassign.model.points import level_points


def test_level_points_have_no_half_stride_offset():
    points = level_points(2, 3, 8, "cpu")
    expected = [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8]]
    assert points.dtype == torch.float32
    assert points.tolist() == expected
    assert level_points(1, 2, 128, "cpu", torch.float64).tolist() == [[0, 0], [128, 0]]


def test_center_prior_parameters_are_initialised_per_class():
    prior = CenterPrior(3, mean_init=(0.5, -1.0), sigma_init=(2.0, 0.5))
    assert prior.mean.shape == (3, 2) and prior.sigma.shape == (3, 2)
    assert prior.mean.tolist() == [[0.5, -1.0]] * 3
    assert prior.sigma.tolist() == [[2.0, 0.5]] * 3
    assert prior.mean.requires_grad and prior.sigma.requires_grad


@pytest.mark.parametrize("sigma", [(0.0, 1.0), (1.0, -2.0)])
def test_center_prior_rejects_non_positive_sigma(sigma):
    with pytest.raises(ValueError, match="sigma_init must be > 0"):
        CenterPrior(2, sigma_init=sigma)


def gaussian(offset: float, mean: float, sigma: float) -> float:
    return math.exp(-((offset - mean) ** 2) / (2 * sigma**2))


def test_center_prior_values_on_two_strides():
    prior = CenterPrior(2).double()
    with torch.no_grad():
        prior.mean[1] = torch.tensor([0.5, -0.25])
        prior.sigma[1] = torch.tensor([2.0, 0.5])
    # Point (16, 8), box centre (10, 12): offsets in units of the level's stride.
    point, centre = (16.0, 8.0), (10.0, 12.0)
    offsets, expected = [], []
    for stride in (8, 16):
        dx, dy = (point[0] - centre[0]) / stride, (point[1] - centre[1]) / stride
        offsets.append([dx, dy])
        expected.append(gaussian(dx, 0.5, 2.0) * gaussian(dy, -0.25, 0.5))
    values = prior(torch.tensor(offsets, dtype=torch.float64), torch.tensor([1, 1]))
    assert values.tolist() == pytest.approx(expected, rel=1e-12)
    # Stride 8: exp(-0.0625 / 8) * exp(-0.0625 / 0.5); stride 16: exp(-0.015625 / 8) * 1.
    assert expected[0] == pytest.approx(math.exp(-0.0078125 - 0.125))
    assert expected[1] == pytest.approx(math.exp(-0.001953125))
    # Class 0 keeps the initial mean 0, sigma 1.
    value0 = prior(torch.tensor([[0.75, -0.5]], dtype=torch.float64), torch.tensor([0]))
    assert value0.item() == pytest.approx(gaussian(0.75, 0, 1) * gaussian(-0.5, 0, 1))


def test_center_prior_gradients_match_the_gaussian_derivative():
    prior = CenterPrior(2).double()
    with torch.no_grad():
        prior.mean[0] = torch.tensor([0.2, -0.1])
        prior.sigma[0] = torch.tensor([1.5, 0.8])
    offset = torch.tensor([[0.7, 0.3]], dtype=torch.float64)
    value = prior(offset, torch.tensor([0]))
    value.sum().backward()
    dx, dy = 0.7 - 0.2, 0.3 + 0.1
    v = value.item()
    # d/dmean = v * (d - mean) / sigma^2 ; d/dsigma = v * (d - mean)^2 / sigma^3.
    assert prior.mean.grad[0].tolist() == pytest.approx([v * dx / 1.5**2, v * dy / 0.8**2])
    assert prior.sigma.grad[0].tolist() == pytest.approx([v * dx**2 / 1.5**3, v * dy**2 / 0.8**3])
    assert prior.mean.grad[1].tolist() == [0.0, 0.0]


def test_uniform_prior_is_one_everywhere_and_ranks_forced_points_by_its_gaussian():
    prior = CenterPrior(2, mean_init=(0.5, 0.0), kind="uniform")
    offsets = torch.tensor([[0.0, 0.0], [3.0, -2.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 0])
    assert prior(offsets, labels).tolist() == [1.0, 1.0, 1.0]
    assert prior.density(offsets, labels).tolist() == pytest.approx(
        [gaussian(0.0, 0.5, 1.0), gaussian(3.0, 0.5, 1.0) * gaussian(-2.0, 0.0, 1.0), 1.0]
    )
    assert not prior.learnable  # nothing depends on mean and sigma: they are not trained


@pytest.mark.parametrize(
    ("center_prior", "trained"),
    [({}, True), ({"learnable": False}, False), ({"kind": "uniform"}, False)],
)
def test_only_a_learnable_gaussian_prior_moves_in_training(center_prior, trained):
    from autoassign.config import ModelConfig, TrainConfig
    from autoassign.engine.optim import build_optimizer
    from autoassign.model import build_detector

    torch.manual_seed(0)
    config = ModelConfig(
        num_classes=2,
        fpn_channels=64,
        backbone={"depth": 18, "norm": "gn"},
        head={"num_convs": 1},
        center_prior=center_prior,
    )
    model = build_detector(config).train()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), lr=0.05)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    prior = model.head.center_prior
    assert (id(prior.mean) in optimized, id(prior.sigma) in optimized) == (trained, trained)
    before = [prior.mean.detach().clone(), prior.sigma.detach().clone()]
    head_bias = model.head.cls_logits.bias.detach().clone()
    images = [torch.rand(3, 96, 96) * 255]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 60.0]]), "labels": torch.tensor([1])}]
    for _ in range(2):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    moved = [not torch.equal(before[0], prior.mean), not torch.equal(before[1], prior.sigma)]
    assert moved == [trained, trained]
    assert not torch.equal(head_bias, model.head.cls_logits.bias)  # the rest trains
