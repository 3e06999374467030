"""Submission files (``python -m autoassign.predict --format``), each read back by a parser
of its format written here, independent of the writers.

A tiny detector trained for a few CPU seconds on a synthetic COCO set (3 classes, category
ids 1, 2, 4) gives real predictions: its COCO results file scored by ``python -m
autoassign.eval`` equals the engine's own metrics, and the WiderFace and VOC files hold the
same detections as ``predictions.json``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoassign import predict
from autoassign.config import DataConfig, ExperimentConfig
from autoassign.data import build_dataset, read_voc
from autoassign.data.synthetic import write_synthetic
from autoassign.data.validate import scan_dataset
from autoassign.engine import Trainer
from autoassign.eval.__main__ import main as eval_main
from autoassign.eval.base import ImagePredictions
from autoassign.submission import SubmissionError
from autoassign.submission.voc import write_voc
from autoassign.submission.widerface import write_widerface


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(dataset root, checkpoint dir, the engine's final metrics)`` of a tiny trained run."""
    base = tmp_path_factory.mktemp("submission")
    root = base / "coco"
    write_synthetic(
        "coco", root, num_images={"train": 8, "val": 4}, num_classes=3, image_size=96, seed=3
    )
    config = ExperimentConfig.model_validate(
        {
            "model": {
                "num_classes": 3,
                "backbone": {"depth": 18, "norm": "gn", "frozen_stages": -1, "style": "pytorch"},
                "fpn_channels": 64,  # GroupNorm(32) needs 2+ values per group on P7
                "head": {"num_convs": 1},
                "input": {"min_size": 96, "max_size": 96},
            },
            "data": {"root": str(root), "batch_size": 2, "num_workers": 0},
            "train": {
                "lr": 0.02,
                "base_batch_size": 2,
                "warmup_iters": 3,
                "schedule": None,
                "epochs": 3,
                "milestones": [2],
            },  # fmt: skip
            "eval": {"every_epochs": 0, "batch_size": 1},  # predict runs one image at a time
            "output_dir": str(base / "run"),
            "device": "cpu",
        }
    )
    metrics = Trainer(config, show_progress=False).fit()
    return root, base / "run" / "checkpoints" / "last", metrics


def _predict(capsys, *args) -> tuple[int, str, str]:
    status = predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _project_predictions(capsys, checkpoint, images, out, *extra) -> dict[str, dict]:
    """The default ``predictions.json`` of a run, by image name."""
    status, _, err = _predict(capsys, checkpoint, *images, "--out", out, *extra)
    assert status == 0, err
    return {p["file_name"]: p for p in json.loads((out / "predictions.json").read_text())}


# --- COCO results ----------------------------------------------------------------------------


def test_coco_results_scored_by_autoassign_eval_equal_the_engine_metrics(trained, tmp_path, capsys):
    root, checkpoint, engine_metrics = trained
    val = root / "val"
    annotations = root / "annotations" / "instances_val.json"
    status, out, err = _predict(
        capsys, checkpoint, val, "--root", val, "--out", tmp_path,
        "--format", "coco-results", "--annotations", annotations,
    )  # fmt: skip
    assert status == 0, err
    assert not (tmp_path / "predictions.json").exists()  # one format per run
    results = json.loads((tmp_path / "coco_results.json").read_text())

    # Read back as the format says: a list of {image_id, category_id, bbox xywh, score}.
    gt = json.loads(annotations.read_text())
    id_of = {image["file_name"]: image["id"] for image in gt["images"]}
    assert isinstance(results, list) and len(results) > 0
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)
    assert {r["image_id"] for r in results} <= set(id_of.values())
    # The json's ids: label 2 is category 4 (the json skips 3).
    used = {r["category_id"] for r in results}
    assert used <= {1, 2, 4} and 4 in used

    # The same detections as the project's own format, xywh against xyxy.
    project = _project_predictions(capsys, checkpoint, [val], tmp_path / "own", "--root", val)
    label_of = {1: "disc", 2: "ring", 4: "square"}
    for name, entry in project.items():
        mine = [r for r in results if r["image_id"] == id_of[name]]
        assert len(mine) == len(entry["scores"])
        for r, box, score, label in zip(mine, entry["boxes"], entry["scores"], entry["labels"]):
            x, y, w, h = r["bbox"]
            assert [x, y, x + w, y + h] == pytest.approx(box, abs=1e-9)
            assert r["score"] == score and label_of[r["category_id"]] == label

    status = eval_main(["--format", "coco", "--root", str(root), "--split", "val",
                        str(tmp_path / "coco_results.json"), "--json"])  # fmt: skip
    cli_metrics = json.loads(capsys.readouterr().out)
    assert status == 0
    assert cli_metrics.keys() == engine_metrics.keys()
    for name, value in engine_metrics.items():
        if math.isnan(value):
            assert cli_metrics[name] is None, name
        else:
            assert cli_metrics[name] == pytest.approx(value, abs=1e-12), name
    assert engine_metrics["bbox_mAP_50"] > 0  # not a comparison of two zeros


def test_coco_results_matches_objects365_v2_names_by_their_last_parts(trained, tmp_path, capsys):
    root, checkpoint, _ = trained
    images = tmp_path / "val" / "patch7"
    images.mkdir(parents=True)
    gt = json.loads((root / "annotations" / "instances_val.json").read_text())
    for image in gt["images"][:2]:
        shutil.copy(root / "val" / image["file_name"], images / image["file_name"])
        image["file_name"] = f"images/v2/patch7/{image['file_name']}"
    (tmp_path / "objv2_val.json").write_text(json.dumps(gt))
    for extra in (["--root", tmp_path / "val"], []):  # patch7/NAME.jpg, then NAME.jpg
        status, _, err = _predict(capsys, checkpoint, images, *extra, "--out", tmp_path / "o",
                                  "--format", "coco-results", "--annotations",
                                  tmp_path / "objv2_val.json")  # fmt: skip
        assert status == 0, err
        results = json.loads((tmp_path / "o" / "coco_results.json").read_text())
        assert {r["image_id"] for r in results} == {gt["images"][0]["id"], gt["images"][1]["id"]}


def test_coco_results_leave_out_images_the_json_does_not_list(trained, tmp_path, capsys):
    """As COCO's test2017 folder holds more images than test-dev's image-info json."""
    root, checkpoint, _ = trained
    subset = json.loads((root / "annotations" / "instances_val.json").read_text())
    del subset["annotations"]
    listed, unlisted = subset["images"][:3], subset["images"][3:]
    subset["images"] = listed
    (tmp_path / "image_info.json").write_text(json.dumps(subset))
    status, out, err = _predict(capsys, checkpoint, root / "val", "--out", tmp_path,
                                "--format", "coco-results",
                                "--annotations", tmp_path / "image_info.json")  # fmt: skip
    assert status == 0, err
    assert f"does not list 1 of the images (first: {unlisted[0]['file_name']})" in out
    assert f"{unlisted[0]['file_name']}: " not in out  # not run ("NAME: K detections")
    assert f"{listed[0]['file_name']}: " in out
    results = json.loads((tmp_path / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} == {image["id"] for image in listed}


def test_coco_results_refuses_what_the_json_cannot_name(trained, tmp_path, capsys):
    root, checkpoint, _ = trained
    annotations = root / "annotations" / "instances_val.json"
    # Named train/NAME.jpg, the train images are none of the val json's NAME.jpg.
    status, _, err = _predict(capsys, checkpoint, root / "train", "--root", root,
                              "--out", tmp_path, "--format", "coco-results",
                              "--annotations", annotations)  # fmt: skip
    assert status == 2 and "Traceback" not in err
    assert re.search(
        r"instances_val.json: lists none of the 8 images \(the first is named "
        r"'train/\d+\.jpg'",
        err,
    ), err

    two_classes = json.loads(annotations.read_text())
    two_classes["categories"] = two_classes["categories"][:2]
    (tmp_path / "two.json").write_text(json.dumps(two_classes))
    status, _, err = _predict(
        capsys, checkpoint, root / "val", "--out", tmp_path,
        "--format", "coco-results", "--annotations", tmp_path / "two.json",
    )  # fmt: skip
    assert status == 2
    assert "two.json: 2 categories, but the model has 3 classes" in err

    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(checkpoint), str(root / "val"), "--format", "coco-results"])
    assert exit_info.value.code == 2
    assert "--format coco-results needs --annotations" in capsys.readouterr().err
    assert not (tmp_path / "coco_results.json").exists()


# --- WiderFace ---------------------------------------------------------------------------------


def _read_widerface_results(folder: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``event/stem`` -> (first line, ``[K, 5]`` x y w h score) of every results file."""
    found = {}
    for path in sorted(folder.glob("*/*.txt")):
        lines = path.read_text().splitlines()
        count = int(lines[1])
        assert len(lines) == 2 + count, path
        rows = [[float(v) for v in line.split(" ")] for line in lines[2:]]
        assert all(len(row) == 5 for row in rows), path
        found[f"{path.parent.name}/{path.stem}"] = (lines[0], np.array(rows).reshape(-1, 5))
    return found


def test_widerface_writer_layout(tmp_path):
    store = {
        "0--Parade/0_Parade_marchingband_1_20.jpg": ImagePredictions(
            boxes=np.array([[10.0, 20.0, 40.5, 60.25], [1.0, 2.0, 3.0, 4.0]]),
            scores=np.array([0.25, 0.875]),
            labels=np.array([0, 0]),
        ),
        "12--Group/12_Group_Group_12_Group_Group_12_10.jpg": ImagePredictions.empty(),
    }
    written = write_widerface(tmp_path, store)
    assert len(written) == 2
    found = _read_widerface_results(tmp_path)
    name, rows = found["0--Parade/0_Parade_marchingband_1_20"]
    assert name == "0_Parade_marchingband_1_20"
    # Best first; x y w h from x1 y1 x2 y2.
    np.testing.assert_allclose(rows, [[1, 2, 2, 2, 0.875], [10, 20, 30.5, 40.25, 0.25]])
    name, rows = found["12--Group/12_Group_Group_12_Group_Group_12_10"]
    assert name == "12_Group_Group_12_Group_Group_12_10" and rows.shape == (0, 5)


def test_widerface_writer_refuses_images_without_an_event(tmp_path):
    with pytest.raises(SubmissionError, match="'face.jpg' is not inside an event folder"):
        write_widerface(tmp_path, {"face.jpg": ImagePredictions.empty()})
    twice = {"a/x.jpg": ImagePredictions.empty(), "b/a/x.png": ImagePredictions.empty()}
    with pytest.raises(SubmissionError, match="would both write a/x.txt"):
        write_widerface(tmp_path, twice)


def _widerface_test_split(root: Path, source_images: list[Path]) -> list[str]:
    """The official test layout: a file list and images, no ground truth."""
    names = [
        "0--Parade/0_Parade_marchingband_1_737.jpg",
        "12--Group/12_Group_Group_12_Group_Group_12_28.jpg",
    ]
    for name, source in zip(names, source_images):
        target = root / "WIDER_test" / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split" / "wider_face_test_filelist.txt").write_text("\n".join(names) + "\n")
    return names


def test_widerface_test_split_predicted_into_the_official_layout(trained, tmp_path, capsys):
    coco_root, checkpoint, _ = trained
    root = tmp_path / "widerface"
    names = _widerface_test_split(root, sorted((coco_root / "val").iterdir()))

    test = build_dataset(DataConfig(format="widerface", root=root), "test")
    assert [r.file_name for r in test.records] == names
    assert [len(r.boxes) for r in test.records] == [0, 0]
    assert [(r.width, r.height) for r in test.records] == [(96, 96), (96, 96)]
    report = scan_dataset(DataConfig(format="widerface", root=root), "test")
    assert report.ok and report.num_images == 2, report.summary()

    file_list = root / "wider_face_split" / "wider_face_test_filelist.txt"
    images = root / "WIDER_test" / "images"
    common = ["--root", images, "--score-threshold", "0"]
    status, _, err = _predict(capsys, checkpoint, file_list, *common, "--out", tmp_path / "out",
                              "--format", "widerface")  # fmt: skip
    assert status == 0, err
    found = _read_widerface_results(tmp_path / "out" / "widerface")
    assert sorted(found) == sorted(name.removesuffix(".jpg") for name in names)

    project = _project_predictions(capsys, checkpoint, [file_list], tmp_path / "own", *common)
    assert sorted(project) == sorted(names)
    for name in names:
        first_line, rows = found[name.removesuffix(".jpg")]
        assert first_line == Path(name).stem
        boxes = np.array(project[name]["boxes"]).reshape(-1, 4)
        scores = np.array(project[name]["scores"])
        assert len(rows) == len(scores) > 0
        order = np.argsort(-scores, kind="stable")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)[order]
        np.testing.assert_allclose(rows[:, :4], xywh, atol=0.0051)
        np.testing.assert_allclose(rows[:, 4], scores[order], rtol=1e-5)
        assert (np.diff(rows[:, 4]) <= 0).all()

    # Without --root the names carry no event: refused before any prediction.
    status, out, err = _predict(capsys, checkpoint, images / "0--Parade", "--out",
                                tmp_path / "bad", "--format", "widerface")  # fmt: skip
    assert status == 2 and "is not inside an event folder" in err
    assert "detections" not in out and not (tmp_path / "bad" / "widerface").exists()


def test_image_list_errors_name_the_list_and_line(trained, tmp_path, capsys):
    _, checkpoint, _ = trained
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n\nnotes about it\n")
    Image.new("RGB", (40, 40)).save(tmp_path / "a.jpg")
    status, _, err = _predict(capsys, checkpoint, listing, "--out", tmp_path / "o")
    assert status == 2 and "list.txt line 3: 'notes about it' is not an image path" in err
    listing.write_text("a.jpg\nb.jpg\n")
    status, _, err = _predict(capsys, checkpoint, listing, "--out", tmp_path / "o")
    assert status == 2 and f"list.txt line 2: {tmp_path / 'b.jpg'} does not exist" in err


# --- VOC ---------------------------------------------------------------------------------------


def _read_comp4(folder: Path, split: str) -> dict[str, list[tuple[str, float, list[float]]]]:
    """class -> [(image id, score, [xmin, ymin, xmax, ymax])] of every comp4 file."""
    found = {}
    for path in sorted(folder.iterdir()):
        match = re.fullmatch(rf"comp4_det_{split}_(\w+)\.txt", path.name)
        assert match, path.name
        rows = []
        for line in path.read_text().splitlines():
            image_id, score, *box = line.split(" ")
            assert len(box) == 4, line
            rows.append((image_id, float(score), [float(v) for v in box]))
        found[match.group(1)] = rows
    return found


def _voc_root(root: Path) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("000004\n000009\n")
    objects = {
        "000004": [("car", 13, 311, 84, 362)],
        "000009": [("dog", 1, 1, 500, 375), ("car", 69, 172, 270, 330)],
    }
    for image_id, boxes in objects.items():
        xml = "".join(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
            f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
            for name, x1, y1, x2, y2 in boxes
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>500</width>"
            f"<height>375</height><depth>3</depth></size>{xml}</annotation>"
        )


def test_voc_boxes_read_from_xml_come_back_as_the_xml_numbers(tmp_path):
    _voc_root(tmp_path / "VOC2007")
    dataset = read_voc(tmp_path / "VOC2007", "test")
    store = {
        record.file_name: ImagePredictions(
            boxes=record.boxes.astype(np.float64),
            scores=np.linspace(0.5, 0.9, len(record.boxes)),
            labels=record.labels,
        )
        for record in dataset.records
    }
    written = write_voc(tmp_path / "out", store, dataset.class_names, "test")
    assert len(written) == 20  # every class has its file, most of them empty
    found = _read_comp4(tmp_path / "out", "test")
    assert len(found) == 20 and sum(map(len, found.values())) == 3
    assert found["car"] == [
        ("000004", 0.5, [13, 311, 84, 362]),
        ("000009", 0.9, [69, 172, 270, 330]),  # best first within an image
    ]
    assert found["dog"] == [("000009", 0.5, [1, 1, 500, 375])]
    assert found["person"] == []


def test_voc_files_from_the_command_line_hold_the_predictions(trained, tmp_path, capsys):
    root, checkpoint, _ = trained
    val = root / "val"
    common = ["--root", val, "--score-threshold", "0"]
    status, _, err = _predict(capsys, checkpoint, val, *common, "--out", tmp_path,
                              "--format", "voc", "--split", "val")  # fmt: skip
    assert status == 0, err
    found = _read_comp4(tmp_path / "voc", "val")
    assert sorted(found) == ["disc", "ring", "square"]

    project = _project_predictions(capsys, checkpoint, [val], tmp_path / "own", *common)
    expected = {name: [] for name in found}
    for name, entry in project.items():  # images in the same order, each best first
        order = np.argsort(-np.array(entry["scores"]), kind="stable")
        for k in order:
            x1, y1, x2, y2 = entry["boxes"][k]
            row = (Path(name).stem, entry["scores"][k], [x1 + 1, y1 + 1, x2, y2])
            expected[entry["labels"][k]].append(row)
    assert sum(map(len, expected.values())) > 0
    for label, rows in found.items():
        assert [row[0] for row in rows] == [row[0] for row in expected[label]]
        np.testing.assert_allclose(
            [row[1] for row in rows], [row[1] for row in expected[label]], rtol=1e-5
        )
        np.testing.assert_allclose(
            np.reshape([row[2] for row in rows], (-1, 4)),
            np.reshape([row[2] for row in expected[label]], (-1, 4)),
            atol=0.0051,
        )

    status, _, err = _predict(capsys, checkpoint, val, "--out", tmp_path, "--format", "voc",
                              "--split", "val 2")  # fmt: skip
    assert status == 2 and "split 'val 2' cannot be part of a file name" in err
