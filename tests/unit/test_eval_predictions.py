"""Predictions files: the project format (JSON list or lines) and COCO results, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval.predictions import PredictionsFileError, load_predictions, write_predictions


def make_dataset(fmt: str = "coco") -> DetectionDataset:
    records = [
        ImageRecord(
            file_name=name,
            path=Path(name),
            width=64,
            height=48,
            boxes=np.array([[1, 2, 30, 40]], np.float32),
            labels=np.array([1], np.int64),
            ignore=np.zeros(1, bool),
            image_id=image_id,
        )
        for name, image_id in (("a.jpg", 11), ("b.jpg", 42))
    ]
    return DetectionDataset(fmt, "val", records, ["person", "car"], meta={"category_ids": [1, 3]})


def predictions() -> list[dict]:
    return [
        {
            "file_name": "a.jpg",
            "boxes": np.array([[1.5, 2.0, 30.25, 40.0], [0, 0, 10, 10]]),
            "scores": np.array([0.9, 0.25]),
            "labels": np.array([1, 0]),
        },
        {
            "file_name": "b.jpg",
            "boxes": np.zeros((0, 4)),
            "scores": np.zeros(0),
            "labels": np.zeros(0, np.int64),
        },
    ]


def test_round_trip_with_class_names(tmp_path):
    dataset = make_dataset()
    path = tmp_path / "preds.json"
    write_predictions(path, dataset, predictions())
    on_disk = json.loads(path.read_text())
    assert on_disk[0]["labels"] == ["car", "person"]
    assert on_disk[0]["boxes"][0] == [1.5, 2.0, 30.25, 40.0]

    loaded = load_predictions(path, dataset)
    assert [p["file_name"] for p in loaded] == ["a.jpg", "b.jpg"]
    for got, expected in zip(loaded, predictions()):
        np.testing.assert_array_equal(got["boxes"], expected["boxes"])
        np.testing.assert_array_equal(got["scores"], expected["scores"])
        np.testing.assert_array_equal(got["labels"], expected["labels"])
        assert got["boxes"].shape[1] == 4 and got["labels"].dtype == np.int64


def test_json_lines(tmp_path):
    path = tmp_path / "preds.jsonl"
    lines = [
        {"file_name": "b.jpg", "boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": ["person"]},
        {"file_name": "a.jpg", "boxes": [], "scores": [], "labels": []},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    loaded = load_predictions(path, make_dataset())
    assert loaded[0]["file_name"] == "b.jpg"
    assert loaded[0]["labels"].tolist() == [0]
    assert loaded[1]["boxes"].shape == (0, 4)


def test_coco_results_format_is_detected(tmp_path):
    path = tmp_path / "results.json"
    results = [
        {"image_id": 42, "category_id": 3, "bbox": [10, 20, 5, 8], "score": 0.8},
        {"image_id": 11, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.3},
        {"image_id": 42, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.6},
    ]
    path.write_text(json.dumps(results))
    loaded = {p["file_name"]: p for p in load_predictions(path, make_dataset("objects365"))}
    np.testing.assert_array_equal(loaded["b.jpg"]["boxes"], [[10, 20, 15, 28], [1, 1, 3, 3]])
    assert loaded["b.jpg"]["labels"].tolist() == [1, 0]
    assert loaded["b.jpg"]["scores"].tolist() == [0.8, 0.6]
    assert loaded["a.jpg"]["labels"].tolist() == [0]

    with pytest.raises(PredictionsFileError, match="COCO results format"):
        load_predictions(path, make_dataset("voc"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [{"file_name": "zzz.jpg", "boxes": [], "scores": [], "labels": []}],
            r"entry 0: image 'zzz.jpg' is not in",
        ),
        (
            [{"file_name": "a.jpg", "boxes": [[0, 0, 1, 1]], "scores": [1], "labels": ["bus"]}],
            r"entry 0: unknown class name 'bus'",
        ),
        (
            [
                {"file_name": "a.jpg", "boxes": [], "scores": [], "labels": []},
                {"file_name": "a.jpg", "boxes": [], "scores": [], "labels": []},
            ],
            r"entry 1: image 'a.jpg' already has predictions at .* entry 0",
        ),
        (
            [{"file_name": "a.jpg", "boxes": [[0, 0, 1]], "scores": [1], "labels": ["car"]}],
            r"entry 0: 'boxes' must have shape \[K, 4\]",
        ),
        (
            [{"file_name": "a.jpg", "boxes": [[0, 0, 1, 1]], "scores": [], "labels": ["car"]}],
            r"entry 0: .*different lengths",
        ),
        (
            [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}],
            r"entry 0: image_id 99 is not in",
        ),
        (
            [{"image_id": 11, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}],
            r"entry 0: unknown category_id 2",
        ),
        ({"not": "a list"}, r"line 1: missing 'file_name'"),
    ],
)
def test_bad_files_name_the_entry(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PredictionsFileError, match=message) as error:
        load_predictions(path, make_dataset())
    assert "bad.json" in str(error.value)


def test_malformed_json_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"file_name": "a.jpg", "boxes": [], "scores": [], "labels": []}\n{oops\n')
    with pytest.raises(PredictionsFileError, match=r"bad.jsonl line 2: not JSON"):
        load_predictions(path, make_dataset())


def test_missing_file(tmp_path):
    with pytest.raises(PredictionsFileError, match="nothing.json"):
        load_predictions(tmp_path / "nothing.json", make_dataset())
