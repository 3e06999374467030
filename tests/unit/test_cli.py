"""The train and predict command lines, run as subprocesses.

Bad configs exit 2 with ``<file>: <field.path>: <message>`` and no traceback; bad data and
bad checkpoints exit 1; a short training run's checkpoint, run through ``predict`` and scored
by ``python -m autoassign.eval``, gives the metrics the engine's own evaluation gave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autoassign.data.synthetic import write_synthetic

REPO = Path(__file__).resolve().parents[2]


def run_module(
    module: str, *args: str | Path, cwd: Path, threads: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(threads),  # the test machine is shared
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TINY_CONFIG = """\
model:
  num_classes: 2
  backbone: {depth: 18, style: pytorch, norm: gn, frozen_stages: -1}
  fpn_channels: 64  # GroupNorm(32) needs 2+ values per group on the 1 x 1 P7 map
  head: {num_convs: 1}
  input: {min_size: 96, max_size: 96}
data:
  root: data/coco
  batch_size: 2
  num_workers: 0
train:
  lr: 0.02
  base_batch_size: 2
  warmup_iters: 3
  schedule: null
  epochs: 3
  milestones: [2]
  log_every_iters: 2
eval:
  every_epochs: 0
  batch_size: 1  # predict runs one image at a time; GroupNorm sees the batch padding
output_dir: runs/tiny
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a tiny synthetic COCO set under data/ and the tiny config."""
    root = tmp_path_factory.mktemp("cli")
    write_synthetic(
        "coco",
        root / "data" / "coco",
        num_images={"train": 8, "val": 4},
        num_classes=2,
        image_size=96,
        seed=3,
    )
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    return root


def assert_clean_error(result: subprocess.CompletedProcess, status: int) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    return result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("train:\n  lrate: 0.1\n", [], "bad.yaml: train.lrate: Extra inputs are not permitted"),
        ("model:\n  backbone: {depth: 42}\n", [], "bad.yaml: model.backbone.depth: Input should"),
        ("seed: abc\n", [], "bad.yaml: seed: Input should be a valid integer"),
        ("seed: 0\n", ["train.lr=-1"], "bad.yaml: train.lr: Input should be greater than 0"),
        ("seed: 0\n", ["model.head.num_conv=1"], "unknown field 'num_conv' in model.head"),
        ("seed: 0\n", ["train.lr"], "not of the form key.path=value"),
        ("train: [1, 2\n", [], "bad.yaml:2:1: not valid YAML"),
        ("", [], "bad.yaml: the file is empty; an experiment config needs"),
        ("# only a comment\n", ["model.num_classes=3"], "bad.yaml: the file is empty"),
    ],
)
def test_config_errors_exit_2_naming_file_and_field(tmp_path, yaml_text, overrides, expected):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    result = run_module("autoassign.train", "bad.yaml", *overrides, cwd=tmp_path)
    assert expected in assert_clean_error(result, 2)


def test_missing_config_and_missing_resume_checkpoint(workdir):
    result = run_module("autoassign.train", "absent.yaml", cwd=workdir)
    assert "absent.yaml: no such config file" in assert_clean_error(result, 2)
    result = run_module(
        "autoassign.train", "tiny.yaml", "output_dir=runs/none", "--resume", cwd=workdir
    )
    message = assert_clean_error(result, 1)
    assert "no checkpoint at runs/none/checkpoints/last to" in message


def test_dataset_problems_stop_training_with_the_scan_report(workdir, tmp_path):
    broken = tmp_path / "broken"
    write_synthetic("coco", broken, num_images={"train": 6, "val": 4}, num_classes=2,
                    image_size=64, seed=0)  # fmt: skip
    missing = sorted((broken / "train").iterdir())[0]
    missing.unlink()
    result = run_module(
        "autoassign.train", workdir / "tiny.yaml", f"data.root={broken}",
        f"output_dir={tmp_path / 'out'}", cwd=workdir,
    )  # fmt: skip
    message = assert_clean_error(result, 1)
    assert "training not started" in message
    assert missing.name in message
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_train_predict_eval_agree_and_resume(workdir):
    result = run_module("autoassign.train", "tiny.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = workdir / "runs" / "tiny"
    engine_metrics = json.loads((out / "final_metrics.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if r["type"] == "train"] == [2, 4, 6, 8, 10, 12]
    assert (out / "center_prior.png").is_file() and (out / "config.yaml").is_file()

    val_images = workdir / "data" / "coco" / "val"
    result = run_module(
        "autoassign.predict", out / "checkpoints" / "last", val_images,
        "--root", val_images, "--out", "pred", "--score-threshold", "0", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    predictions = json.loads((workdir / "pred" / "predictions.json").read_text())
    assert sorted(p["file_name"] for p in predictions) == sorted(
        p.name for p in val_images.iterdir()
    )
    assert sum(len(p["scores"]) for p in predictions) > 0
    assert {label for p in predictions for label in p["labels"]} <= {"disc", "ring"}
    drawn = sorted((workdir / "pred" / "images").iterdir())
    assert [p.name for p in drawn] == sorted(p.name for p in val_images.iterdir())

    result = run_module(
        "autoassign.eval", "--format", "coco", "--root", "data/coco", "--split", "val",
        "pred/predictions.json", "--json", cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cli_metrics = json.loads(result.stdout)
    assert engine_metrics.keys() == cli_metrics.keys()
    for name, value in engine_metrics.items():
        if value is None:
            assert cli_metrics[name] is None, name
        else:
            assert cli_metrics[name] == pytest.approx(value, abs=1e-9), name
    assert engine_metrics["bbox_mAP_50"] > 0  # the comparison is not between two zeros

    # --resume (default checkpoints/last) with a longer schedule continues where training ended.
    result = run_module(
        "autoassign.train", "tiny.yaml", "train.epochs=4", "train.milestones=[3]", "--resume",
        cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "starting at iteration 12" in result.stdout
    checkpoints = workdir / "runs" / "tiny" / "checkpoints"
    assert (checkpoints / "epoch_0004" / "checkpoint.pt").is_file()


def test_predict_rejects_a_bad_checkpoint(workdir, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a checkpoint")
    result = run_module("autoassign.predict", bogus, workdir / "data" / "coco" / "val",
                        cwd=tmp_path)  # fmt: skip
    assert "model.pt: not a readable checkpoint" in assert_clean_error(result, 1)
    result = run_module("autoassign.predict", bogus, tmp_path / "nothing.jpg", cwd=tmp_path)
    assert "nothing.jpg: no such image file or folder" in assert_clean_error(result, 2)


@pytest.mark.slow
def test_demo_recipe_reaches_half_a_box_ap(tmp_path):
    """The whole demo recipe (minutes on two CPU cores; the dataset is written on the fly)."""
    config = REPO / "configs" / "demo_single.yaml"
    result = run_module(
        "autoassign.train", config, "output_dir=runs/demo", cwd=tmp_path, threads=2, timeout=1800
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "synthetic_coco" / "annotations").is_dir()
    metrics = json.loads((tmp_path / "runs" / "demo" / "final_metrics.json").read_text())
    assert metrics["bbox_mAP"] >= 0.5
    assert metrics["bbox_mAP_50"] >= 0.9


def test_resume_flag_parsing():
    from autoassign.train import RESUME_LAST, parse_args

    args = parse_args(["x.yaml", "train.lr=0.1", "--resume"])
    assert (args.resume, args.overrides) == (RESUME_LAST, ["train.lr=0.1"])
    args = parse_args(["x.yaml", "--resume", "runs/a/epoch_0003", "seed=2"])
    assert (args.resume, args.overrides) == ("runs/a/epoch_0003", ["seed=2"])
    # A bare --resume followed by an override: the override is not taken for a path.
    args = parse_args(["x.yaml", "--resume", "seed=2"])
    assert (args.resume, args.overrides) == (RESUME_LAST, ["seed=2"])
    assert parse_args(["x.yaml"]).resume is None
