"""The config schema: reference defaults, strictness, schedule resolution."""

import pytest
from pydantic import ValidationError

from autoassign.config import ExperimentConfig, ModelConfig, TrainConfig


def test_defaults_are_the_reference_recipe():
    cfg = ExperimentConfig()
    assert cfg.model.head.prior_prob == 0.02
    assert cfg.model.head.reg_bias_init == 4.0
    assert cfg.model.inference.nms_iou == 0.6
    assert cfg.model.inference.score_threshold == 0.05
    assert cfg.model.inference.pre_nms_top_k == 1000
    assert cfg.model.inference.max_detections == 100
    assert (cfg.model.loss.pos_weight, cfg.model.loss.neg_weight) == (0.25, 0.75)
    assert cfg.model.loss.center_weight == 0.75
    assert cfg.model.center_prior.mean_init == (0.0, 0.0)
    assert cfg.model.center_prior.sigma_init == (1.0, 1.0)
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.train.resolved_schedule() == (12, [8, 11])


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ValidationError) as excinfo:
        ExperimentConfig.model_validate({"model": {"head": {"prior_probability": 0.1}}})
    assert ("model", "head", "prior_probability") in [e["loc"] for e in excinfo.value.errors()]


def test_wrong_type_is_rejected():
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"backbone": {"depth": 42}})
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"center_prior": {"sigma_init": [1.0, 0.0]}})


def test_named_and_explicit_schedules():
    assert TrainConfig(schedule="13e").resolved_schedule() == (13, [9, 12])
    explicit = TrainConfig(schedule=None, epochs=5, milestones=[3, 4])
    assert explicit.resolved_schedule() == (5, [3, 4])
    with pytest.raises(ValidationError, match="unknown schedule"):
        TrainConfig(schedule="2x")
    with pytest.raises(ValidationError, match="give both epochs and milestones"):
        TrainConfig(schedule=None, epochs=5)
