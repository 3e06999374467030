"""Training-time filtering as the reference recipe does it, on small hand-written files.

COCO-style readers leave out annotations with an ``ignore`` flag, ``area <= 0``, a box under
1 px wide or high, or a box outside the image (neither training boxes nor ignore regions);
training skips images without a training box and images with a side under 32 px; the
validator counts each rule; evaluation still sees every annotation of the json.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from autoassign.config import DataConfig
from autoassign.data import DatasetError, build_dataset, read_coco, read_objects365
from autoassign.data.__main__ import main as data_main
from autoassign.data.validate import scan_dataset
from autoassign.eval.coco import COCOEvaluator


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _image(path, width, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, format="JPEG")


def _ann(ann_id, bbox, **fields):
    x, y, w, h = bbox
    entry = {"id": ann_id, "image_id": 1, "category_id": 5, "bbox": list(bbox)}
    entry["area"] = fields.pop("area", w * h)
    if entry["area"] is None:
        del entry["area"]
    return entry | fields


# One 64 x 48 image; each annotation meets at most the rule its comment names.
RULES_JSON = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
    "annotations": [
        _ann(1, [10, 10, 20, 15]),  # a training box
        _ann(2, [12, 12, 20, 15], ignore=1),  # ignore_flag
        _ann(3, [14, 14, 20, 15], area=0),  # area
        _ann(4, [16, 16, 0, 15], area=5),  # under_1px: zero width
        _ann(5, [18, 18, 1, 0.1], area=None),  # under_1px: the 1 x 0.1 px box
        _ann(6, [70, 10, 5, 5]),  # outside_image: right of the image
        _ann(7, [30, 20, 10, 10], iscrowd=1),  # a crowd: stays an ignore region
        _ann(8, [30, 20, 10, 10], iscrowd=1, ignore=1),  # ignore_flag beats crowd
        _ann(9, [40, 30, 1, 1], area=None),  # exactly 1 x 1 px, no area: a training box
        _ann(10, [60, 40, 10, 10]),  # partly outside: clipped to 60..64 x 40..48, kept
        _ann(11, [0, 0, 5, 5], ignore=0, area=-3.5),  # area
    ],
    "categories": [{"id": 5, "name": "thing"}],
}
EXPECTED_FILTERED = {
    "ignore_flag": [2, 8],
    "area": [3, 11],
    "under_1px": [4, 5],
    "outside_image": [6],
}


def _read(format, tmp_path, data):
    """``data`` written in ``format``'s layout and read by its reader (no image files)."""
    if format == "coco":
        path = tmp_path / "instances.json"
        _write_json(path, data)
        return read_coco(path, tmp_path / "images")
    for image in data["images"]:
        image["file_name"] = f"images/v2/patch0/{image['file_name']}"
    path = tmp_path / "zhiyuan_objv2_train.json"
    _write_json(path, data)
    return read_objects365(path, tmp_path / "train")


@pytest.mark.parametrize("format", ["coco", "objects365"])
def test_each_rule_leaves_its_annotation_out_of_boxes_and_ignore_regions(tmp_path, format):
    dataset = _read(format, tmp_path, json.loads(json.dumps(RULES_JSON)))
    (record,) = dataset.records
    training = record.boxes[~record.ignore].tolist()
    assert training == [[10, 10, 30, 25], [40, 30, 41, 31], [60, 40, 64, 48]]
    assert record.boxes[record.ignore].tolist() == [[30, 20, 40, 30]]  # only the crowd
    assert dataset.meta["filtered_annotations"] == EXPECTED_FILTERED
    # Filtered annotations are not repaired boxes: no box warning names them.
    assert [p.where for p in dataset.meta["problems"]] == ["annotation id 10"]


def test_annotations_without_ids_are_named_by_position(tmp_path):
    data = json.loads(json.dumps(RULES_JSON))
    data["annotations"] = [
        {k: v for k, v in ann.items() if k != "id"} for ann in data["annotations"][:3]
    ]
    dataset = _read("coco", tmp_path, data)
    assert dataset.meta["filtered_annotations"]["ignore_flag"] == ["annotations[1]"]
    assert dataset.meta["filtered_annotations"]["area"] == ["annotations[2]"]


def test_an_area_that_is_not_a_number_is_an_error_naming_the_annotation(tmp_path):
    data = json.loads(json.dumps(RULES_JSON))
    data["annotations"][0]["area"] = "big"
    with pytest.raises(
        DatasetError, match=r"instances.json: annotation id 1: area must be a number"
    ):
        _read("coco", tmp_path, data)


SIDES = [0, 0.5, 0.999, 1, 1.5, 7, 30, 60, -2]
"""Box widths and heights drawn (pixels), around the 1 px limit, and their odds:"""
SIDE_ODDS = [0.04, 0.04, 0.04, 0.1, 0.1, 0.3, 0.24, 0.1, 0.04]

COUNTS_BY_RULE = {"ignore_flag": 36, "area": 41, "under_1px": 68, "outside_image": 53}
"""What the rule list gives on ``_random_json(default_rng(12))``: every rule fires."""


def _random_json(rng, num_images=12, per_image=30):
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width,
                       "height": height})  # fmt: skip
        for _ in range(per_image):
            # Sizes around the 1 px limit and positions around and outside the image edges.
            w, h = (float(v) for v in rng.choice(SIDES, size=2, p=SIDE_ODDS))
            x = float(rng.uniform(-15, width + 5))
            y = float(rng.uniform(-15, height + 5))
            ann = {"id": len(annotations) + 1, "image_id": image_id,
                   "category_id": int(rng.choice([3, 8])), "bbox": [x, y, w, h]}  # fmt: skip
            area_kind = rng.random()
            if area_kind < 0.5:
                ann["area"] = w * h
            elif area_kind < 0.65:
                ann["area"] = float(rng.choice([0, -1, 5.5]))
            if rng.random() < 0.3:
                ann["iscrowd"] = int(rng.random() < 0.5)
            if rng.random() < 0.2:
                ann["ignore"] = int(rng.random() < 0.5)
            annotations.append(ann)
    categories = [{"id": 8, "name": "b"}, {"id": 3, "name": "a"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _rule_of(ann, width, height):
    """The rule list of ``autoassign.data.coco``'s docstring, written out for one annotation:
    the first rule it meets, or None."""
    x, y, w, h = ann["bbox"]
    if ann.get("ignore", 0):
        return "ignore_flag"
    if "area" in ann and ann["area"] <= 0:
        return "area"
    if w < 1 or h < 1:
        return "under_1px"
    if min(x + w, width) - max(x, 0) <= 0 or min(y + h, height) - max(y, 0) <= 0:
        return "outside_image"
    return None


@pytest.mark.parametrize("format", ["coco", "objects365"])
def test_kept_boxes_equal_what_the_rule_list_implies(tmp_path, format):
    data = _random_json(np.random.default_rng(12))
    size = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    names = {3: "a", 8: "b"}
    expected: dict[tuple, list] = {}
    expected_filtered: dict[str, list] = {}
    for ann in data["annotations"]:
        width, height = size[ann["image_id"]]
        rule = _rule_of(ann, width, height)
        if rule is not None:
            expected_filtered.setdefault(rule, []).append(ann["id"])
            continue
        x, y, w, h = ann["bbox"]
        clipped = (max(x, 0), max(y, 0), min(x + w, width), min(y + h, height))
        key = (ann["image_id"], names[ann["category_id"]], bool(ann.get("iscrowd", 0)))
        expected.setdefault(key, []).append(clipped)

    dataset = _read(format, tmp_path, data)
    kept: dict[tuple, list] = {}
    for record in dataset.records:
        for box, label, ignore in zip(record.boxes, record.labels, record.ignore):
            key = (record.image_id, dataset.class_names[label], bool(ignore))
            kept.setdefault(key, []).append(tuple(float(v) for v in box))
    assert kept.keys() == expected.keys()
    for key, boxes in expected.items():  # float32 boxes against float64 ones
        np.testing.assert_allclose(sorted(kept[key]), sorted(boxes), atol=1e-4, err_msg=key)
    got = {rule: ids for rule, ids in dataset.meta["filtered_annotations"].items() if ids}
    assert got == expected_filtered
    # Every rule fires in this sample, and both training boxes and crowds remain.
    assert {rule: len(ids) for rule, ids in got.items()} == COUNTS_BY_RULE
    assert {crowd for _, _, crowd in kept} == {False, True}
    num_kept = sum(map(len, kept.values()))
    assert num_kept + sum(map(len, got.values())) == len(data["annotations"]) == 360


IMAGES_JSON = {
    "images": [
        {"id": 1, "file_name": "1.jpg", "width": 32, "height": 32},  # exactly 32: trains
        {"id": 2, "file_name": "2.jpg", "width": 31, "height": 64},  # too narrow
        {"id": 3, "file_name": "3.jpg", "width": 64, "height": 31},  # too low
        {"id": 4, "file_name": "4.jpg", "width": 64, "height": 64},  # no boxes
        {"id": 5, "file_name": "5.jpg", "width": 20, "height": 20},  # no boxes and small
        {"id": 6, "file_name": "6.jpg", "width": 64, "height": 64},  # a filtered box only
    ],
    "annotations": [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100}
        for i in (1, 2, 3)
    ]
    + [{"id": 6, "image_id": 6, "category_id": 1, "bbox": [2, 2, 10, 0.5], "area": 5}],
    "categories": [{"id": 1, "name": "thing"}],
}


def _coco_root(tmp_path, data, splits=("train", "val"), with_images=False):
    for split in splits:
        _write_json(tmp_path / "annotations" / f"instances_{split}.json", data)
        if with_images:
            for image in data["images"]:
                _image(tmp_path / split / image["file_name"], image["width"], image["height"])
    return tmp_path


def test_training_skips_small_and_empty_images_other_splits_keep_them(tmp_path):
    root = _coco_root(tmp_path, IMAGES_JSON)
    train = build_dataset(DataConfig(format="coco", root=root), "train")
    assert [r.image_id for r in train.records] == [1]
    assert train.meta["skipped_images"] == {"no_training_boxes": [4, 5, 6], "small_image": [2, 3]}
    assert train.meta["skipped_empty"] == 3
    val = build_dataset(DataConfig(format="coco", root=root), "val")
    assert [r.image_id for r in val.records] == [1, 2, 3, 4, 5, 6]

    keeping_empty = DataConfig(format="coco", root=root, skip_empty_train_images=False)
    train = build_dataset(keeping_empty, "train")
    assert [r.image_id for r in train.records] == [1, 4, 6]
    assert train.meta["skipped_images"] == {"no_training_boxes": [], "small_image": [2, 3, 5]}


def test_voc_training_skips_small_images_too(tmp_path):
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    (tmp_path / "ImageSets/Main/train.txt").write_text("big\nsmall\n")
    for image_id, (width, height) in {"big": (40, 32), "small": (40, 31)}.items():
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><object><name>dog</name>"
            "<difficult>0</difficult><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax>"
            "<ymax>20</ymax></bndbox></object></annotation>"
        )
    train = build_dataset(DataConfig(format="voc", root=tmp_path), "train")
    assert [r.image_id for r in train.records] == ["big"]
    assert train.meta["skipped_images"]["small_image"] == ["small"]


def test_validator_counts_every_rule_with_the_first_ids(tmp_path, capsys):
    data = json.loads(json.dumps(IMAGES_JSON))
    rules = json.loads(json.dumps(RULES_JSON))["annotations"]
    for index, ann in enumerate(rules):  # every rule on image 4 (64 x 64), ids from 101
        data["annotations"].append(ann | {"id": 101 + index, "image_id": 4, "category_id": 1})
    data["annotations"] += [
        {"id": 201 + i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "ignore": 1}
        for i in range(7)
    ]
    root = _coco_root(tmp_path, data, with_images=True)

    report = scan_dataset(DataConfig(format="coco", root=root), "train")
    assert report.ok, report.summary()
    assert {rule: len(ids) for rule, ids in report.filtered_annotations.items()} == {
        "ignore_flag": 9, "area": 2, "under_1px": 3, "outside_image": 1,
    }  # fmt: skip
    assert report.filtered_images == {"no_training_boxes": [5, 6], "small_image": [2, 3]}
    summary = report.summary()
    assert "annotations not used for training (the reference recipe's rules):" in summary
    assert "    'ignore' flag set: 9 (ids 102, 108, 201, 202, 203, ...)" in summary
    assert "    'area' 0 or less: 2 (ids 103, 111)" in summary
    assert "    box under 1 px wide or high: 3 (ids 6, 104, 105)" in summary
    assert "    box outside its image: 1 (id 106)" in summary
    assert "  training images skipped:\n    no training box: 2 (ids 5, 6)\n" in summary
    assert "    a side under 32 px: 2 (ids 2, 3)" in summary

    assert data_main(["validate", "--format", "coco", "--root", str(root), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["filtered_annotations"]["outside_image"] == [106]
    assert as_json["filtered_images"]["small_image"] == [2, 3]

    # Another split: the same annotation rules, but no image is skipped.
    val = scan_dataset(DataConfig(format="coco", root=root), "val")
    assert val.filtered_images == {} and "training images skipped" not in val.summary()
    assert len(val.filtered_annotations["ignore_flag"]) == 9


def test_voc_scan_has_no_annotation_rules(tmp_path):
    from autoassign.data.synthetic import write_synthetic

    write_synthetic("voc", tmp_path, num_images=4, image_size=96, seed=0, splits=("train",))
    report = scan_dataset(DataConfig(format="voc", root=tmp_path), "train")
    assert report.filtered_annotations == {}
    assert "annotations not used for training" not in report.summary()
    assert "training images skipped" in report.summary()


def test_evaluation_still_counts_filtered_annotations(tmp_path):
    """pycocotools reads the json: an annotation with ``ignore: 1`` is still ground truth."""
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 200}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 50, 50],
                "area": 2500,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [100, 100, 50, 50],
                "area": 2500,
                "iscrowd": 0,
                "ignore": 1,
            },
        ],  # fmt: skip
        "categories": [{"id": 1, "name": "thing"}],
    }
    root = _coco_root(tmp_path, data, splits=("val",))
    dataset = build_dataset(DataConfig(format="coco", root=root), "val")
    assert dataset.records[0].boxes.tolist() == [[10, 10, 60, 60]]  # not a training box

    def ap(boxes):
        evaluator = COCOEvaluator(dataset)
        evaluator.reset()
        evaluator.process([{"file_name": "a.jpg", "boxes": np.array(boxes, dtype=float),
                            "scores": np.linspace(0.9, 0.8, len(boxes)),
                            "labels": np.zeros(len(boxes), dtype=np.int64)}])  # fmt: skip
        return evaluator.evaluate()["bbox_mAP"]

    assert ap([[10, 10, 60, 60], [100, 100, 150, 150]]) == pytest.approx(1.0)
    # Finding only the training box recalls half of the ground truth.
    assert ap([[10, 10, 60, 60]]) == pytest.approx(0.5, abs=0.01)
    assert not math.isnan(ap([[100, 100, 150, 150]]))
