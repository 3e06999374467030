"""WiderFace evaluator: each step of the official tool on hand-made cases with known AP.

The ground truth is written as real ``.mat`` files in the official layout (cell arrays
``event_list``, ``file_list``, ``face_bbx_list``, ``gt_list`` with 1-based face indices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from autoassign.config import EvalConfig
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval import EvaluationError, WiderFaceEvaluator, build_evaluator

SETTINGS = ("easy", "medium", "hard")


@dataclass
class Image:
    """One image: faces ``x y w h``, the 1-based faces each setting counts (all by default)."""

    event: str
    name: str
    faces: list[list[float]]
    counted: dict[str, list[int]] = field(default_factory=dict)
    attributes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"{self.event}/{self.name}.jpg"

    def counted_in(self, setting: str) -> list[int]:
        return self.counted.get(setting, list(range(1, len(self.faces) + 1)))


def cell(items: list) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        array[i, 0] = item
    return array


def write_ground_truth(directory: Path, images: list[Image], split: str = "val") -> None:
    """The four official .mat files for ``images`` (named ``..._<split>.mat``)."""
    directory.mkdir(parents=True, exist_ok=True)
    events = list(dict.fromkeys(image.event for image in images))
    per_event = [[image for image in images if image.event == event] for event in events]
    faces = cell(
        [cell([np.array(i.faces, np.float64).reshape(-1, 4) for i in group]) for group in per_event]
    )
    files = cell([cell([i.name for i in group]) for group in per_event])
    scipy.io.savemat(
        directory / f"wider_face_{split}.mat",
        {"event_list": cell(events), "file_list": files, "face_bbx_list": faces},
    )
    for setting in SETTINGS:
        gt_list = cell(
            [
                cell([np.array(i.counted_in(setting), np.int32).reshape(-1, 1) for i in group])
                for group in per_event
            ]
        )
        scipy.io.savemat(
            directory / f"wider_{setting}_{split}.mat",
            {"event_list": cell(events), "file_list": files, "gt_list": gt_list},
        )


def make_dataset(
    root: Path, images: list[Image], invalid=(), split: str = "val"
) -> DetectionDataset:
    """Records as the WiderFace reader makes them: ``x1 y1 x2 y2`` = ``x, y, x + w, y + h``."""
    records = []
    for index, image in enumerate(images):
        xywh = np.array(image.faces, np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        records.append(
            ImageRecord(
                file_name=image.file_name,
                path=root / "images" / image.file_name,
                width=1024,
                height=768,
                boxes=boxes,
                labels=np.zeros(len(boxes), np.int64),
                ignore=np.array([(index, k) in invalid for k in range(len(boxes))], bool),
                image_id=index,
                attributes={k: np.array(v, np.int64) for k, v in image.attributes.items()},
            )
        )
    return DetectionDataset("widerface", split, records, ["face"], meta={"root": root})


def det(image: Image, boxes_xyxy, scores) -> dict:
    return {
        "file_name": image.file_name,
        "boxes": np.array(boxes_xyxy, np.float64).reshape(-1, 4),
        "scores": np.array(scores, np.float64),
        "labels": np.zeros(len(scores), np.int64),
    }


def xyxy(face: list[float]) -> list[float]:
    x, y, w, h = face
    return [x, y, x + w, y + h]


def evaluate(tmp_path: Path, images: list[Image], predictions: list[dict], **kwargs):
    write_ground_truth(tmp_path / "ground_truth", images)
    evaluator = build_evaluator(make_dataset(tmp_path, images, **kwargs))
    evaluator.process(predictions)
    return evaluator.evaluate(), evaluator


FACE_A = [10, 10, 40, 40]
FACE_B = [100, 100, 40, 40]
NOWHERE = [300, 300, 340, 340]


def test_scores_are_min_max_normalised_over_the_split(tmp_path):
    image = Image("0--Parade", "0_Parade_1", [FACE_A, FACE_B])
    # Raw scores 0.5004 (hit A), 0.5 (miss), 0.4 (hit B). Normalised: 1.0, 0.996, 0.0, so
    # thresholds 0.999 .. 0.997 see the first hit alone: precision 1 at recall 1/2; then
    # precision 1/2 at recall 1/2, and 2/3 at recall 1 (threshold 0).
    # AP = 1/2 * 1 + 1/2 * 2/3. On raw scores the hit and the miss would never separate
    # (both pass threshold 0.500, neither 0.501) and AP would be 1/2 * 2/3 + 1/2 * 2/3.
    boxes = [xyxy(FACE_A), NOWHERE, xyxy(FACE_B)]
    metrics, evaluator = evaluate(tmp_path, [image], [det(image, boxes, [0.5004, 0.5, 0.4])])
    assert metrics["AP_hard"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert evaluator.notes == []

    # Any increasing affine change of the scores gives the same normalised scores.
    shifted, _ = evaluate(tmp_path, [image], [det(image, boxes, [7.5012, 7.5, 7.2])])
    assert shifted["AP_hard"] == pytest.approx(metrics["AP_hard"])


def test_faces_outside_a_setting_are_ignored(tmp_path):
    # Face B does not count in easy and medium; a detection on it is ignored there (not a
    # false positive). Normalised scores: on B 1.0, on A 0.5, miss 0.0.
    image = Image("1--Handshaking", "1_Handshaking_1", [FACE_A, FACE_B], {"easy": [1]})
    image.counted["medium"] = [1]
    boxes = [xyxy(FACE_B), xyxy(FACE_A), NOWHERE]
    metrics, _ = evaluate(tmp_path, [image], [det(image, boxes, [0.9, 0.5, 0.1])])
    # easy: thresholds above 0.5 have no proposal (0/0 precision, recall 0, adds nothing);
    # then the hit on A: precision 1 at recall 1; the miss: 1/2 at recall 1. AP = 1.
    # Were the detection on B a false positive, AP would be 1/2.
    assert metrics["AP_easy"] == pytest.approx(1.0)
    assert metrics["AP_medium"] == pytest.approx(1.0)
    # hard counts both: 1 at recall 1/2, 1 at recall 1.
    assert metrics["AP_hard"] == pytest.approx(1.0)


def test_a_face_recalled_twice_counts_once(tmp_path):
    image = Image("0--Parade", "0_Parade_2", [FACE_A, FACE_B])
    boxes = [xyxy(FACE_A), [11, 10, 51, 50], xyxy(FACE_B)]
    metrics, _ = evaluate(tmp_path, [image], [det(image, boxes, [0.9, 0.8, 0.1])])
    # precision 1 at recall 1/2; 1/2 at recall 1/2; 2/3 at recall 1.
    assert metrics["AP_hard"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_legacy_plus_one_iou_at_exactly_one_half(tmp_path):
    # Face x y w h = 0 0 9 9 is the box (0, 0, 9, 9): 10 x 10 pixels with the +1 widths.
    # Detection (0, 0, 9, 19): 10 x 20 pixels, IoU = 100 / 200 = 0.5, which matches (>= 0.5).
    # Without the +1 it would be 81 / 171 < 0.5. A second image with faces and a low-score
    # miss sets the normalisation minimum.
    tiny = Image("2--Demonstration", "2_Demonstration_1", [[0, 0, 9, 9]])
    other = Image("2--Demonstration", "2_Demonstration_2", [FACE_A])
    predictions = [det(tiny, [[0, 0, 9, 19]], [0.9]), det(other, [NOWHERE], [0.1])]
    metrics, _ = evaluate(tmp_path, [tiny, other], predictions)
    # Recall 1/2 at precision 1, then precision 1/2 at the same recall: AP = 1/2.
    assert metrics["AP_hard"] == pytest.approx(0.5)

    # One more pixel of height: 100 / 210 < 0.5, no match.
    predictions[0] = det(tiny, [[0, 0, 9, 20]], [0.9])
    metrics, _ = evaluate(tmp_path, [tiny, other], predictions)
    assert metrics["AP_hard"] == 0.0


def test_images_without_faces_or_detections_are_skipped(tmp_path):
    hit = Image("3--Riot", "3_Riot_1", [FACE_A])
    no_faces = Image("3--Riot", "3_Riot_2", [])
    undetected = Image("4--Dancing", "4_Dancing_1", [FACE_A])
    miss = Image("4--Dancing", "4_Dancing_2", [FACE_B])
    predictions = [
        det(hit, [xyxy(FACE_A)], [0.6]),
        det(no_faces, [NOWHERE], [0.9]),  # the maximum score, but counts nowhere else
        det(miss, [NOWHERE], [0.3]),  # the minimum score
    ]
    # Normalised: hit 0.5, no-face 1.0, miss 0.0. Thresholds above 0.5: no proposal.
    # (0, 0.5]: precision 1 at recall 1/3 (3 counted faces, the undetected one included).
    # 0: precision 1/2 at recall 1/3. AP = 1/3. Had the no-face detection been a false
    # positive AP would be 1/6; had the undetected face been dropped, 1/2.
    metrics, _ = evaluate(tmp_path, [hit, no_faces, undetected, miss], predictions)
    assert metrics["AP_hard"] == pytest.approx(1 / 3)


def test_images_are_matched_by_event_and_name(tmp_path):
    first = Image("5--Car_Accident", "5_Car_Accident_1", [FACE_A])
    second = Image("6--Funeral", "6_Funeral_1", [FACE_B])
    absent = Image("6--Funeral", "6_Funeral_2", [FACE_A])
    write_ground_truth(tmp_path / "ground_truth", [first, second, absent])
    # The dataset lists the images in another order and lacks one of the .mat images.
    dataset = make_dataset(tmp_path, [second, first])
    evaluator = WiderFaceEvaluator(dataset)
    evaluator.process([det(first, [xyxy(FACE_A)], [0.9]), det(second, [NOWHERE], [0.2])])
    metrics = evaluator.evaluate()
    # hit (1.0) then miss (0.0) over 2 faces: 1 at recall 1/2, 1/2 at recall 1/2.
    assert metrics["AP_hard"] == pytest.approx(0.5)
    assert any(
        "1 images of wider_face_val.mat are not in the dataset" in n for n in evaluator.notes
    )


def test_explicit_ground_truth_folder(tmp_path):
    image = Image("0--Parade", "0_Parade_1", [FACE_A])
    write_ground_truth(tmp_path / "elsewhere", [image])
    dataset = make_dataset(tmp_path / "root-without-ground-truth", [image])
    cfg = EvalConfig(widerface_ground_truth=tmp_path / "elsewhere")
    evaluator = build_evaluator(dataset, cfg)
    evaluator.process([det(image, [xyxy(FACE_A), NOWHERE], [0.9, 0.1])])
    assert evaluator.evaluate()["AP_easy"] == pytest.approx(1.0)
    assert evaluator.notes == []

    missing = build_evaluator(dataset, EvalConfig(widerface_ground_truth=tmp_path / "nothing"))
    with pytest.raises(EvaluationError, match="wider_face_val.mat"):
        missing.evaluate()


def test_fallback_rule_without_mat_files(tmp_path):
    # Heights 60 (easy), 30 (medium), 12 (hard only), 5 (no setting).
    faces = [[10, 10, 50, 60], [100, 10, 25, 30], [200, 10, 10, 12], [300, 10, 4, 5]]
    image = Image(
        "7--Cheering",
        "7_Cheering_1",
        faces,
        attributes={"occlusion": [0, 1, 2, 0], "blur": [0, 1, 2, 0]},
    )
    dataset = make_dataset(tmp_path, [image])  # no ground_truth folder under the root
    evaluator = build_evaluator(dataset)
    boxes = [NOWHERE] + [xyxy(face) for face in faces]
    # Normalised over 0.1 .. 0.95: miss 1.0, then the faces by height, the 5 px face last.
    evaluator.process([det(image, boxes, [0.95, 0.8, 0.7, 0.6, 0.1])])
    metrics = evaluator.evaluate()
    assert any("fallback rule" in note for note in evaluator.notes)
    assert all(isinstance(value, float) for value in metrics.values())
    # easy counts the 60 px face: the miss, then the hit -> 1/2 at recall 1.
    assert metrics["AP_easy"] == pytest.approx(0.5)
    # medium: 1/2 at recall 1/2, 2/3 at recall 1 -> envelope 2/3 everywhere.
    assert metrics["AP_medium"] == pytest.approx(2 / 3)
    # hard: 1/2, 2/3, 3/4 at recall 1/3, 2/3, 1 -> 3/4.
    assert metrics["AP_hard"] == pytest.approx(3 / 4)


def test_fallback_ignores_invalid_faces(tmp_path):
    image = Image("7--Cheering", "7_Cheering_2", [[10, 10, 50, 60], [100, 10, 50, 60]])
    dataset = make_dataset(tmp_path, [image], invalid={(0, 1)})
    evaluator = build_evaluator(dataset)
    # The detection on the invalid face is neither a hit nor a miss.
    evaluator.process([det(image, [xyxy(image.faces[1]), xyxy(image.faces[0])], [0.9, 0.1])])
    assert evaluator.evaluate()["AP_easy"] == pytest.approx(1.0)


def test_no_detections_at_all(tmp_path):
    image = Image("0--Parade", "0_Parade_1", [FACE_A])
    metrics, _ = evaluate(tmp_path, [image], [])
    assert metrics == {"AP_easy": 0.0, "AP_medium": 0.0, "AP_hard": 0.0}


def test_setting_without_counted_faces_is_nan(tmp_path):
    image = Image("0--Parade", "0_Parade_1", [FACE_A], {"easy": []})
    metrics, _ = evaluate(tmp_path, [image], [det(image, [xyxy(FACE_A), NOWHERE], [0.9, 0.1])])
    assert math.isnan(metrics["AP_easy"])
    assert metrics["AP_hard"] == pytest.approx(1.0)


def test_files_named_after_the_split_come_first(tmp_path):
    image = Image("0--Parade", "0_Parade_1", [FACE_A, FACE_B])
    # Official names say both faces count; the split's own files count only face A.
    write_ground_truth(tmp_path / "ground_truth", [image])
    own = Image("0--Parade", "0_Parade_1", [FACE_A, FACE_B], {s: [1] for s in SETTINGS})
    write_ground_truth(tmp_path / "ground_truth", [own], split="minival")
    predictions = [det(image, [xyxy(FACE_A), NOWHERE], [0.9, 0.1])]

    evaluator = build_evaluator(make_dataset(tmp_path, [image], split="minival"))
    evaluator.process(predictions)
    assert evaluator.evaluate()["AP_hard"] == pytest.approx(1.0)  # 1 of 1 face found

    evaluator = build_evaluator(make_dataset(tmp_path, [image], split="val"))
    evaluator.process(predictions)
    assert evaluator.evaluate()["AP_hard"] == pytest.approx(0.5)  # 1 of 2 faces found


def reference_ap(images: list[Image], predictions: list[dict], setting: str) -> float:
    """The official steps written out literally, one threshold and one detection at a time."""
    all_scores = np.concatenate([p["scores"] for p in predictions])
    low, high = all_scores.min(), all_scores.max()
    by_name = {p["file_name"]: p for p in predictions}
    proposals, recalled = np.zeros(1000), np.zeros(1000)
    num_counted = 0
    for image in images:
        counted = image.counted_in(setting)
        num_counted += len(counted)
        p = by_name.get(image.file_name)
        if not image.faces or p is None or len(p["scores"]) == 0:
            continue
        order = np.argsort(-p["scores"], kind="stable")
        scores = (p["scores"][order] - low) / (high - low)
        dets = p["boxes"][order]
        faces = [xyxy(face) for face in image.faces]
        state = [0] * len(faces)  # 0 untouched, 1 recalled, -1 matched while not counted
        is_proposal, recalled_after = [], []
        for d in dets:
            ious = []
            for f in faces:
                iw = min(d[2], f[2]) - max(d[0], f[0]) + 1
                ih = min(d[3], f[3]) - max(d[1], f[1]) + 1
                if iw <= 0 or ih <= 0:
                    ious.append(0.0)
                    continue
                area_d = (d[2] - d[0] + 1) * (d[3] - d[1] + 1)
                area_f = (f[2] - f[0] + 1) * (f[3] - f[1] + 1)
                ious.append(iw * ih / (area_d + area_f - iw * ih))
            best = int(np.argmax(ious))
            proposal = True
            if ious[best] >= 0.5:
                if best + 1 not in counted:
                    state[best] = -1
                    proposal = False
                elif state[best] == 0:
                    state[best] = 1
            is_proposal.append(proposal)
            recalled_after.append(state.count(1))
        for t in range(1000):
            threshold = 1 - (t + 1) / 1000
            above = [i for i, s in enumerate(scores) if s >= threshold]
            if above:
                last = above[-1]
                proposals[t] += sum(is_proposal[: last + 1])
                recalled[t] += recalled_after[last]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = recalled / proposals
    recall = recalled / num_counted
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(p) - 2, -1, -1):
        p[i] = p[i] if np.isnan(p[i + 1]) else (p[i + 1] if np.isnan(p[i]) else max(p[i], p[i + 1]))
    steps = [i for i in range(len(r) - 1) if r[i + 1] != r[i]]
    return float(sum((r[i + 1] - r[i]) * p[i + 1] for i in steps))


def test_random_scenes_agree_with_the_literal_official_steps(tmp_path):
    rng = np.random.default_rng(3)
    images, predictions = [], []
    for index in range(12):
        faces = []
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.integers(4, 80, size=2)
            faces.append([int(rng.integers(0, 400)), int(rng.integers(0, 300)), int(w), int(h)])
        hard = [k + 1 for k in range(len(faces)) if rng.random() < 0.85]
        medium = [k for k in hard if rng.random() < 0.7]
        easy = [k for k in medium if rng.random() < 0.6]
        image = Image(f"{index % 3}--Event", f"img_{index}", faces)
        image.counted = {"easy": easy, "medium": medium, "hard": hard}
        images.append(image)
        if index % 5 == 4:
            continue  # no detections for this image
        boxes = [
            (np.array(xyxy(face)) + rng.normal(0, 0.2 * face[3], 4)).tolist()
            for face in faces
            if rng.random() < 0.8
        ]
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 400, size=2)
            boxes.append([x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60)])
        scores = rng.random(len(boxes)).round(3)  # rounding makes ties between images
        predictions.append(det(image, boxes, scores))
    metrics, _ = evaluate(tmp_path, images, predictions)
    for setting in SETTINGS:
        expected = reference_ap(images, predictions, setting)
        assert 0.05 < expected < 0.95
        assert abs(metrics[f"AP_{setting}"] - expected) <= 1e-12, setting


def test_curves_per_setting_are_what_the_ap_integrates(tmp_path):
    image = Image("0--Parade", "0_Parade_2", [FACE_A, FACE_B])
    boxes = [xyxy(FACE_A), [11, 10, 51, 50], xyxy(FACE_B)]
    metrics, evaluator = evaluate(tmp_path, [image], [det(image, boxes, [0.9, 0.8, 0.1])])
    assert sorted(evaluator.curves) == ["easy", "hard", "medium"]
    hard = evaluator.curves["hard"]
    assert hard.ap == metrics["AP_hard"]
    # Thresholds above the top normalised score (1.0) propose nothing and are not drawn;
    # the curve ends at the full list: 2 of 3 detections recall both faces.
    assert len(hard.recall) == len(hard.precision) <= 400
    assert np.isfinite(hard.precision).all()
    assert hard.recall[-1] == pytest.approx(1.0) and hard.precision[-1] == pytest.approx(2 / 3)
    assert set(np.round(hard.recall, 6)) == {0.5, 1.0}
