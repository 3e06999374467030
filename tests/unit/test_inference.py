"""Inference: ``head.predict`` on hand-set head outputs, and the full model's box frames."""

from __future__ import annotations

import pytest
import torch

from autoassign.config import ModelConfig
from autoassign.model import build_detector
from autoassign.model.head import AutoAssignHead

torch.set_num_threads(1)

BACKGROUND = 0.001
"""Class probability of every (point, class) pair a test does not set."""


class HeadOutputs:
    """Hand-made head outputs for one image on levels of stride 8 and 16.

    ``set(level, row, col, label, cls, obj, distances)`` sets one point; probabilities are
    stored as logits, distances (left, top, right, bottom) in pixels.
    """

    def __init__(self, size: int = 64, num_classes: int = 3, strides=(8, 16)):
        self.strides = list(strides)
        self.cls = [
            torch.full((1, num_classes, size // s, size // s), BACKGROUND).logit() for s in strides
        ]
        self.obj = [torch.full((1, 1, size // s, size // s), 0.5).logit() for s in strides]
        self.bbox = [torch.full((1, 4, size // s, size // s), 2.0) for s in strides]

    def set(self, level, row, col, label, cls, obj=0.5, distances=(4.0, 4.0, 4.0, 4.0)):
        self.cls[level][0, label, row, col] = torch.tensor(cls).logit()
        self.obj[level][0, 0, row, col] = torch.tensor(obj).logit()
        self.bbox[level][0, :, row, col] = torch.tensor(distances)

    def predict(self, head, image_size=(64, 64)):
        return head.predict(self.cls, self.bbox, self.obj, [image_size])[0]


def make_head(**kwargs) -> AutoAssignHead:
    settings = {"in_channels": 32, "num_classes": 3, "strides": [8, 16], "num_convs": 0}
    return AutoAssignHead(**(settings | kwargs))


def test_score_threshold_looks_at_class_probability_alone():
    outputs = HeadOutputs()
    outputs.set(0, 1, 1, label=0, cls=0.06, obj=0.1)  # point (8, 8): score 0.006, kept
    outputs.set(0, 2, 2, label=1, cls=0.04, obj=1.0)  # point (16, 16): cls below 0.05
    result = outputs.predict(make_head())
    assert result["labels"].tolist() == [0]
    assert result["scores"].tolist() == pytest.approx([0.006], rel=1e-4)
    torch.testing.assert_close(result["boxes"], torch.tensor([[4.0, 4.0, 12.0, 12.0]]))
    assert result["labels"].dtype == torch.int64


def test_top_k_is_per_level_and_ranks_class_probability_alone():
    outputs = HeadOutputs()
    # Level 0 (stride 8): the third point has the best final score but the lowest cls.
    outputs.set(0, 1, 1, label=0, cls=0.9, obj=0.2)  # final 0.18
    outputs.set(0, 1, 4, label=0, cls=0.8, obj=0.2)  # final 0.16
    outputs.set(0, 4, 1, label=0, cls=0.7, obj=0.99)  # final 0.693, outside the top 2
    outputs.set(1, 3, 3, label=2, cls=0.5, obj=0.5)  # level 1 has its own top 2
    result = outputs.predict(make_head(pre_nms_top_k=2))
    assert result["scores"].tolist() == pytest.approx([0.25, 0.18, 0.16], rel=1e-4)
    assert result["labels"].tolist() == [2, 0, 0]
    everything = outputs.predict(make_head(pre_nms_top_k=1000))
    assert everything["scores"].tolist() == pytest.approx([0.693, 0.25, 0.18, 0.16], rel=1e-4)


def test_nms_is_per_class_with_iou_0_6():
    outputs = HeadOutputs()
    # Same point, same box, two classes: both kept.
    outputs.set(0, 2, 2, label=0, cls=0.9, obj=1.0, distances=(8.0, 8.0, 8.0, 8.0))
    outputs.cls[0][0, 1, 2, 2] = torch.tensor(0.8).logit()
    # Class 2: (8, 8, 24, 24) and (10, 8, 26, 24) overlap with IoU 0.78: the weaker goes.
    outputs.set(0, 5, 2, label=2, cls=0.7, obj=1.0, distances=(8.0, 8.0, 8.0, 8.0))
    outputs.set(0, 5, 3, label=2, cls=0.6, obj=1.0, distances=(14.0, 8.0, 2.0, 8.0))
    # Class 2 again: (16, 32, 32, 48) has IoU 1/3 with the first class-2 box: kept.
    outputs.set(0, 5, 4, label=2, cls=0.55, obj=1.0, distances=(16.0, 8.0, 0.0, 8.0))
    result = outputs.predict(make_head())
    assert result["labels"].tolist() == [0, 1, 2, 2]
    assert result["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.55], rel=1e-3)
    torch.testing.assert_close(result["boxes"][0], result["boxes"][1])


def test_at_most_max_detections_best_scores_first():
    torch.manual_seed(0)
    outputs = HeadOutputs(num_classes=1)
    probabilities = torch.rand(8, 8) * 0.9 + 0.06  # every point above the threshold
    outputs.cls[0][0, 0] = probabilities.logit()
    outputs.bbox[0].fill_(2.0)  # 4x4 boxes 8 px apart: no overlaps
    outputs.cls[1].fill_(-20.0)
    result = outputs.predict(make_head(num_classes=1, max_detections=20))
    expected = (probabilities * 0.5).flatten().sort(descending=True).values[:20]
    torch.testing.assert_close(result["scores"], expected)
    assert len(outputs.predict(make_head(num_classes=1))["scores"]) == 64


def test_boxes_are_clipped_to_the_image_before_padding():
    outputs = HeadOutputs()
    outputs.set(0, 0, 0, label=0, cls=0.9, distances=(8.0, 8.0, 8.0, 8.0))  # (-8, -8, 8, 8)
    outputs.set(0, 3, 4, label=1, cls=0.8, distances=(4.0, 4.0, 30.0, 30.0))  # (28, 20, 62, 54)
    outputs.set(0, 7, 7, label=2, cls=0.7, distances=(4.0, 4.0, 4.0, 4.0))  # outside: dropped
    result = outputs.predict(make_head(), image_size=(30, 40))
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[0.0, 0.0, 8.0, 8.0], [28.0, 20.0, 40.0, 30.0]])
    )
    assert result["labels"].tolist() == [0, 1]


def test_zero_size_boxes_are_dropped():
    outputs = HeadOutputs()
    outputs.set(0, 1, 1, label=0, cls=0.9, distances=(0.0, 4.0, 0.0, 4.0))
    outputs.set(0, 3, 3, label=0, cls=0.8)
    result = outputs.predict(make_head())
    assert result["scores"].tolist() == pytest.approx([0.4])


def test_batched_prediction_equals_one_image_at_a_time():
    torch.manual_seed(1)
    head = make_head()
    cls = [torch.randn(2, 3, 8, 8) - 1.0, torch.randn(2, 3, 4, 4) - 1.0]
    bbox = [torch.rand(2, 4, 8, 8) * 20, torch.rand(2, 4, 4, 4) * 40]
    obj = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4)]
    sizes = [(64, 64), (50, 37)]
    batched = head.predict(cls, bbox, obj, sizes)
    for i in range(2):
        single = head.predict(
            [c[i : i + 1] for c in cls],
            [b[i : i + 1] for b in bbox],
            [o[i : i + 1] for o in obj],
            [sizes[i]],
        )[0]
        assert len(single["scores"]) > 10
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(batched[i][key], single[key])
    assert (batched[1]["boxes"][:, 2] <= 37).all() and (batched[1]["boxes"][:, 3] <= 50).all()


def test_model_maps_boxes_to_original_sizes():
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=2, fpn_channels=32, backbone={"depth": 18}, head={"num_convs": 1})
    model = build_detector(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(0.0)  # probabilities near 0.5: plenty of detections
        images = [torch.rand(3, 64, 96) * 255, torch.rand(3, 40, 50) * 255]
        in_frame = model(images)
        rescaled = model(images, original_sizes=[(128, 288), (20, 25)])
        padded = torch.zeros(2, 3, 64, 96)
        padded[0], padded[1, :, :40, :50] = images[0], images[1]
        from_batch = model(padded, image_sizes=[(64, 96), (40, 50)])
    assert len(in_frame[0]["boxes"]) > 0 and len(in_frame[1]["boxes"]) > 0
    factors = [torch.tensor([3.0, 2.0, 3.0, 2.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])]
    limits = [torch.tensor([288.0, 128.0, 288.0, 128.0]), torch.tensor([25.0, 20.0, 25.0, 20.0])]
    for i in range(2):
        expected = torch.minimum(in_frame[i]["boxes"] * factors[i], limits[i])
        torch.testing.assert_close(rescaled[i]["boxes"], expected)
        torch.testing.assert_close(rescaled[i]["scores"], in_frame[i]["scores"])
        torch.testing.assert_close(from_batch[i]["boxes"], in_frame[i]["boxes"])
    assert (in_frame[1]["boxes"][:, 2] <= 50).all() and (in_frame[1]["boxes"][:, 3] <= 40).all()
