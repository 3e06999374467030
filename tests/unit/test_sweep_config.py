"""The sweep configuration and ``python -m orchestration.sweep CONFIG --dry-run``, without Ray.

Every bad sweep file exits 2 with ``error: <file>: <field.path>: <message>`` on stderr, no
traceback, nothing written (the sweep's ``output_dir`` is never created) and no Ray started.
A dry run of a good file prints the trial plan and also writes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autoassign.data.synthetic import write_synthetic
from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.trial_experiments import trial_experiment

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
RAY_STARTUP = ("Started a local Ray instance", "Starting Ray", "ray.init")

# A valid sweep of one synthetic COCO set (its folder is only written when the sweep runs).
GOOD = """\
name: t
datasets:
  - {name: coco, format: coco, root: data/coco, num_classes: 6, synthetic: true}
output_dir: out
"""


def sweep_cli(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
        **(env or {}),
    }
    # Where a sweep would go must come from the file, not from the test machine's shell.
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AUTOASSIGN_TEST_UNSET_VAR"):
        if env is None or name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "orchestration.sweep", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_no_ray(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    for text in RAY_STARTUP:
        assert text not in output


def bad_config(
    tmp_path: Path,
    text: str,
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "bad.yaml",
) -> str:
    """Run a dry run of ``text`` (output_dir ``out``); check the error contract; its stderr."""
    (tmp_path / name).write_text(text)
    result = sweep_cli(name, *args, "--dry-run", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {name}"), result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()
    assert_no_ray(result)
    return result.stderr


@pytest.fixture(scope="module")
def real_coco(tmp_path_factory) -> Path:
    """A real (on-disk) synthetic COCO set: 8 train images, 6 classes."""
    root = tmp_path_factory.mktemp("real") / "coco"
    write_synthetic("coco", root, num_images=8, image_size=64)
    return root


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line(tmp_path):
    message = bad_config(tmp_path, "name: t\ndatasets: [\n  {name: coco\nsearch: {}\n")
    assert "bad.yaml:4:" in message
    assert "not valid YAML" in message


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n\n"])
def test_empty_file(tmp_path, text):
    message = bad_config(tmp_path, text)
    assert "bad.yaml: the file is empty" in message


def test_unknown_top_level_key(tmp_path):
    message = bad_config(tmp_path, GOOD + "serch: {num_samples: 2}\n")
    assert "bad.yaml: serch: Extra inputs are not permitted" in message


def test_unknown_nested_key(tmp_path):
    message = bad_config(tmp_path, GOOD + "search:\n  schedulr: {type: asha}\n")
    assert "bad.yaml: search.schedulr: Extra inputs are not permitted" in message


def test_wrong_type(tmp_path):
    message = bad_config(tmp_path, GOOD + "resources:\n  workers_per_trial: two\n")
    assert "bad.yaml: resources.workers_per_trial: Input should be a valid integer" in message


def test_a_trial_that_trains_in_its_own_process_has_one_worker(tmp_path):
    text = GOOD + "resources:\n  workers_per_trial: 2\n  runner: trial\n"
    message = bad_config(tmp_path, text)
    assert "bad.yaml: resources: runner 'trial' trains in the trial's own process" in message
    assert "workers_per_trial is 2" in message
    message = bad_config(tmp_path, GOOD + "resources:\n  runner: workers\n")
    assert "bad.yaml: resources.runner: Input should be 'ray_train' or 'trial'" in message


def test_what_a_trial_asks_of_ray_follows_where_it_trains():
    from orchestration.definition.sweep_config import SweepConfig
    from orchestration.running.tune_run import DRIVER_RESOURCES, trial_resources

    config = yaml.safe_load(GOOD)
    config["resources"] = {"cpus_per_worker": 2, "gpus_per_worker": 0.5}
    assert trial_resources(SweepConfig.model_validate(config)) == DRIVER_RESOURCES
    config["resources"]["runner"] = "trial"
    assert trial_resources(SweepConfig.model_validate(config)) == {"cpu": 2, "gpu": 0.5}


def test_search_key_naming_no_field_lists_the_known_ones(tmp_path):
    text = GOOD + "search_space:\n  model.center_prior.sigma_int: {grid: [1.0, 2.0]}\n"
    message = bad_config(tmp_path, text)
    assert "bad.yaml: search_space.model.center_prior.sigma_int: unknown field" in message
    assert "'sigma_int'" in message
    assert "known: " in message and "sigma_init" in message and "mean_init" in message


@pytest.mark.parametrize(
    ("key", "distribution", "fragment"),
    [
        ("model.center_prior.sigma_init", "{grid: [1.0, -1.0]}", "sigma_init must be > 0"),
        ("model.head.prior_prob", "{uniform: [0.0, 2.0]}", "model.head.prior_prob"),
    ],
)
def test_sampled_value_the_experiment_schema_rejects(tmp_path, key, distribution, fragment):
    message = bad_config(tmp_path, GOOD + f"search_space:\n  {key}: {distribution}\n")
    assert f"bad.yaml: search_space.{key}: " in message
    assert fragment in message
    assert "on dataset 'coco'" in message


@pytest.mark.parametrize(
    ("distribution", "fragment"),
    [
        ("{grid: [1], uniform: [0, 1]}", "(got grid, uniform)"),
        ("{}", "give exactly one of grid, choice, uniform, loguniform, randint"),
    ],
)
def test_distribution_needs_exactly_one_kind(tmp_path, distribution, fragment):
    text = GOOD + f"search_space:\n  model.head.prior_prob: {distribution}\n"
    message = bad_config(tmp_path, text)
    assert "bad.yaml: search_space.model.head.prior_prob" in message
    assert "give exactly one of" in message
    assert fragment in message


def test_missing_dataset_folder_with_an_unset_variable(tmp_path):
    text = (
        "name: t\ndatasets:\n"
        "  - {name: coco, format: coco, root: '${AUTOASSIGN_TEST_UNSET_VAR}/coco', "
        "num_classes: 80}\noutput_dir: out\n"
    )
    message = bad_config(tmp_path, text)
    assert "bad.yaml: datasets.0.root: the 'coco' dataset folder" in message
    assert "${AUTOASSIGN_TEST_UNSET_VAR}/coco does not exist" in message
    assert "set AUTOASSIGN_TEST_UNSET_VAR to the folder holding it" in message


def test_missing_dataset_folder_with_a_set_variable(tmp_path):
    nowhere = tmp_path / "nowhere"
    text = (
        "name: t\ndatasets:\n"
        "  - {name: voc07, format: voc, root: '${AUTOASSIGN_TEST_DATA}/VOC2007', "
        "num_classes: 20}\noutput_dir: out\n"
    )
    message = bad_config(tmp_path, text, env={"AUTOASSIGN_TEST_DATA": str(nowhere)})
    assert "bad.yaml: datasets.0.root: the 'voc07' dataset folder" in message
    assert f"{nowhere / 'VOC2007'} does not exist" in message
    assert "set AUTOASSIGN_TEST_DATA to the folder holding it" in message
    assert not nowhere.exists()


def test_metric_not_reported_by_the_protocol(tmp_path):
    text = (
        "name: t\ndatasets:\n"
        "  - {name: voc, format: voc, root: data/voc, num_classes: 20, synthetic: true, "
        "metric: bbox_mAP}\noutput_dir: out\n"
    )
    message = bad_config(tmp_path, text)
    assert "bad.yaml: datasets.0: metric 'bbox_mAP' is not reported by the voc protocol" in message
    assert "known: mAP" in message


def test_duplicate_dataset_names(tmp_path):
    text = (
        "name: t\noutput_dir: out\ndatasets:\n"
        "  - {name: coco, format: coco, root: data/coco, num_classes: 6, synthetic: true}\n"
        "  - {name: coco, format: objects365, root: data/o365, num_classes: 6, synthetic: true}\n"
    )
    message = bad_config(tmp_path, text)
    assert "bad.yaml: datasets: dataset names must be unique; repeated: coco" in message


def test_num_classes_differing_from_the_dataset(tmp_path, real_coco):
    text = (
        f"name: t\ndatasets:\n"
        f"  - {{name: coco, format: coco, root: '{real_coco}', num_classes: 3}}\n"
        "output_dir: out\n"
    )
    message = bad_config(tmp_path, text)
    assert "bad.yaml: datasets.0.num_classes: 3" in message
    assert f"dataset at {real_coco} has 6 classes" in message


def test_unknown_override_on_the_command_line(tmp_path):
    message = bad_config(tmp_path, GOOD, "nonexistent.key=1", name="good.yaml")
    assert "good.yaml: override 'nonexistent.key=1': unknown field 'nonexistent'" in message
    assert "known: " in message and "search_space" in message


def test_override_with_a_bad_value(tmp_path):
    message = bad_config(tmp_path, GOOD, "search.num_samples=0", name="good.yaml")
    assert "good.yaml: search.num_samples: Input should be greater than 0" in message
    assert "(from override 'search.num_samples=0')" in message


def test_resume_without_a_manifest(tmp_path):
    (tmp_path / "good.yaml").write_text(GOOD)
    result = sweep_cli("good.yaml", "--resume", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "--resume: no sweep to resume" in result.stderr
    assert str(Path("out") / "manifest.json") in result.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()  # the synthetic set is not written either
    assert_no_ray(result)


# --------------------------------------------------------------------------------------------
# Good files
# --------------------------------------------------------------------------------------------


def test_dry_run_of_the_demo_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep_out"
    result = sweep_cli(DEMO, f"output_dir={out}", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    plan = result.stdout
    assert "sweep demo: 8 trials" in plan
    for name, metric in [
        ("coco", "bbox_mAP"),
        ("voc", "mAP"),
        ("objects365", "bbox_mAP"),
        ("widerface", "AP_easy"),
    ]:
        assert f"  {name} ({name}, ranked by {metric}): 2 trials;" in plan
    assert "model.center_prior.sigma_init: grid [1.0, 1.5]" in plan
    assert "resources per trial: 1 worker(s) x (1 CPU, 0 GPU), trained in the trial's" in plan
    assert f"storage: {out / 'ray'}" in plan
    assert f"tracking: sqlite:///{out / 'mlflow.db'} (experiment 'demo')" in plan
    assert f"output: {out}" in plan
    assert_no_ray(result)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no data/sweep_demo/ either


def test_dry_run_imports_neither_ray_nor_mlflow(tmp_path):
    code = (
        "import sys\n"
        "from orchestration.sweep import main\n"
        f"rc = main([{str(DEMO)!r}, 'output_dir=out', '--dry-run'])\n"
        "print('rc', rc, 'ray' in sys.modules, 'mlflow' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "rc 0 False False"
    assert list(tmp_path.iterdir()) == []


def test_dry_run_over_a_real_dataset_prints_its_scan(tmp_path, real_coco):
    (tmp_path / "real.yaml").write_text(
        "name: real\ndatasets:\n"
        f"  - {{name: shapes, format: coco, root: '{real_coco}', num_classes: 6}}\n"
        "tracking: {uri: 'http://user:secret@mlflow.example:5000'}\n"
        "output_dir: out\n"
    )
    result = sweep_cli("real.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sweep real: 1 trials" in result.stdout
    assert "shapes (coco, ranked by bbox_mAP): 1 trials; 8 train images, " in result.stdout
    assert "tracking: http://***@mlflow.example:5000 (experiment 'real')" in result.stdout
    assert "secret" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()
    assert_no_ray(result)


def test_dry_run_says_what_training_will_leave_out(tmp_path, real_coco):
    import json
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(real_coco, root)
    annotations = root / "annotations" / "instances_train.json"
    data = json.loads(annotations.read_text())
    first = data["annotations"][0]
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [
        {**first, "id": next_id, "ignore": 1},
        {**first, "id": next_id + 1, "area": 0},
        {**first, "id": next_id + 2, "bbox": [first["bbox"][0], first["bbox"][1], 0.5, 9.0]},
    ]
    annotations.write_text(json.dumps(data))
    (tmp_path / "s.yaml").write_text(
        f"name: f\ndatasets:\n  - {{name: shapes, format: coco, root: '{root}', "
        "num_classes: 6}\noutput_dir: out\n"
    )
    result = sweep_cli("s.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (
        "; training leaves out 3 annotations (ignore_flag 1, area 1, under_1px 1)" in result.stdout
    )


def test_trial_experiment_of_the_demo():
    sweep = load_sweep_config(DEMO)
    coco = sweep.dataset("coco")
    cfg = trial_experiment(sweep, coco, {"model.center_prior.sigma_init": 1.5})
    assert cfg.data.format == "coco"
    assert cfg.data.root == Path("data/sweep_demo/coco")
    assert cfg.data.synthesize_if_missing is False
    assert cfg.model.num_classes == 6
    assert cfg.model.center_prior.sigma_init == (1.5, 1.5)
    assert cfg.model.backbone.depth == 18 and cfg.train.lr == 0.02  # from base
    voc = trial_experiment(sweep, sweep.dataset("voc"), {})
    assert (voc.data.format, voc.model.num_classes) == ("voc", 20)
    assert voc.model.center_prior.sigma_init == (1.0, 1.0)


def test_dataset_overrides_apply_to_that_dataset_only(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(
        "name: two\nbase:\n  train: {lr: 0.02}\ndatasets:\n"
        "  - {name: a, format: coco, root: data/a, num_classes: 6, synthetic: true,"
        " overrides: {train.lr: 0.5}}\n"
        "  - {name: b, format: widerface, root: data/b, num_classes: 1, synthetic: true}\n"
    )
    sweep = load_sweep_config(path)
    a = trial_experiment(sweep, sweep.dataset("a"), {})
    b = trial_experiment(sweep, sweep.dataset("b"), {})
    assert (a.train.lr, b.train.lr) == (0.5, 0.02)
    # A sampled value wins over the dataset's override.
    assert trial_experiment(sweep, sweep.dataset("a"), {"train.lr": 0.1}).train.lr == 0.1


def test_trials_per_dataset_counts_grid_points_times_samples(tmp_path):
    from orchestration.definition.search_space import trials_per_dataset

    path = tmp_path / "grid.yaml"
    path.write_text(
        "name: g\ndatasets:\n"
        "  - {name: a, format: coco, root: data/a, num_classes: 6, synthetic: true}\n"
        "search_space:\n"
        "  model.center_prior.sigma_init: {grid: [1.0, 2.0]}\n"
        "  train.lr: {grid: [0.01, 0.02, 0.04]}\n"
        "  model.head.prior_prob: {uniform: [0.01, 0.05]}\n"
        "search: {num_samples: 2}\n"
    )
    assert trials_per_dataset(load_sweep_config(path)) == 12
    assert trials_per_dataset(load_sweep_config(path, ["search.num_samples=1"])) == 6


def test_trial_label():
    from orchestration.definition.trial_names import trial_label

    params = {"train.schedule": "13e", "model.center_prior.sigma_init": 1.5}
    assert trial_label("coco", params) == "coco·13e·sigma=1.5"
    assert trial_label("voc", {}) == "voc"


def test_redact_hides_the_password():
    from orchestration.common.redaction import redact

    shown = redact("http://user:secret@host:5000/x")
    assert "secret" not in shown
    assert shown.startswith("http://") and "host:5000/x" in shown
    assert redact("http://host:5000") == "http://host:5000"
    assert redact(None) is None


def test_flatten():
    from orchestration.tracking.tracker import flatten

    nested = {"train": {"lr": 0.1, "milestones": [6, 8]}, "model": {"head": {"n": 2}}, "x": 1}
    assert flatten(nested) == {
        "train.lr": 0.1,
        "train.milestones": [6, 8],
        "model.head.n": 2,
        "x": 1,
    }
    assert flatten({"a": {"b": 1}}, prefix="p.") == {"p.a.b": 1}


def test_dataset_override_errors_name_the_override(tmp_path):
    text = GOOD.replace("synthetic: true}", "synthetic: true, overrides: {train.lrr: 1}}")
    text += "search_space:\n  model.center_prior.sigma_init: {grid: [1.0]}\n"
    stderr = bad_config(tmp_path, text)
    assert "datasets.0.overrides.train.lrr: unknown field 'lrr'" in stderr
    text = GOOD.replace("synthetic: true}", "synthetic: true, overrides: {train.lr: -1}}")
    stderr = bad_config(tmp_path, text)
    assert "datasets.0.overrides: train.lr: Input should be greater than 0" in stderr


@pytest.mark.parametrize("key", ["data.root", "model.num_classes", "output_dir"])
def test_fields_the_sweep_owns_are_neither_overridden_nor_searched(tmp_path, key):
    text = GOOD.replace("synthetic: true}", f"synthetic: true, overrides: {{{key}: 3}}}}")
    assert f"datasets.0.overrides.{key}: set by the sweep" in bad_config(tmp_path, text)
    text = GOOD + f"search_space:\n  {key}: {{grid: [3]}}\n"
    assert f"search_space.{key}: the dataset, class count" in bad_config(tmp_path, text)


def test_per_dataset_batch_size_is_an_allowed_override(tmp_path):
    text = GOOD.replace("synthetic: true}", "synthetic: true, overrides: {data.batch_size: 8}}")
    (tmp_path / "ok.yaml").write_text(text)
    sweep = load_sweep_config(tmp_path / "ok.yaml")
    assert trial_experiment(sweep, sweep.datasets[0], {}).data.batch_size == 8


def test_multi_dataset_without_the_datasets_names_the_variable(tmp_path):
    result = sweep_cli(
        REPO / "configs" / "multi_dataset.yaml",
        "--dry-run",
        f"output_dir={tmp_path}/out",
        cwd=tmp_path,
        env={"COCO_ROOT": ""},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "datasets.0.root: the 'coco' dataset folder data/coco does not exist" in result.stderr
    assert "set COCO_ROOT" in result.stderr
    assert not (tmp_path / "out").exists()


def test_root_default_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "sets" / "coco").mkdir(parents=True)
    text = GOOD.replace("root: data/coco", "root: '${AUTOASSIGN_TEST_ROOT:-sets}/coco'")
    (tmp_path / "s.yaml").write_text(text)
    monkeypatch.delenv("AUTOASSIGN_TEST_ROOT", raising=False)
    assert str(load_sweep_config(tmp_path / "s.yaml").datasets[0].root) == "sets/coco"
    monkeypatch.setenv("AUTOASSIGN_TEST_ROOT", str(tmp_path / "sets"))
    assert load_sweep_config(tmp_path / "s.yaml").datasets[0].root == tmp_path / "sets" / "coco"


def test_relative_roots_become_absolute_before_they_reach_workers(tmp_path, monkeypatch):
    from orchestration.running.cli import make_paths_absolute

    (tmp_path / "s.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep_config("s.yaml")
    make_paths_absolute(sweep)
    experiment = trial_experiment(sweep, sweep.datasets[0], {})
    assert experiment.data.root == tmp_path / "data" / "coco"


VARIANTS = (
    GOOD
    + """\
variants:
  full: {}
  no_confidence: {model.loss.confidence_weighting: false}
  uniform_prior: {model.center_prior.kind: uniform, model.center_prior.force_topk: 9}
search_space:
  seed: {grid: [0, 1, 2]}
"""
)


def test_variants_are_one_more_grid_dimension(tmp_path):
    from orchestration.definition.search_space import (
        describe_space,
        grid_points,
        trials_per_dataset,
    )

    (tmp_path / "s.yaml").write_text(VARIANTS)
    sweep = load_sweep_config(tmp_path / "s.yaml")
    assert trials_per_dataset(sweep) == 9
    points = grid_points(sweep)
    assert points[:4] == [
        {"variant": "full", "seed": 0},
        {"variant": "full", "seed": 1},
        {"variant": "full", "seed": 2},
        {"variant": "no_confidence", "seed": 0},
    ]
    assert describe_space(sweep)["variant"] == "grid ['full', 'no_confidence', 'uniform_prior']"
    coco = sweep.datasets[0]
    full = trial_experiment(sweep, coco, {"variant": "full", "seed": 2})
    assert full.seed == 2 and full.model.loss.confidence_weighting
    assert full.model.center_prior.kind == "gaussian" and full.model.center_prior.force_topk == 0
    uniform = trial_experiment(sweep, coco, {"variant": "uniform_prior", "seed": 0})
    assert uniform.model.center_prior.kind == "uniform"
    assert uniform.model.center_prior.force_topk == 9
    no_conf = trial_experiment(sweep, coco, {"variant": "no_confidence", "seed": 1})
    assert not no_conf.model.loss.confidence_weighting


@pytest.mark.parametrize(
    ("variants", "expected"),
    [
        ("  a: {model.center_prior.learnabel: false}\n", "variants.a.model.center_prior.learnabel"),
        ("  a: {model.center_prior.kind: triangle}\n", "variants.a: model.center_prior.kind"),
        ("  a: {model.num_classes: 3}\n", "variants.a.model.num_classes: set by the sweep"),
        ("  a: {seed: 4}\n", "variants.a.seed: also in search_space"),
        ("  a b: {}\n", "variant names are letters"),
    ],
)
def test_bad_variants_name_the_variant_and_field(tmp_path, variants, expected):
    (tmp_path / "s.yaml").write_text(
        GOOD + "search_space:\n  seed: {grid: [0, 1]}\nvariants:\n" + variants
    )
    result = sweep_cli("s.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
