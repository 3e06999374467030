"""A dataset's own class list (``data.classes``): hand-written VOC and COCO files as
annotation tools export them, read, validated, evaluated and trained under their own names."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoassign.config import DataConfig, ExperimentConfig
from autoassign.data import build_dataset
from autoassign.data.coco import read_coco
from autoassign.data.errors import DatasetError, ProblemLog
from autoassign.data.voc import read_voc
from autoassign.engine import Trainer
from autoassign.eval import build_evaluator
from orchestration.definition.config_loading import load_sweep_config
from orchestration.definition.trial_experiments import trial_experiment

REPO = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


# --------------------------------------------------------------------------------------------
# Hand-written files
# --------------------------------------------------------------------------------------------

SIZE = 96


def write_photo(path: Path, boxes: list[tuple[int, int, int, int]], seed: int) -> None:
    """A noisy photo with a bright filled rectangle per box (x1, y1, x2, y2 pixels)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 80, size=(SIZE, SIZE, 3), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes:
        pixels[y1:y2, x1:x2] = (230, 200, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def voc_xml(file_name: str | None, objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    """A labelImg-style annotation; boxes are 0-based pixels, written 1-based."""
    parts = ["<annotation>", "<folder>images</folder>"]
    if file_name is not None:
        parts.append(f"<filename>{file_name}</filename>")
    parts.append(f"<size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><difficult>0</difficult>"
            f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
            f"<ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "\n".join(parts)


# Per image: (file name the XML writes or None, file actually on disk, objects).
VOC_IMAGES = {
    "site_001": ("site_001.JPG", "site_001.JPG", [("helmet", (10, 10, 40, 40))]),
    "site_002": ("scan 2.png", "scan 2.png", [("Vest", (20, 30, 70, 80))]),
    "site_003": (None, "site_003.jpg", [("helmet", (50, 5, 90, 45)), ("person", (5, 50, 45, 90))]),
    "site_004": ("gone.jpg", "site_004.jpg", [("Vest", (8, 8, 60, 60))]),  # falls back to <id>
    "site_005": ("site_005.jpg", "site_005.jpg", [("person", (30, 30, 80, 80))]),
}


def write_custom_voc(root: Path, split: str = "train") -> Path:
    for seed, (image_id, (written, on_disk, objects)) in enumerate(VOC_IMAGES.items()):
        write_photo(root / "JPEGImages" / on_disk, [box for _, box in objects], seed)
        xml = root / "Annotations" / f"{image_id}.xml"
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(voc_xml(written, objects))
    lists = root / "ImageSets" / "Main"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("\n".join(VOC_IMAGES) + "\n")
    return root


# A Roboflow-style export: a supercategory entry (id 0) that is no class, non-contiguous ids.
ROBOFLOW_CATEGORIES = [
    {"id": 0, "name": "workers", "supercategory": "none"},
    {"id": 1, "name": "helmet", "supercategory": "workers"},
    {"id": 5, "name": "vest", "supercategory": "workers"},
    {"id": 9, "name": "person", "supercategory": "workers"},
]
# (image id, category id, x, y, w, h)
ROBOFLOW_BOXES = [
    (1, 1, 10, 10, 40, 40),
    (1, 9, 50, 50, 40, 40),
    (2, 5, 20, 20, 50, 50),
    (3, 1, 5, 40, 30, 30),
    (3, 5, 50, 5, 40, 40),
    (3, 9, 40, 50, 50, 40),
]


def write_roboflow_coco(root: Path, categories: list[dict] = ROBOFLOW_CATEGORIES) -> Path:
    images = []
    for image_id in (1, 2, 3):
        name = f"frame_{image_id}.jpg"
        boxes = [(x, y, x + w, y + h) for i, _, x, y, w, h in ROBOFLOW_BOXES if i == image_id]
        write_photo(root / "train" / name, boxes, image_id)
        images.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
         "iscrowd": 0}
        for k, (i, c, x, y, w, h) in enumerate(ROBOFLOW_BOXES)
    ]  # fmt: skip
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


# --------------------------------------------------------------------------------------------
# VOC
# --------------------------------------------------------------------------------------------


def test_voc_custom_classes_are_refused_without_a_list_and_validate_with_one(tmp_path):
    root = write_custom_voc(tmp_path / "hardhats")
    refused = run_module(
        "autoassign.data", "validate", "--format", "voc", "--root", root, cwd=tmp_path
    )
    assert refused.returncode == 1
    assert "unknown class 'helmet'" in refused.stdout and "NOT usable" in refused.stdout

    listed = run_module(
        "autoassign.data", "validate", "--format", "voc", "--root", root,
        "--classes", "helmet,Vest,goggles", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    report = json.loads(listed.stdout)
    assert report["ok"] and report["errors"] == []
    assert report["boxes_per_class"] == {"helmet": 2, "Vest": 2, "goggles": 0}
    assert report["left_out_classes"] == {"person": 2}
    unused = [w for w in report["warnings"] if w["kind"] == "unused_class"]
    assert len(unused) == 1 and "'goggles'" in unused[0]["message"]

    text = run_module(
        "autoassign.data", "validate", "--format", "voc", "--root", root,
        "--classes", "helmet,Vest", cwd=tmp_path,
    )  # fmt: skip
    assert text.returncode == 0
    assert "annotations of classes not in data.classes, left out: person: 2" in text.stdout


def test_voc_labels_follow_the_list_and_images_the_xml_filename(tmp_path):
    root = write_custom_voc(tmp_path / "hardhats")
    dataset = read_voc(root, "train", classes=["Vest", "helmet"], check_images=True)
    assert dataset.class_names == ["Vest", "helmet"]
    by_id = {record.image_id: record for record in dataset.records}
    assert by_id["site_001"].labels.tolist() == [1]
    assert by_id["site_002"].labels.tolist() == [0]
    assert by_id["site_003"].labels.tolist() == [1]  # its person is left out, not ignored
    assert by_id["site_003"].ignore.tolist() == [False]
    assert by_id["site_005"].num_targets == 0
    assert dataset.meta["left_out_classes"] == {"person": 2}
    # <filename> when that file is in the image folder, else <id>.jpg as before.
    assert by_id["site_001"].path.name == "site_001.JPG"
    assert by_id["site_002"].path.name == "scan 2.png"
    assert by_id["site_003"].path.name == "site_003.jpg"
    assert by_id["site_004"].path.name == "site_004.jpg"
    # Case as written: "vest" is not "Vest", whose boxes are then left out (with a warning).
    log = ProblemLog()
    lower = read_voc(root, "train", classes=["vest", "helmet"], problems=log)
    assert lower.meta["left_out_classes"] == {"Vest": 2, "person": 2}
    assert [p.kind for p in log.warnings] == ["unused_class"]


def voc_prediction(file_name: str, boxes, labels) -> dict:
    return {
        "file_name": file_name,
        "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
        "scores": np.full(len(labels), 0.9),
        "labels": np.asarray(labels, np.int64),
    }


def evaluate(dataset, predictions: list[dict]) -> dict[str, float]:
    evaluator = build_evaluator(dataset)
    evaluator.reset()
    evaluator.process(predictions)
    return evaluator.evaluate()


def test_voc_ap_scores_exactly_the_listed_classes(tmp_path):
    """The same files and the same (perfect helmet and Vest, no person) detections: with
    person listed its AP of 0 halves the mean, without it the mean is 1."""
    root = write_custom_voc(tmp_path / "hardhats")
    for classes, expected in ((["helmet", "Vest", "person"], 2 / 3), (["helmet", "Vest"], 1.0)):
        dataset = read_voc(root, "train", classes=classes)
        predictions = [
            voc_prediction(
                r.file_name,
                r.boxes[r.labels < 2],
                r.labels[r.labels < 2],
            )
            for r in dataset.records
        ]
        metrics = evaluate(dataset, predictions)
        assert metrics["mAP"] == pytest.approx(expected)
        assert sorted(k for k in metrics if k.startswith("AP/")) == sorted(
            f"AP/{name}" for name in classes
        )


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def test_coco_list_matches_names_leaves_out_the_rest_and_keeps_category_ids(tmp_path):
    root = write_roboflow_coco(tmp_path / "export")
    json_file = root / "annotations" / "instances_train.json"
    everything = read_coco(json_file, root / "train")
    assert everything.class_names == ["workers", "helmet", "vest", "person"]

    dataset = read_coco(json_file, root / "train", classes=["vest", "helmet"])
    assert dataset.class_names == ["vest", "helmet"]
    assert dataset.meta["category_ids"] == [5, 1]
    labels = {r.image_id: r.labels.tolist() for r in dataset.records}
    assert labels == {1: [1], 2: [0], 3: [1, 0]}
    assert dataset.meta["left_out_classes"] == {"person": 2}

    config = DataConfig(format="coco", root=root, classes=["vest", "helmet"])
    assert build_dataset(config, "train").class_names == ["vest", "helmet"]


def test_coco_list_errors_name_the_file_and_the_list_entry(tmp_path):
    root = write_roboflow_coco(tmp_path / "export")
    json_file = root / "annotations" / "instances_train.json"
    with pytest.raises(DatasetError) as raised:
        read_coco(json_file, root / "train", classes=["helmet", "goggles"])
    message = str(raised.value)
    assert str(json_file) in message and "data.classes[1]" in message
    assert "'goggles' is no category name" in message and "'vest'" in message

    twice = [*ROBOFLOW_CATEGORIES, {"id": 11, "name": "vest"}]
    other = write_roboflow_coco(tmp_path / "twice", categories=twice)
    with pytest.raises(DatasetError, match=r"'vest' is the name of categories \[5, 11\]"):
        read_coco(other / "annotations" / "instances_train.json", other / "train",
                  classes=["vest"])  # fmt: skip


def coco_prediction(record, keep_labels: set[int]) -> dict:
    keep = np.isin(record.labels, sorted(keep_labels))
    return voc_prediction(record.file_name, record.boxes[keep], record.labels[keep])


def test_coco_ap_with_and_without_a_list_that_drops_a_class(tmp_path):
    """pycocotools is restricted to the listed categories: perfect helmet and vest boxes and
    no person score 2/3 over the json's classes (the supercategory has no ground truth and
    counts nowhere), 1 over the list without person."""
    root = write_roboflow_coco(tmp_path / "export")
    json_file = root / "annotations" / "instances_train.json"

    everything = read_coco(json_file, root / "train")
    helmet_vest = {everything.class_names.index("helmet"), everything.class_names.index("vest")}
    metrics = evaluate(everything, [coco_prediction(r, helmet_vest) for r in everything.records])
    assert metrics["bbox_mAP"] == pytest.approx(2 / 3, abs=1e-3)
    assert metrics["AP/person"] == 0.0 and math.isnan(metrics["AP/workers"])

    listed = read_coco(json_file, root / "train", classes=["helmet", "vest"])
    metrics = evaluate(listed, [coco_prediction(r, {0, 1}) for r in listed.records])
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    assert sorted(k for k in metrics if k.startswith("AP/")) == ["AP/helmet", "AP/vest"]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def test_class_count_disagreeing_with_the_list_exits_2_with_both_numbers(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "model: {num_classes: 3}\ndata: {format: voc, root: data, classes: [helmet, Vest]}\n"
    )
    result = run_module("autoassign.train", "mine.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.num_classes is 3 but data.classes lists 2 names" in result.stderr
    assert "mine.yaml" in result.stderr
    with pytest.raises(ValueError, match="classes applies to voc, coco and objects365"):
        DataConfig(format="widerface", classes=["face"])
    with pytest.raises(ValueError, match="class names listed twice: Vest"):
        DataConfig(format="voc", classes=["Vest", "helmet", "Vest"])


def test_a_sweep_dataset_entry_gives_its_trials_the_list_and_the_count(tmp_path):
    write_custom_voc(tmp_path / "hardhats")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: mine\ndatasets:\n"
        f"  - {{name: hardhats, format: voc, root: '{tmp_path / 'hardhats'}',"
        " classes: [helmet, Vest]}\n"
    )
    sweep = load_sweep_config(path)
    experiment = trial_experiment(sweep, sweep.datasets[0], {})
    assert experiment.data.classes == ["helmet", "Vest"]
    assert experiment.model.num_classes == 2

    path.write_text(path.read_text().replace("classes:", "num_classes: 3, classes:"))
    result = run_module("orchestration.sweep", path, "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "datasets.0" in result.stderr
    assert "num_classes is 3 but classes lists 2 names" in result.stderr


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_a_custom_class_voc_set_trains_evaluates_and_predicts_under_its_names(tmp_path):
    root = write_custom_voc(tmp_path / "hardhats")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(VOC_IMAGES) + "\n")
    config = ExperimentConfig.model_validate(
        {
            "model": {
                "num_classes": 2,
                "backbone": {"depth": 18, "norm": "gn", "frozen_stages": -1, "style": "pytorch"},
                "fpn_channels": 64,  # GroupNorm(32) needs 2+ values per group on P7
                "head": {"num_convs": 1},
                "input": {"min_size": SIZE, "max_size": SIZE},
            },
            "data": {"format": "voc", "root": str(root), "classes": ["helmet", "Vest"],
                     "batch_size": 2, "num_workers": 0},
            "train": {"lr": 0.01, "base_batch_size": 2, "warmup_iters": 2, "schedule": None,
                      "epochs": 1, "milestones": [1]},
            "eval": {"every_epochs": 1, "batch_size": 1},
            "output_dir": str(tmp_path / "run"),
        }
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = Trainer(config, show_progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    assert set(k for k in metrics if k.startswith("AP/")) == {"AP/helmet", "AP/Vest"}
    assert 0.0 <= metrics["mAP"] <= 1.0

    from autoassign.predict import Predictor

    predictor = Predictor(tmp_path / "run" / "checkpoints" / "last", device="cpu")
    assert predictor.class_names == ["helmet", "Vest"]


def test_the_eval_command_scores_a_predictions_file_on_the_listed_classes(tmp_path):
    root = write_roboflow_coco(tmp_path / "export")
    predictions = []
    for image_id in (1, 2, 3):
        own = [(c, x, y, w, h) for i, c, x, y, w, h in ROBOFLOW_BOXES if i == image_id and c != 9]
        predictions.append(
            {
                "file_name": f"frame_{image_id}.jpg",
                "boxes": [[x, y, x + w, y + h] for _, x, y, w, h in own],
                "scores": [0.9] * len(own),
                "labels": [{1: "helmet", 5: "vest"}[c] for c, *_ in own],
            }
        )
    (tmp_path / "preds.json").write_text(json.dumps(predictions))
    scores = {}
    for classes in (None, "helmet,vest"):
        extra = ["--classes", classes] if classes else []
        result = run_module(
            "autoassign.eval", "--format", "coco", "--root", root, "--split", "train",
            "preds.json", "--json", *extra, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        scores[classes] = json.loads(result.stdout)
    assert scores[None]["bbox_mAP"] == pytest.approx(2 / 3, abs=1e-3)
    assert scores["helmet,vest"]["bbox_mAP"] == pytest.approx(1.0)
    assert "AP/person" not in scores["helmet,vest"]

    refused = run_module(
        "autoassign.data", "validate", "--format", "coco", "--root", root,
        "--classes", "helmet,,vest", cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "expected comma-separated class names" in refused.stderr
