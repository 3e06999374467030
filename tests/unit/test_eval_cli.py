"""``python -m autoassign.eval`` as a subprocess on a small COCO dataset written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from autoassign.eval.__main__ import main

REPO_ROOT = Path(__file__).resolve().parents[2]
COCO_RECALL_POINTS = 101


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """Two 64x48 images with one "person" each (category id 1; "car" is id 3)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "val").mkdir()
    images = [
        {"id": 7, "file_name": "img7.jpg", "width": 64, "height": 48},
        {"id": 9, "file_name": "img9.jpg", "width": 64, "height": 48},
    ]
    for entry in images:
        Image.new("RGB", (64, 48), (90, 120, 150)).save(root / "val" / entry["file_name"])
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [4, 6, 20, 30], "area": 600.0,
         "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [30, 10, 24, 32], "area": 768.0,
         "iscrowd": 0},
    ]  # fmt: skip
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def run_cli(root: Path, predictions: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "autoassign.eval", "--format", "coco", "--root", str(root)]
    command += ["--split", "val", str(predictions), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def test_scores_a_predictions_file(coco_root, tmp_path):
    # img7 detected exactly, img9 missed (absent from the file): recall 1/2 at precision 1.
    path = tmp_path / "preds.json"
    path.write_text(
        json.dumps(
            [{"file_name": "img7.jpg", "boxes": [[4, 6, 24, 36]], "scores": [0.8],
              "labels": ["person"]}]
        )
    )  # fmt: skip
    result = run_cli(coco_root, path, "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["bbox_mAP"] == pytest.approx(51 / COCO_RECALL_POINTS)
    assert metrics["AP/person"] == pytest.approx(51 / COCO_RECALL_POINTS)
    assert metrics["AP/car"] is None  # no cars: NaN, written as null
    assert metrics["bbox_mAP_l"] is None and metrics["bbox_mAP_m"] is None


def cli_args(root: Path, predictions: Path, *extra: str) -> list[str]:
    return ["--format", "coco", "--root", str(root), "--split", "val", str(predictions), *extra]


def test_prints_a_table(coco_root, tmp_path, capsys):
    # In-process from here on: the same entry point without paying a Python start each time.
    path = tmp_path / "preds.json"
    path.write_text(
        json.dumps(
            [{"file_name": "img9.jpg", "boxes": [[30, 10, 54, 42]], "scores": [0.8],
              "labels": ["person"]}]
        )
    )  # fmt: skip
    assert main(cli_args(coco_root, path)) == 0
    table = capsys.readouterr().out
    assert f"bbox_mAP     {51 / COCO_RECALL_POINTS:.4f}" in table
    assert "AP/car          nan" in table


def test_accepts_the_coco_results_format(coco_root, tmp_path, capsys):
    path = tmp_path / "results.json"
    results = [
        {"image_id": 7, "category_id": 1, "bbox": [4, 6, 20, 30], "score": 0.8},
        {"image_id": 9, "category_id": 1, "bbox": [30, 10, 24, 32], "score": 0.7},
    ]
    path.write_text(json.dumps(results))
    assert main(cli_args(coco_root, path, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["bbox_mAP"] == pytest.approx(1.0)


def test_unknown_class_exits_1_naming_it(coco_root, tmp_path):
    path = tmp_path / "preds.json"
    path.write_text(
        json.dumps(
            [{"file_name": "img7.jpg", "boxes": [[4, 6, 24, 36]], "scores": [0.8],
              "labels": ["unicorn"]}]
        )
    )  # fmt: skip
    result = run_cli(coco_root, path, "--json")
    assert result.returncode == 1
    assert "unicorn" in result.stderr and "preds.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_missing_dataset_exits_1(tmp_path, capsys):
    path = tmp_path / "preds.json"
    path.write_text("[]")
    assert main(cli_args(tmp_path / "no-such-root", path)) == 1
    assert "instances_val.json" in capsys.readouterr().err


def test_unknown_image_exits_1(coco_root, tmp_path, capsys):
    path = tmp_path / "preds.json"
    path.write_text(json.dumps([{"file_name": "x.jpg", "boxes": [], "scores": [], "labels": []}]))
    assert main(cli_args(coco_root, path)) == 1
    assert "'x.jpg' is not in the coco split 'val'" in capsys.readouterr().err
