"""WiderFace easy / medium / hard AP, step for step as the official evaluation tool.

The official tool (``wider_eval.m``, and its Python port) does, for each setting:

1. Scores are min-max normalised over every detection of the split: ``(s - min) / (max - min)``.
2. Faces and detections are boxes ``(x, y, x + w, y + h)``; IoU uses ``+1`` widths
   (``(x2 - x1 + 1) * (y2 - y1 + 1)``). Our records and predictions hold ``xyxy`` with
   ``x2 = x + w``, which is exactly that box, so the ``+1`` IoU is applied to them directly.
3. Per image, detections in descending score order; each looks only at its best-overlapping
   face (the first one on ties). IoU >= 0.5 with a face that does not count in the setting:
   the detection is ignored (not a proposal). IoU >= 0.5 with a counted face not recalled
   yet: the face is recalled. Otherwise it is a proposal that recalls nothing.
4. Images with no faces at all or no detections are skipped: their detections count
   nowhere, but their counted faces stay in the recall denominator.
5. At threshold ``1 - t / 1000`` (t = 1..1000) on the normalised score, proposals and recalled
   faces are summed over images; precision = recalled / proposals, recall = recalled /
   counted faces. AP is the VOC area under that curve.

Which faces count comes from the official ``wider_face_val.mat`` (``event_list``,
``file_list``, ``face_bbx_list``) and ``wider_{easy,medium,hard}_val.mat`` (``gt_list``:
1-based indices of the faces that count); files named after another split
(``wider_face_<split>.mat``, ...) are used first when all four exist. The faces are those of
the ``.mat`` file; images are matched to the dataset's records by event folder and file name
without ``.jpg``.

Where this differs from the tool (the last two are said in :attr:`Evaluator.notes`):

- Detections of an image are sorted here; the official tool assumes the file is sorted.
- Where every detection has the same score, the official division by zero is replaced by a
  normalised score of 1 for all of them.
- Precision at a threshold with no proposal (0 / 0) is NaN in both tools; it is skipped by
  the envelope as Matlab's ``max`` skips NaN. Such points have recall 0 and add nothing.
- Only ``.mat`` images present in the dataset are evaluated (all of them for the real split).

Fallback without the ``.mat`` files (a synthetic split, or a copy without ``ground_truth/``):
faces and attributes come from the records, and a face counts in a setting when it is not
ignored (``invalid`` or zero-size) and

- easy:   height >= 50 px, occlusion == 0 (none) and blur <= 1 (not heavy);
- medium: height >= 25 px and occlusion <= 1 (at most partial);
- hard:   height >= 10 px.

Easy is a subset of medium, medium of hard, as in the official settings. Records without
attributes are judged by height alone. The official settings come from EdgeBox detection
rates, so fallback numbers approximate them only; the evaluator says it used the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import scipy.io

from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.eval.base import EvaluationError, Evaluator, PRCurve, PredictionStore
from autoassign.eval.voc import average_precision_area

SETTINGS = ("easy", "medium", "hard")
IOU_THRESHOLD = 0.5
NUM_THRESHOLDS = 1000

FALLBACK_MIN_HEIGHT = {"easy": 50.0, "medium": 25.0, "hard": 10.0}
FALLBACK_MAX_OCCLUSION = {"easy": 0, "medium": 1, "hard": 2}
FALLBACK_MAX_BLUR = {"easy": 1, "medium": 2, "hard": 2}


@dataclass(frozen=True)
class GroundTruthFiles:
    """The four ``.mat`` files of a split inside one folder."""

    directory: Path
    split: str = "val"

    @property
    def faces(self) -> Path:
        return self.directory / f"wider_face_{self.split}.mat"

    def setting(self, setting: str) -> Path:
        return self.directory / f"wider_{setting}_{self.split}.mat"

    def all(self) -> list[Path]:
        return [self.faces, *(self.setting(s) for s in SETTINGS)]

    def missing(self) -> list[str]:
        return [path.name for path in self.all() if not path.is_file()]


def find_ground_truth_files(directory: Path, split: str) -> GroundTruthFiles:
    """The split's own files (``wider_face_<split>.mat``, ...) if all are there, else the
    official validation names (``wider_face_val.mat``, ...)."""
    own = GroundTruthFiles(directory, split)
    return own if not own.missing() else GroundTruthFiles(directory, "val")


@dataclass
class EvalImage:
    """One image as the tool sees it.

    Attributes:
        file_name: the record's file name (the key of its predictions).
        faces: ``[N, 4]`` float64 ``(x, y, x + w, y + h)`` of every face of the image.
        counted: per setting, ``[N]`` bool: the faces that count in that setting.
    """

    file_name: str
    faces: np.ndarray
    counted: dict[str, np.ndarray]


def legacy_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU with ``+1`` widths (``box_overlaps.pyx``) of ``[N, 4]`` and ``[M, 4]`` -> ``[N, M]``.

    Pairs whose ``+1`` intersection width or height is not positive have IoU 0.
    """
    width = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2]) - np.maximum(
        boxes_a[:, None, 0], boxes_b[None, :, 0]
    )
    height = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3]) - np.maximum(
        boxes_a[:, None, 1], boxes_b[None, :, 1]
    )
    width, height = width + 1, height + 1
    intersection = width * height
    area_a = (boxes_a[:, 2] - boxes_a[:, 0] + 1) * (boxes_a[:, 3] - boxes_a[:, 1] + 1)
    area_b = (boxes_b[:, 2] - boxes_b[:, 0] + 1) * (boxes_b[:, 3] - boxes_b[:, 1] + 1)
    union = area_a[:, None] + area_b[None, :] - intersection
    positive = (width > 0) & (height > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(positive, intersection / np.where(positive, union, 1.0), 0.0)


def normalise_scores(store: PredictionStore) -> dict[str, np.ndarray]:
    """file_name -> its scores min-max normalised over every detection of ``store``."""
    all_scores = [p.scores for p in store.values() if len(p)]
    if not all_scores:
        return {name: p.scores.copy() for name, p in store.items()}
    flat = np.concatenate(all_scores)
    low, high = float(flat.min()), float(flat.max())
    if high == low:
        return {name: np.ones_like(p.scores) for name, p in store.items()}
    return {name: (p.scores - low) / (high - low) for name, p in store.items()}


def image_pr_counts(
    detections: np.ndarray, scores: np.ndarray, faces: np.ndarray, counted: np.ndarray
) -> np.ndarray:
    """Proposals and recalled faces of one image at each of the 1000 thresholds.

    Args:
        detections: ``[K, 4]`` boxes sorted by descending ``scores``.
        scores: ``[K]`` normalised scores, descending.
        faces: ``[N, 4]`` boxes of all faces of the image (N > 0, K > 0).
        counted: ``[N]`` bool, the faces that count in the setting.

    Returns:
        ``[1000, 2]`` float64: (proposals, recalled faces) at threshold ``1 - t / 1000``.
    """
    overlaps = legacy_iou(detections, faces)  # [K, N]
    best_face = overlaps.argmax(axis=1)
    best_overlap = overlaps[np.arange(len(detections)), best_face]

    recalled = np.zeros(len(faces), dtype=bool)
    is_proposal = np.ones(len(detections), dtype=bool)
    recalled_so_far = np.zeros(len(detections), dtype=np.int64)
    num_recalled = 0
    for h in range(len(detections)):
        if best_overlap[h] >= IOU_THRESHOLD:
            face = best_face[h]
            if not counted[face]:
                is_proposal[h] = False
            elif not recalled[face]:
                recalled[face] = True
                num_recalled += 1
        recalled_so_far[h] = num_recalled
    proposals_so_far = np.cumsum(is_proposal)

    thresholds = 1 - np.arange(1, NUM_THRESHOLDS + 1) / NUM_THRESHOLDS
    # Scores are descending: the detections at or above a threshold are a prefix of the list.
    kept = len(scores) - np.searchsorted(scores[::-1], thresholds, side="left")
    counts = np.zeros((NUM_THRESHOLDS, 2))
    some = kept > 0
    counts[some, 0] = proposals_so_far[kept[some] - 1]
    counts[some, 1] = recalled_so_far[kept[some] - 1]
    return counts


def setting_pr(
    images: list[EvalImage],
    boxes: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    setting: str,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The official precision-recall curve of one setting.

    Args:
        images: the evaluated images.
        boxes, scores: file_name -> ``[K, 4]`` detections and their ``[K]`` normalised
            scores, sorted by descending score; images missing from them have none.

    Returns:
        ``recall`` and ``precision``, ``[1000]`` each, at thresholds ``1 - t / 1000``
        (precision NaN where nothing scores that high), and the number of faces that count.
    """
    num_counted = 0
    totals = np.zeros((NUM_THRESHOLDS, 2))
    for image in images:
        counted = image.counted[setting]
        num_counted += int(counted.sum())
        image_scores = scores.get(image.file_name)
        if len(image.faces) == 0 or image_scores is None or len(image_scores) == 0:
            continue
        totals += image_pr_counts(boxes[image.file_name], image_scores, image.faces, counted)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = totals[:, 1] / totals[:, 0]
        recall = totals[:, 1] / num_counted
    return recall, precision, num_counted


def setting_curve(
    images: list[EvalImage],
    boxes: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    setting: str,
) -> PRCurve | None:
    """The official curve of one setting with its AP (arguments as :func:`setting_pr`).

    The curve keeps the thresholds some detection reaches (elsewhere precision is undefined);
    the AP is the official area under all of them. None when no face of the setting counts.
    """
    recall, precision, num_counted = setting_pr(images, boxes, scores, setting)
    if num_counted == 0:
        return None
    drawn = np.isfinite(precision)
    return PRCurve(recall[drawn], precision[drawn], average_precision_area(recall, precision))


def setting_ap(
    images: list[EvalImage],
    boxes: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    setting: str,
) -> float:
    """The official AP of one setting (arguments as :func:`setting_pr`); NaN without faces."""
    curve = setting_curve(images, boxes, scores, setting)
    return float("nan") if curve is None else curve.ap


# --------------------------------------------------------------------------------------------
# Ground truth: the official .mat files, or the documented fallback rule
# --------------------------------------------------------------------------------------------


def _cells(value) -> list:
    """The entries of a Matlab cell array as loaded by scipy (any shape), in order."""
    return list(np.asarray(value, dtype=object).ravel(order="F"))


def _cell_string(value) -> str:
    array = np.asarray(value)
    while array.dtype == object and array.size == 1:
        array = np.asarray(array.ravel()[0])
    if array.size == 0:
        return ""
    return str(array.ravel()[0]) if array.dtype.kind in "US" else str(array)


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict:
    try:
        content = scipy.io.loadmat(str(path))
    except (OSError, ValueError) as error:
        raise EvaluationError(f"{path}: cannot read the .mat file ({error})") from error
    missing = [key for key in keys if key not in content]
    if missing:
        raise EvaluationError(f"{path}: missing variable(s) {', '.join(missing)}")
    return content


def image_key(file_name: str) -> tuple[str, str]:
    """(event folder, image name without extension) of a record's file name."""
    path = PurePosixPath(file_name.replace("\\", "/"))
    return path.parent.name, path.stem


def images_from_mat(
    files: GroundTruthFiles, records: list[ImageRecord]
) -> tuple[list[EvalImage], list[str]]:
    """The evaluated images, with faces and settings from the official files, and notes."""
    faces_mat = _load_mat(files.faces, ("event_list", "file_list", "face_bbx_list"))
    gt_lists = {
        setting: _cells(_load_mat(files.setting(setting), ("gt_list",))["gt_list"])
        for setting in SETTINGS
    }
    face_file = files.faces.name
    events = _cells(faces_mat["event_list"])
    file_lists = _cells(faces_mat["file_list"])
    face_lists = _cells(faces_mat["face_bbx_list"])
    by_key = {image_key(record.file_name): record for record in records}

    images, notes, absent, size_mismatch = [], [], 0, 0
    for event_index, event_cell in enumerate(events):
        event = _cell_string(event_cell)
        names = _cells(file_lists[event_index])
        face_cells = _cells(face_lists[event_index])
        setting_cells = {s: _cells(gt_lists[s][event_index]) for s in SETTINGS}
        for image_index, name_cell in enumerate(names):
            name = _cell_string(name_cell)
            record = by_key.get((event, PurePosixPath(name).stem))
            if record is None:
                absent += 1
                continue
            xywh = np.asarray(face_cells[image_index], dtype=np.float64).reshape(-1, 4)
            faces = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            if len(faces) != len(record.boxes):
                size_mismatch += 1
            counted = {}
            for setting in SETTINGS:
                keep = np.asarray(setting_cells[setting][image_index]).astype(np.int64).ravel()
                if len(keep) and (keep.min() < 1 or keep.max() > len(faces)):
                    raise EvaluationError(
                        f"{files.setting(setting)}: gt_list of {event}/{name} holds "
                        f"face index {int(keep.max())} but the image has {len(faces)} faces"
                    )
                mask = np.zeros(len(faces), dtype=bool)
                mask[keep - 1] = True
                counted[setting] = mask
            images.append(EvalImage(record.file_name, faces, counted))
    if absent:
        notes.append(
            f"{absent} images of {face_file} are not in the dataset; evaluated the "
            f"{len(images)} that are"
        )
    extra = len(records) - len(images)
    if extra > 0:
        notes.append(f"{extra} images of the dataset are not in {face_file}; not evaluated")
    if size_mismatch:
        notes.append(
            f"{size_mismatch} images have a different number of faces in {face_file} than in "
            "the dataset's records; the .mat faces were used"
        )
    return images, notes


def fallback_counted(record: ImageRecord) -> dict[str, np.ndarray]:
    """Per setting, the record's faces that count under the documented fallback rule."""
    heights = record.boxes[:, 3] - record.boxes[:, 1]
    valid = ~record.ignore.astype(bool)
    occlusion = record.attributes.get("occlusion")
    blur = record.attributes.get("blur")
    counted = {}
    for setting in SETTINGS:
        mask = valid & (heights >= FALLBACK_MIN_HEIGHT[setting])
        if occlusion is not None:
            mask &= np.asarray(occlusion) <= FALLBACK_MAX_OCCLUSION[setting]
        if blur is not None:
            mask &= np.asarray(blur) <= FALLBACK_MAX_BLUR[setting]
        counted[setting] = mask
    return counted


def images_from_records(records: list[ImageRecord]) -> tuple[list[EvalImage], list[str]]:
    images = [
        EvalImage(record.file_name, record.boxes.astype(np.float64), fallback_counted(record))
        for record in records
    ]
    notes = [
        "official wider_*_val.mat files not found: easy/medium/hard use the fallback rule of "
        "autoassign.eval.widerface (face height, occlusion, blur), not the official settings"
    ]
    if any("occlusion" not in r.attributes or "blur" not in r.attributes for r in records):
        notes.append("some records have no occlusion/blur attributes: judged by height alone")
    return images, notes


# --------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------


class WiderFaceEvaluator(Evaluator):
    """Official WiderFace easy/medium/hard AP (``AP_easy``, ``AP_medium``, ``AP_hard``).

    Args:
        dataset: the split; ``meta["root"]`` locates the default ``<root>/ground_truth``.
        ground_truth_dir: folder of the official ``.mat`` files. When given, the files must
            be there; when None, ``<root>/ground_truth`` is tried and, without the files, the
            fallback rule is used (said in :attr:`notes`).
    """

    primary_metric = "AP_hard"

    def __init__(self, dataset: DetectionDataset, ground_truth_dir: Path | str | None = None):
        super().__init__(dataset)
        self.ground_truth_dir = Path(ground_truth_dir) if ground_truth_dir is not None else None
        self._images: tuple[list[EvalImage], list[str]] | None = None

    def _find_ground_truth(self) -> GroundTruthFiles | None:
        split = self.dataset.split
        if self.ground_truth_dir is not None:
            files = find_ground_truth_files(self.ground_truth_dir, split)
            if files.missing():
                raise EvaluationError(
                    f"WiderFace ground truth folder {self.ground_truth_dir} lacks "
                    f"{', '.join(files.missing())}"
                )
            return files
        root = self.dataset.meta.get("root")
        if root is None:
            return None
        files = find_ground_truth_files(Path(root) / "ground_truth", split)
        return None if files.missing() else files

    def evaluation_images(self) -> tuple[list[EvalImage], list[str]]:
        """The evaluated images and the notes about how they were found (cached)."""
        if self._images is None:
            files = self._find_ground_truth()
            if files is None:
                self._images = images_from_records(self.dataset.records)
            else:
                self._images = images_from_mat(files, self.dataset.records)
        return self._images

    def compute(self, store: PredictionStore) -> dict[str, float]:
        images, notes = self.evaluation_images()
        self.notes.extend(notes)
        normalised = normalise_scores(store)
        if len({float(s) for p in store.values() for s in p.scores}) == 1:
            self.notes.append("every detection has the same score: normalised scores set to 1")
        boxes, scores = {}, {}
        for file_name, predictions in store.items():
            order = np.argsort(-normalised[file_name], kind="stable")
            boxes[file_name] = predictions.boxes[order]
            scores[file_name] = normalised[file_name][order]
        metrics = {}
        for setting in SETTINGS:
            curve = setting_curve(images, boxes, scores, setting)
            metrics[f"AP_{setting}"] = float("nan") if curve is None else curve.ap
            if curve is not None:
                self.curves[setting] = curve.thinned()
        return metrics
