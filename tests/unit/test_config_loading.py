"""Loading ExperimentConfig from YAML: overrides, and errors that name the file and field."""

from pathlib import Path

import pytest
import yaml

from autoassign.config import ExperimentConfig, TrainConfig
from autoassign.config_loading import (
    apply_overrides,
    check_field_path,
    dump_config,
    load_experiment_config,
    load_yaml_model,
    write_resolved_config,
)
from autoassign.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_values_and_overrides_are_applied(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.02\nmodel:\n  num_classes: 3\n")
    cfg = load_experiment_config(
        path,
        [
            "train.lr=0.005",
            "model.backbone.depth=18",
            "model.center_prior.mean_init=[0.5, -0.25]",
            "data.paths.val.images=imgs",
            "train.grad_clip_norm=null",
            "output_dir=runs/x",
        ],
    )
    assert cfg.train.lr == 0.005
    assert cfg.model.num_classes == 3
    assert cfg.model.backbone.depth == 18
    assert cfg.model.center_prior.mean_init == (0.5, -0.25)
    assert cfg.data.paths["val"].images == Path("imgs")
    assert cfg.output_dir == Path("runs/x")


@pytest.mark.parametrize("text", ["", "\n", "# nothing here yet\n  # indented too\n"])
def test_empty_or_comments_only_file_is_an_error_naming_it(tmp_path, text):
    path = write(tmp_path, text, name="empty.yaml")
    with pytest.raises(ConfigError) as excinfo:
        load_experiment_config(path, ["model.num_classes=3"])
    message = str(excinfo.value)
    assert message.startswith(f"{path}: the file is empty")
    assert "model.num_classes" in message


def test_one_key_file_gives_defaults_otherwise(tmp_path):
    # seed 0 is the default, so this is ExperimentConfig() with nothing else set.
    assert load_experiment_config(write(tmp_path, "seed: 0\n")) == ExperimentConfig()


def test_generic_loader_still_reads_an_empty_file_as_defaults(tmp_path):
    assert load_yaml_model(write(tmp_path, ""), TrainConfig) == TrainConfig()


def test_wrong_value_names_file_and_field(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_experiment_config(path)
    assert str(excinfo.value) == f"{path}: train.lr: Input should be greater than 0"


def test_unknown_key_names_its_path(tmp_path):
    path = write(tmp_path, "model:\n  head:\n    num_conv: 2\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: model\.head\.num_conv: Extra inputs"):
        load_experiment_config(path)


def test_every_problem_is_reported(tmp_path):
    path = write(tmp_path, "train: {lr: 0, momentum: 2}\nseed: abc\n")
    with pytest.raises(ConfigError) as excinfo:
        load_experiment_config(path)
    lines = str(excinfo.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["train.lr", "train.momentum", "seed"]


def test_bad_override_value_names_the_override(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    with pytest.raises(ConfigError) as excinfo:
        load_experiment_config(path, ["train.lr=-0.1"])
    message = str(excinfo.value)
    assert message.startswith(f"{path}: train.lr: Input should be greater than 0")
    assert "override 'train.lr=-0.1'" in message


def test_unknown_override_path_is_rejected_naming_it(tmp_path):
    path = write(tmp_path, "seed: 0\n")
    with pytest.raises(ConfigError, match=r"unknown field 'lrate' in train \(known: .*\blr\b"):
        load_experiment_config(path, ["train.lrate=0.1"])
    with pytest.raises(ConfigError, match=r"unknown field 'imgs' in data\.paths\.val"):
        load_experiment_config(path, ["data.paths.val.imgs=x"])
    with pytest.raises(ConfigError, match=r"train\.lr has no sub-fields"):
        load_experiment_config(path, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        load_experiment_config(path, ["train.lr"])


def test_schedule_validator_error_names_the_block(tmp_path):
    path = write(tmp_path, "train:\n  schedule: 2x\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: train: unknown schedule '2x'"):
        load_experiment_config(path)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [0.1\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:\d+:\d+: not valid YAML"):
        load_experiment_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_experiment_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_experiment_config(write(tmp_path, "- 1\n- 2\n"))


def test_apply_overrides_does_not_touch_its_input():
    data = {"train": {"lr": 0.1}}
    result = apply_overrides(data, ["train.lr=0.2", "model.head.num_convs=1"])
    assert data == {"train": {"lr": 0.1}}
    assert result == {"train": {"lr": 0.2}, "model": {"head": {"num_convs": 1}}}


def test_check_field_path_walks_nested_models():
    check_field_path(ExperimentConfig, "model.center_prior.sigma_init")
    check_field_path(ExperimentConfig, "data.paths.anything.annotations")
    with pytest.raises(ConfigError, match="unknown field 'sigma'"):
        check_field_path(ExperimentConfig, "model.center_prior.sigma")


def test_generic_loader_on_another_model(tmp_path):
    path = write(tmp_path, "lr: 0.3\nschedule: 13e\n")
    cfg = load_yaml_model(path, TrainConfig, ["gamma=0.5"])
    assert (cfg.lr, cfg.gamma, cfg.resolved_schedule()) == (0.3, 0.5, (13, [9, 12]))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_experiment_config(write(tmp_path, "seed: 0\n"), ["model.num_classes=7", "seed=3"])
    path = write_resolved_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load(dump_config(cfg))["model"]["num_classes"] == 7
    assert load_experiment_config(path) == cfg


def test_explicit_epochs_need_schedule_null(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  milestones: [2]\n")
    with pytest.raises(ConfigError, match="used only with schedule: null"):
        load_experiment_config(path)
    cfg = load_experiment_config(path, ["train.schedule=null"])
    assert cfg.train.resolved_schedule() == (3, [2])
