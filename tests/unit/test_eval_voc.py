"""VOC evaluator: devkit matching, difficult objects, 11-point versus area AP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from autoassign.config import EvalConfig
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval import VOCEvaluator, build_evaluator

CLASSES = ["aeroplane", "bicycle", "bird"]


def record(name: str, boxes, labels, difficult=None) -> ImageRecord:
    """A record as the VOC reader makes it: xml (xmin, ymin, xmax, ymax) 1-based inclusive
    becomes continuous (xmin - 1, ymin - 1, xmax, ymax); ``difficult`` becomes ``ignore``."""
    xml = np.array(boxes, np.float32).reshape(-1, 4)
    continuous = np.concatenate([xml[:, :2] - 1, xml[:, 2:]], axis=1)
    n = len(continuous)
    return ImageRecord(
        file_name=f"{name}.jpg",
        path=Path(f"{name}.jpg"),
        width=500,
        height=375,
        boxes=continuous,
        labels=np.array(labels, np.int64),
        ignore=np.array(difficult if difficult is not None else [False] * n, bool),
        image_id=name,
    )


def dataset(*records: ImageRecord) -> DetectionDataset:
    return DetectionDataset("voc", "test", list(records), CLASSES)


def det(name: str, boxes, scores, labels) -> dict:
    return {
        "file_name": f"{name}.jpg",
        "boxes": np.array(boxes, np.float64).reshape(-1, 4),
        "scores": np.array(scores, np.float64),
        "labels": np.array(labels, np.int64),
    }


def evaluate(data: DetectionDataset, predictions: list[dict], metric="11pt") -> dict:
    evaluator = build_evaluator(data, EvalConfig(voc_metric=metric))
    evaluator.process(predictions)
    return evaluator.evaluate()


# xml box (11, 11, 60, 60) is continuous (10, 10, 60, 60).
PLANE = [11, 11, 60, 60]
PLANE_DET = [10, 10, 60, 60]


def test_perfect_detections():
    data = dataset(record("a", [PLANE, [101, 101, 200, 150]], [0, 1]))
    metrics = evaluate(data, [det("a", [PLANE_DET, [100, 100, 200, 150]], [0.9, 0.8], [0, 1])])
    assert metrics["mAP"] == pytest.approx(1.0)
    assert metrics["mAP_area"] == pytest.approx(1.0)
    assert metrics["AP/aeroplane"] == pytest.approx(1.0)
    assert math.isnan(metrics["AP/bird"])  # no birds in the split: not in the mean


def test_eleven_point_and_area_differ_on_a_duplicate():
    # Two planes; ranked TP (0.9), duplicate FP (0.8), TP (0.7):
    # recall 1/2 at precision 1, recall 1 at precision 2/3.
    data = dataset(record("a", [PLANE], [0]), record("b", [[101, 101, 200, 150]], [0]))
    predictions = [
        det("a", [PLANE_DET, PLANE_DET], [0.9, 0.8], [0, 0]),
        det("b", [[100, 100, 200, 150]], [0.7], [0]),
    ]
    metrics = evaluate(data, predictions, metric="area")
    # 11-point: t = 0 .. 0.5 (6 points) see precision 1, t = 0.6 .. 1 (5 points) see 2/3.
    assert metrics["mAP_11pt"] == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11)
    # area: 1/2 * 1 + 1/2 * 2/3.
    assert metrics["mAP_area"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert metrics["mAP"] == metrics["mAP_area"]
    assert metrics["AP/aeroplane"] == metrics["mAP_area"]
    assert evaluate(data, predictions, metric="11pt")["mAP"] == metrics["mAP_11pt"]


def test_missing_detection_halves_recall():
    data = dataset(record("a", [PLANE], [0]), record("b", [[101, 101, 200, 150]], [0]))
    metrics = evaluate(data, [det("a", [PLANE_DET], [0.9], [0])])
    assert metrics["mAP_area"] == pytest.approx(0.5)
    assert metrics["mAP_11pt"] == pytest.approx(6 / 11)


def test_iou_must_exceed_one_half():
    # Object (0, 0, 10, 10) continuous (xml 1 1 10 10: the devkit's +1 width is 10).
    # A 10 x 20 detection over it has IoU exactly 100 / 200 = 0.5: not a match (> 0.5).
    data = dataset(record("a", [[1, 1, 10, 10]], [0]))
    assert evaluate(data, [det("a", [[0, 0, 10, 20]], [0.9], [0])])["mAP_area"] == 0.0
    # 10 x 19 gives 100 / 190 > 0.5: a match.
    assert evaluate(data, [det("a", [[0, 0, 10, 19]], [0.9], [0])])["mAP_area"] == 1.0


def test_wrong_class_is_a_false_positive():
    data = dataset(record("a", [PLANE, [101, 101, 200, 150]], [0, 2]))
    predictions = [det("a", [PLANE_DET, [100, 100, 200, 150]], [0.9, 0.8], [2, 2])]
    metrics = evaluate(data, predictions, metric="area")
    assert metrics["AP/aeroplane"] == 0.0
    # bird: FP (0.9, the plane box) then TP (0.8): precision 1/2 at recall 1.
    assert metrics["AP/bird"] == pytest.approx(0.5)
    assert metrics["mAP"] == pytest.approx(0.25)


def test_difficult_objects_are_neither_hits_nor_misses():
    # Image a: a difficult plane and a normal one; image b: a normal plane.
    data = dataset(
        record("a", [PLANE, [101, 101, 200, 150]], [0, 0], difficult=[True, False]),
        record("b", [[201, 101, 300, 150]], [0]),
    )
    predictions = [
        # 0.95 lands on the difficult plane: ignored. 0.9 hits the normal plane of a.
        det("a", [PLANE_DET, [100, 100, 200, 150]], [0.95, 0.9], [0, 0]),
        # b: a miss (0.8) before the hit (0.7).
        det("b", [[0, 200, 50, 250], [200, 100, 300, 150]], [0.8, 0.7], [0, 0]),
    ]
    metrics = evaluate(data, predictions, metric="area")
    # Counted: TP, FP, TP over 2 non-difficult planes -> 1/2 * 1 + 1/2 * 2/3.
    assert metrics["mAP_area"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Undetected difficult objects cost nothing either.
    only_normal = [
        det("a", [[100, 100, 200, 150]], [0.9], [0]),
        det("b", [[200, 100, 300, 150]], [0.7], [0]),
    ]
    assert evaluate(data, only_normal, metric="area")["mAP_area"] == pytest.approx(1.0)


def test_class_with_only_difficult_objects_is_left_out_of_the_mean():
    data = dataset(record("a", [PLANE, [101, 101, 200, 150]], [0, 1], difficult=[False, True]))
    metrics = evaluate(data, [det("a", [PLANE_DET], [0.9], [0])])
    assert math.isnan(metrics["AP/bicycle"])
    assert metrics["mAP"] == pytest.approx(1.0)


def test_recall_of_exactly_three_tenths_misses_the_devkit_point():
    # The Python devkit's np.arange(0, 1.1, 0.1) point "0.3" is 0.30000000000000004, so a
    # recall of exactly 3/10 does not reach it: 3 of 10 objects found at precision 1 gives
    # points 0, 0.1, 0.2 only (3 of 11), not 4.
    objects = [[1 + 10 * i, 1, 10 + 10 * i, 10] for i in range(10)]
    data = dataset(record("a", objects, [0] * 10))
    predictions = [
        det("a", [[10 * i, 0, 10 + 10 * i, 10] for i in range(3)], [0.9, 0.8, 0.7], [0] * 3)
    ]
    metrics = evaluate(data, predictions)
    assert metrics["mAP_11pt"] == pytest.approx(3 / 11)
    assert metrics["mAP_area"] == pytest.approx(0.3)


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="11pt"):
        VOCEvaluator(dataset(record("a", [PLANE], [0])), metric="07")


def test_area_uses_the_precision_envelope():
    # FP (0.9), TP (0.8), TP (0.7): precision 1/2 at recall 1/2 and 2/3 at recall 1. The
    # envelope lifts the first to 2/3: AP = 2/3 (the raw curve would give 1/4 + 1/3).
    data = dataset(record("a", [PLANE], [0]), record("b", [[101, 101, 200, 150]], [0]))
    predictions = [
        det("a", [[300, 200, 350, 250], PLANE_DET], [0.9, 0.8], [0, 0]),
        det("b", [[100, 100, 200, 150]], [0.7], [0]),
    ]
    metrics = evaluate(data, predictions)
    assert metrics["mAP_area"] == pytest.approx(2 / 3)
    assert metrics["mAP_11pt"] == pytest.approx(2 / 3)


def test_curves_are_the_devkit_walk_behind_each_class_ap():
    # The duplicate scene above: TP, duplicate FP, TP for aeroplane; no other class.
    data = dataset(record("a", [PLANE], [0]), record("b", [[101, 101, 200, 150]], [0]))
    predictions = [
        det("a", [PLANE_DET, PLANE_DET], [0.9, 0.8], [0, 0]),
        det("b", [[100, 100, 200, 150]], [0.7], [0]),
    ]
    evaluator = build_evaluator(data, EvalConfig(voc_metric="area"))
    evaluator.process(predictions)
    metrics = evaluator.evaluate()
    assert list(evaluator.curves) == ["aeroplane"]  # classes without objects have no curve
    curve = evaluator.curves["aeroplane"]
    np.testing.assert_allclose(curve.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve.precision, [1.0, 0.5, 2 / 3])
    assert curve.ap == metrics["AP/aeroplane"]
    evaluator.reset()
    assert evaluator.curves == {}
