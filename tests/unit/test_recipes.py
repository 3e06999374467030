"""Per-dataset recipes: the files in configs/ validate, and a sweep dataset's ``recipe``
applies over ``base`` with the dataset's overrides over it
(orchestration.definition.sweep_config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoassign.config import ExperimentConfig
from autoassign.config_loading import load_experiment_config
from autoassign.errors import ConfigError
from orchestration.definition.config_checks import check_dataset_folders
from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.trial_experiments import trial_experiment

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["coco_r50_1x", "voc0712_r50", "objects365_r50", "widerface_r50"]


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_is_a_valid_experiment_saying_where_its_numbers_come_from(name):
    path = REPO / "configs" / f"{name}.yaml"
    config = load_experiment_config(path)
    assert "Where the numbers come from" in path.read_text()
    assert config.train.resolved_schedule() == (12, [8, 11])
    assert config.model.backbone.weights == "msra:R-50"  # a name: loading it never downloads


def test_the_coco_recipe_is_the_reference_the_library_defaults_to():
    recipe = load_experiment_config(REPO / "configs" / "coco_r50_1x.yaml")
    default = ExperimentConfig()
    for block in ("center_prior", "loss", "inference", "input", "head"):
        assert getattr(recipe.model, block) == getattr(default.model, block), block
    assert recipe.train.model_dump(exclude={"log_every_iters"}) == default.train.model_dump(
        exclude={"log_every_iters"}
    )
    assert "40.4 box AP" in (REPO / "configs" / "coco_r50_1x.yaml").read_text()


def test_widerface_recipe_states_its_limits_and_tiny_face_rule():
    recipe = load_experiment_config(REPO / "configs" / "widerface_r50.yaml")
    assert (
        recipe.model.inference.max_detections
        == 1000
        > ExperimentConfig().model.inference.max_detections
    )
    assert recipe.model.center_prior.force_topk == 9


def test_multi_dataset_trials_follow_their_recipes(tmp_path, monkeypatch):
    for variable in ("COCO_ROOT", "VOC_ROOT", "OBJECTS365_ROOT", "WIDERFACE_ROOT"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    sweep = load_sweep_config(REPO / "configs" / "multi_dataset.yaml")
    trials = {d.name: trial_experiment(sweep, d, {}) for d in sweep.datasets}
    assert (trials["coco"].model.input.min_size, trials["coco"].model.input.max_size) == (800, 1333)
    assert (trials["voc0712"].model.input.min_size, trials["voc0712"].model.input.max_size) == (
        600,
        1000,
    )
    assert trials["widerface"].model.inference.max_detections == 1000
    assert trials["objects365"].model.inference.max_detections == 100
    for name, trial in trials.items():
        # The sweep's own fields come from the dataset entry, not from the recipe.
        dataset = sweep.dataset(name)
        assert trial.data.root == dataset.root and trial.model.num_classes == dataset.num_classes
        assert trial.data.num_workers == 4 and trial.train.log_every_iters == 50  # base
        assert trial.model.backbone.style == "caffe"
    # The recipes' ImageNet weights are fetched before Ray starts: here from a server that
    # cannot be reached (nothing leaves the machine), so the sweep stops, naming the field...
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("AUTOASSIGN_WEIGHTS_BASE_URL", "http://127.0.0.1:9/MSRA")
    with pytest.raises(
        ConfigError,
        match=r"datasets.0 \(coco\): model.backbone.weights msra:R-50 .*: weights msra:R-50: "
        r"cannot download http://127.0.0.1:9/MSRA/R-50.pkl",
    ):
        check_dataset_folders(sweep, source="multi_dataset.yaml")
    # ... and the name travels to the workers as it is, while paths become absolute.
    from orchestration.running.cli import make_paths_absolute

    monkeypatch.chdir(tmp_path)
    make_paths_absolute(sweep)
    assert trial_experiment(sweep, sweep.dataset("coco"), {}).model.backbone.weights == "msra:R-50"
    assert sweep.dataset("coco").root.is_absolute()


def write_sweep(tmp_path: Path, recipe_text: str, dataset_extra: str = "") -> Path:
    (tmp_path / "recipe.yaml").write_text(recipe_text)
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: r\n"
        "base: {train: {lr: 0.5, log_every_iters: 7}, model: {fpn_channels: 32}}\n"
        "datasets:\n"
        "  - {name: a, format: coco, root: data/a, num_classes: 3, synthetic: true,\n"
        f"     recipe: recipe.yaml{dataset_extra}}}\n"
    )
    return path


def test_recipe_over_base_and_overrides_over_recipe(tmp_path):
    recipe = (
        "model: {num_classes: 80, fpn_channels: 64, input: {min_size: 320, max_size: 320}}\n"
        "data: {format: coco, root: elsewhere, batch_size: 3}\n"
        "train: {lr: 0.02}\n"
        "output_dir: runs/not-this\n"
    )
    path = write_sweep(tmp_path, recipe, ", overrides: {model.input.min_size: 256}")
    sweep = load_sweep_config(path)
    (dataset,) = sweep.datasets
    assert dataset.recipe == tmp_path / "recipe.yaml"
    trial = trial_experiment(sweep, dataset, {})
    assert trial.model.fpn_channels == 64 and trial.train.lr == 0.02  # recipe over base
    assert trial.model.input.min_size == 256 and trial.model.input.max_size == 320  # override
    assert trial.train.log_every_iters == 7  # base where the recipe is silent
    assert trial.data.batch_size == 3
    # What the sweep owns never comes from a recipe.
    assert trial.model.num_classes == 3 and trial.data.root == Path("data/a")
    assert trial.output_dir != Path("runs/not-this")


def test_bad_recipes_name_the_dataset_and_file(tmp_path):
    path = write_sweep(tmp_path, "data: {format: voc}\n")
    with pytest.raises(ConfigError, match=r"datasets.0.recipe: .*recipe.yaml is a voc recipe"):
        load_sweep_config(path)
    path = write_sweep(tmp_path, "train: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: train.lr"):
        load_sweep_config(path)
    path.write_text(path.read_text().replace("recipe.yaml", "missing.yaml"))
    with pytest.raises(ConfigError, match=r"datasets.0.recipe: .*missing.yaml does not exist"):
        load_sweep_config(path)
