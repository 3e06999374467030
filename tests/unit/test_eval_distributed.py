"""Evaluators under a real two-process gloo group: all ranks get the single-process metrics,
computed once, on rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval import build_evaluator


def scene(tmp_path: Path) -> tuple[DetectionDataset, list[dict]]:
    """Three VOC-style images with one class; detections of various quality."""
    boxes = [[10, 10, 60, 60], [20, 30, 90, 80], [0, 0, 40, 50]]
    records = [
        ImageRecord(
            file_name=f"{i}.jpg",
            path=tmp_path / f"{i}.jpg",
            width=100,
            height=100,
            boxes=np.array([box], np.float32),
            labels=np.zeros(1, np.int64),
            ignore=np.zeros(1, bool),
            image_id=str(i),
        )
        for i, box in enumerate(boxes)
    ]
    dataset = DetectionDataset("voc", "test", records, ["thing"])
    predictions = [
        # image 0: a hit (0.9) and a miss (0.8); image 1: a hit (0.7); image 2: a miss (0.95).
        {"file_name": "0.jpg", "boxes": [[10, 10, 60, 60], [70, 70, 99, 99]], "scores": [0.9, 0.8]},
        {"file_name": "1.jpg", "boxes": [[21, 30, 90, 81]], "scores": [0.7]},
        {"file_name": "2.jpg", "boxes": [[50, 50, 90, 90]], "scores": [0.95]},
    ]
    for p in predictions:
        p["boxes"] = np.array(p["boxes"], np.float64)
        p["scores"] = np.array(p["scores"], np.float64)
        p["labels"] = np.zeros(len(p["scores"]), np.int64)
    return dataset, predictions


def rank_main(rank: int, store_file: str, out_dir: str, dataset, shards) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        evaluator = build_evaluator(dataset)
        calls = []
        compute = evaluator.compute
        evaluator.compute = lambda store: calls.append(len(store)) or compute(store)
        evaluator.reset()
        evaluator.process(shards[rank])
        metrics = evaluator.evaluate()
        result = {"metrics": metrics, "compute_calls": calls}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_ranks_agree_with_one_process(tmp_path):
    dataset, predictions = scene(tmp_path)
    single = build_evaluator(dataset)
    single.process(predictions)
    expected = single.evaluate()
    # Ranked: 0.95 miss, 0.9 hit, 0.8 miss, 0.7 hit over 3 objects:
    # precision 1/2 at recall 1/3, 2/4 at recall 2/3 -> area AP = 1/3 * 1/2 + 1/3 * 1/2.
    assert expected["mAP_area"] == pytest.approx(1 / 3)

    # Rank 1 also processes image 0 (DistributedSampler padding): it must count once.
    shards = [predictions[:2], predictions[2:] + predictions[:1]]
    mp.spawn(
        rank_main,
        args=(str(tmp_path / "store"), str(tmp_path), dataset, shards),
        nprocs=2,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["metrics"] == pytest.approx(expected), rank
    # Only rank 0 ran the protocol, on the merged store of all 3 images.
    assert [result["compute_calls"] for result in results] == [[3], []]


def test_primary_metric_is_among_the_metrics(tmp_path):
    dataset, predictions = scene(tmp_path)
    evaluator = build_evaluator(dataset)
    evaluator.process(predictions)
    assert evaluator.primary_metric == "mAP"
    assert evaluator.primary_metric in evaluator.evaluate()
