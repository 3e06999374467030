"""COCO evaluator: hand-made cases with known AP, and parity with pycocotools run directly."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval import (
    COCOEvaluator,
    EvaluationError,
    build_evaluator,
    merge_prediction_shards,
)

# Category ids with gaps, as in COCO; contiguous labels 0, 1, 2 map to 3, 7, 12.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]
COCO_RECALL_POINTS = 101


def write_coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> DetectionDataset:
    """Write an instances json and return the dataset a COCO reader makes of it."""
    for index, annotation in enumerate(annotations):
        annotation.setdefault("id", index + 1)
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", annotation["bbox"][2] * annotation["bbox"][3])
    path = tmp_path / "instances_val.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    category_ids = [c["id"] for c in CATEGORIES]
    records = []
    for image in images:
        own = [a for a in annotations if a["image_id"] == image["id"]]
        boxes = np.array(
            [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in own)], np.float32
        ).reshape(-1, 4)
        records.append(
            ImageRecord(
                file_name=image["file_name"],
                path=tmp_path / image["file_name"],
                width=image["width"],
                height=image["height"],
                boxes=boxes,
                labels=np.array([category_ids.index(a["category_id"]) for a in own], np.int64),
                ignore=np.array([bool(a["iscrowd"]) for a in own], bool),
                image_id=image["id"],
            )
        )
    return DetectionDataset(
        format="coco",
        split="val",
        records=records,
        class_names=[c["name"] for c in CATEGORIES],
        meta={"annotation_file": path, "category_ids": category_ids},
    )


def image(image_id: int, size: int = 200) -> dict:
    return {"id": image_id, "file_name": f"{image_id:04d}.jpg", "width": size, "height": size}


def prediction(file_name: str, boxes, scores, labels) -> dict:
    return {
        "file_name": file_name,
        "boxes": np.array(boxes, np.float64).reshape(-1, 4),
        "scores": np.array(scores, np.float64),
        "labels": np.array(labels, np.int64),
    }


def evaluate(dataset: DetectionDataset, predictions: list[dict]) -> dict[str, float]:
    evaluator = build_evaluator(dataset)
    evaluator.reset()
    evaluator.process(predictions)
    return evaluator.evaluate()


@pytest.fixture
def one_box(tmp_path: Path) -> DetectionDataset:
    """One image, one 100x100 "cat" at (10, 10) (area 10000: a large object)."""
    return write_coco(
        tmp_path, [image(1)], [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100]}]
    )


def test_perfect_detection_scores_one(one_box):
    metrics = evaluate(one_box, [prediction("0001.jpg", [[10, 10, 110, 110]], [0.9], [0])])
    assert metrics["bbox_mAP"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_50"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_l"] == pytest.approx(1.0)
    assert metrics["AP/cat"] == pytest.approx(1.0)
    # No small or medium objects, no dogs or birds: pycocotools' -1 is reported as NaN.
    assert math.isnan(metrics["bbox_mAP_s"]) and math.isnan(metrics["bbox_mAP_m"])
    assert math.isnan(metrics["AP/dog"]) and math.isnan(metrics["AP/bird"])


def test_shift_below_half_iou_scores_zero(one_box):
    # Shifted right by 40: IoU = 60 / 140 = 0.43 < 0.5.
    metrics = evaluate(one_box, [prediction("0001.jpg", [[50, 10, 150, 110]], [0.9], [0])])
    assert metrics["bbox_mAP"] == 0.0
    assert metrics["bbox_mAP_50"] == 0.0


def test_shift_between_half_and_three_quarters(one_box):
    # Shifted right by 20: IoU = 80 / 120 = 2/3, a match at IoU 0.50, 0.55, 0.60, 0.65 only,
    # so 4 of the 10 thresholds of bbox_mAP give AP 1 and the others 0.
    metrics = evaluate(one_box, [prediction("0001.jpg", [[30, 10, 130, 110]], [0.9], [0])])
    assert metrics["bbox_mAP_50"] == pytest.approx(1.0)
    assert metrics["bbox_mAP_75"] == 0.0
    assert metrics["bbox_mAP"] == pytest.approx(0.4)


def test_missing_detection_halves_recall(tmp_path):
    dataset = write_coco(
        tmp_path,
        [image(1), image(2)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100]},
            {"image_id": 2, "category_id": 3, "bbox": [20, 20, 100, 100]},
        ],
    )
    # Only image 1 is detected (image 2 gets no predictions at all): recall 0.5 at
    # precision 1, so recall points 0.00 .. 0.50 (51 of 101) have precision 1.
    metrics = evaluate(dataset, [prediction("0001.jpg", [[10, 10, 110, 110]], [0.9], [0])])
    assert metrics["bbox_mAP"] == pytest.approx(51 / COCO_RECALL_POINTS)


def test_duplicate_detection_is_a_false_positive(tmp_path):
    dataset = write_coco(
        tmp_path,
        [image(1), image(2)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100]},
            {"image_id": 2, "category_id": 3, "bbox": [20, 20, 100, 100]},
        ],
    )
    # Ranked: TP (0.9), duplicate FP (0.8), TP (0.7): precision 1 up to recall 0.5, then 2/3.
    predictions = [
        prediction("0001.jpg", [[10, 10, 110, 110], [10, 10, 110, 110]], [0.9, 0.8], [0, 0]),
        prediction("0002.jpg", [[20, 20, 120, 120]], [0.7], [0]),
    ]
    metrics = evaluate(dataset, predictions)
    assert metrics["bbox_mAP"] == pytest.approx((51 * 1.0 + 50 * (2 / 3)) / COCO_RECALL_POINTS)


def test_wrong_class_scores_zero(one_box):
    metrics = evaluate(one_box, [prediction("0001.jpg", [[10, 10, 110, 110]], [0.9], [1])])
    assert metrics["AP/cat"] == 0.0
    assert metrics["bbox_mAP"] == 0.0  # dog has no ground truth: not in the mean
    assert math.isnan(metrics["AP/dog"])


def test_no_predictions_at_all(one_box):
    metrics = evaluate(one_box, [])
    assert metrics["bbox_mAP"] == 0.0
    assert metrics["AP/cat"] == 0.0


def random_scene(tmp_path: Path, seed: int = 0) -> tuple[DetectionDataset, list[dict]]:
    """Six images with boxes of every size, a crowd region, and noisy detections."""
    rng = np.random.default_rng(seed)
    images = [image(i, size=300) for i in (5, 8, 13, 21, 34, 55)]
    annotations, predictions = [], []
    for img in images:
        boxes, scores, labels = [], [], []
        for _ in range(int(rng.integers(1, 6))):
            w, h = rng.uniform(8, 150, size=2)
            x, y = rng.uniform(0, 300 - w), rng.uniform(0, 300 - h)
            label = len(annotations) % 3  # every class has objects
            annotations.append(
                {
                    "image_id": img["id"],
                    "category_id": CATEGORIES[label]["id"],
                    "bbox": [float(x), float(y), float(w), float(h)],
                    # A segmentation area differing from the box area, as in real COCO.
                    "area": float(w * h * rng.uniform(0.5, 0.9)),
                    "iscrowd": int(len(annotations) == 4),
                }
            )
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.15, size=4) * [w, h, w, h]
                x1, y1 = x + jitter[0], y + jitter[1]
                boxes.append([x1, y1, x1 + w + jitter[2], y1 + h + jitter[3]])
                scores.append(float(rng.random()))
                labels.append(label if rng.random() < 0.8 else int(rng.integers(0, 3)))
        for _ in range(2):  # background false positives
            x, y = rng.uniform(0, 250, size=2)
            boxes.append([x, y, x + 40, y + 30])
            scores.append(float(rng.random() * 0.5))
            labels.append(int(rng.integers(0, 3)))
        predictions.append(prediction(img["file_name"], boxes, scores, labels))
    return write_coco(tmp_path, images, annotations), predictions


def pycocotools_directly(dataset: DetectionDataset, predictions: list[dict]) -> COCOeval:
    """The reference: COCOeval on the json, detections converted here by hand."""
    image_ids = {r.file_name: r.image_id for r in dataset.records}
    results = []
    for p in predictions:
        for (x1, y1, x2, y2), score, label in zip(p["boxes"], p["scores"], p["labels"]):
            results.append(
                {
                    "image_id": image_ids[p["file_name"]],
                    "category_id": CATEGORIES[label]["id"],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(score),
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(dataset.meta["annotation_file"]))
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def test_matches_pycocotools_on_the_same_json(tmp_path):
    dataset, predictions = random_scene(tmp_path)
    metrics = evaluate(dataset, predictions)
    reference = pycocotools_directly(dataset, predictions)
    names = ["bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"]
    for name, expected in zip(names, reference.stats[:6]):
        if expected < 0:
            assert math.isnan(metrics[name]), name
        else:
            assert abs(metrics[name] - expected) <= 1e-9, name
    assert 0.05 < metrics["bbox_mAP"] < 0.95  # a scene that exercises partial matches
    precision = reference.eval["precision"]
    for k, category in enumerate(CATEGORIES):
        values = precision[:, :, k, 0, -1]
        assert (values > -1).any()
        expected = values[values > -1].mean()
        assert abs(metrics[f"AP/{category['name']}"] - expected) <= 1e-9


def test_records_only_ground_truth_says_so(tmp_path):
    dataset, predictions = random_scene(tmp_path)
    reference = pycocotools_directly(dataset, predictions)
    dataset.meta.pop("annotation_file")
    evaluator = COCOEvaluator(dataset)
    evaluator.process(predictions)
    metrics = evaluator.evaluate()
    assert any("rebuilt from the records" in note for note in evaluator.notes)
    # Same boxes (float32 in the records) and crowd flags: AP over all areas agrees.
    assert metrics["bbox_mAP_50"] == pytest.approx(reference.stats[1], abs=1e-6)
    assert metrics["bbox_mAP"] == pytest.approx(reference.stats[0], abs=1e-6)


def test_shards_merge_to_the_single_process_result(tmp_path):
    dataset, predictions = random_scene(tmp_path)
    whole = evaluate(dataset, predictions)

    # Two "ranks": rank 1 also saw the first image again (sampler padding).
    rank0, rank1 = COCOEvaluator(dataset), COCOEvaluator(dataset)
    rank0.process(predictions[:3])
    rank1.process(predictions[3:] + predictions[:1])
    merged = merge_prediction_shards([rank0.local_store(), rank1.local_store()])
    assert sorted(merged) == sorted(p["file_name"] for p in predictions)
    sharded = rank0.compute(merged)
    for name, value in whole.items():
        assert value == pytest.approx(sharded[name], nan_ok=True), name

    # Counting the overlapping image twice would change the result: its detections would be
    # false positives the second time. The merged store has it once.
    assert len(merged[predictions[0]["file_name"]]) == len(predictions[0]["scores"])


def test_process_rejects_unknown_images_and_labels(one_box):
    evaluator = COCOEvaluator(one_box)
    with pytest.raises(EvaluationError, match="nope.jpg"):
        evaluator.process([prediction("nope.jpg", [[0, 0, 1, 1]], [0.5], [0])])
    with pytest.raises(EvaluationError, match="label 3"):
        evaluator.process([prediction("0001.jpg", [[0, 0, 1, 1]], [0.5], [3])])
    with pytest.raises(EvaluationError, match="different lengths"):
        evaluator.process([prediction("0001.jpg", [[0, 0, 1, 1]], [0.5, 0.4], [0])])


def test_tensors_are_accepted(tmp_path):
    dataset, predictions = random_scene(tmp_path)
    as_tensors = [
        {
            "file_name": p["file_name"],
            "boxes": torch.from_numpy(p["boxes"]).float(),
            "scores": torch.from_numpy(p["scores"]).float(),
            "labels": torch.from_numpy(p["labels"]),
        }
        for p in predictions
    ]
    expected = evaluate(dataset, predictions)
    # float32 tensors round the boxes; AP moves by far less than a recall step.
    for name, value in evaluate(dataset, as_tensors).items():
        assert value == pytest.approx(expected[name], abs=1e-6, nan_ok=True), name


def test_records_that_the_json_does_not_have(one_box):
    one_box.records[0].image_id = 99
    evaluator = COCOEvaluator(one_box)
    with pytest.raises(EvaluationError, match=r"image ids \[99\]"):
        evaluator.evaluate()


def test_curves_are_pycocotools_precision_at_iou_half(tmp_path):
    dataset = write_coco(
        tmp_path,
        [image(1), image(2)],
        [
            {"image_id": 1, "category_id": 3, "bbox": [10, 10, 100, 100]},
            {"image_id": 2, "category_id": 3, "bbox": [20, 20, 100, 100]},
        ],
    )
    evaluator = build_evaluator(dataset)
    evaluator.process([prediction("0001.jpg", [[10, 10, 110, 110]], [0.9], [0])])
    metrics = evaluator.evaluate()
    assert list(evaluator.curves) == ["cat"]  # dog and bird have no ground truth
    curve = evaluator.curves["cat"]
    assert len(curve.recall) == 101 and curve.recall[0] == 0.0 and curve.recall[-1] == 1.0
    # One of two cats found at precision 1: precision 1 up to recall 0.5, then 0.
    np.testing.assert_allclose(curve.precision[curve.recall <= 0.5], 1.0)
    np.testing.assert_allclose(curve.precision[curve.recall > 0.5], 0.0)
    assert curve.ap == pytest.approx(metrics["bbox_mAP_50"])
