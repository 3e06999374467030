"""The synthetic set in WiderFace's layout: the bbx_gt text files and the official
``ground_truth/*.mat`` files of the evaluation tool."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from autoassign.data.synthetic.scenes import (
    DrawnObject,
    face_scene,
    save_jpeg,
)

WIDERFACE_EVENTS = ("0--Parade", "1--Handshaking", "2--Demonstration", "3--Riot")


def write_widerface_split(
    root: Path, split: str, rngs: list[np.random.Generator], size, num_classes: int
) -> list[tuple[str, list[DrawnObject]]]:
    width, height = size
    image_dir = root / f"WIDER_{split}" / "images"
    lines: list[str] = []
    entries: list[tuple[str, str, list[DrawnObject]]] = []
    for index, rng in enumerate(rngs):
        event = WIDERFACE_EVENTS[index % len(WIDERFACE_EVENTS)]
        number, word = event.split("--")
        name = f"{number}_{word}_synthetic_{split}_{index}"
        kind = "none" if index % 12 == 11 else ("crowd" if index % 4 == 1 else "few")
        canvas, faces = face_scene(rng, width, height, kind)
        save_jpeg(canvas, image_dir / event / f"{name}.jpg")
        lines += [f"{event}/{name}.jpg", str(len(faces))]
        for face in faces:
            x1, y1, x2, y2 = face.box
            columns = [face.flags[key] for key in _FACE_COLUMNS]
            lines.append(" ".join(str(v) for v in (x1, y1, x2 - x1, y2 - y1, *columns)) + " ")
        if not faces:
            lines.append("0 0 0 0 0 0 0 0 0 0 ")
        entries.append((event, name, faces))
    gt_file = root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"
    gt_file.parent.mkdir(parents=True, exist_ok=True)
    gt_file.write_text("\n".join(lines) + "\n")
    if split != "train":
        write_widerface_mat(root / "ground_truth", split, entries)
    return [(f"{event}/{name}.jpg", faces) for event, name, faces in entries]


_FACE_COLUMNS = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")


def widerface_settings(faces: list[DrawnObject]) -> dict[str, np.ndarray]:
    """1-based indices of the faces that count in each evaluation setting.

    hard: every valid face of non-zero size; medium: hard faces at least 12 px tall and not
    heavily occluded; easy: medium faces at least 30 px tall, sharp and not occluded.
    """
    hard, medium, easy = [], [], []
    for index, face in enumerate(faces, start=1):
        x1, y1, x2, y2 = face.box
        f = face.flags
        if f["invalid"] or x2 <= x1 or y2 <= y1:
            continue
        hard.append(index)
        if y2 - y1 >= 12 and f["occlusion"] < 2:
            medium.append(index)
            if y2 - y1 >= 30 and f["blur"] == 0 and f["occlusion"] == 0:
                easy.append(index)
    return {
        name: np.asarray(indices, dtype=np.int32).reshape(-1, 1)
        for name, indices in (("easy", easy), ("medium", medium), ("hard", hard))
    }


def write_widerface_mat(
    directory: Path, split: str, entries: list[tuple[str, str, list[DrawnObject]]]
) -> None:
    """The official ground-truth files: ``wider_face_{split}.mat`` with ``event_list``,
    ``file_list``, ``face_bbx_list``, and ``wider_{easy,medium,hard}_{split}.mat`` with
    ``gt_list`` (cell arrays indexed ``[event][0][image][0]`` as the evaluators read them).
    """
    from scipy.io import savemat

    events = list(dict.fromkeys(event for event, _, _ in entries))

    def cells(values: list) -> np.ndarray:
        array = np.empty((len(values), 1), dtype=object)
        for i, value in enumerate(values):
            array[i, 0] = value
        return array

    per_event = {event: [(n, f) for e, n, f in entries if e == event] for event in events}
    file_list = cells([cells([name for name, _ in per_event[e]]) for e in events])
    boxes = cells(
        [
            cells(
                [
                    np.asarray(
                        [(b[0], b[1], b[2] - b[0], b[3] - b[1]) for b in (f.box for f in faces)],
                        dtype=np.float64,
                    ).reshape(-1, 4)
                    for _, faces in per_event[e]
                ]
            )
            for e in events
        ]
    )
    directory.mkdir(parents=True, exist_ok=True)
    _savemat_reproducible(
        savemat,
        directory / f"wider_face_{split}.mat",
        {"event_list": cells(events), "file_list": file_list, "face_bbx_list": boxes},
    )
    for setting in ("easy", "medium", "hard"):
        gt = cells(
            [
                cells([widerface_settings(faces)[setting] for _, faces in per_event[e]])
                for e in events
            ]
        )
        _savemat_reproducible(savemat, directory / f"wider_{setting}_{split}.mat", {"gt_list": gt})


def _savemat_reproducible(savemat: Callable, path: Path, variables: dict) -> None:
    """scipy writes the creation time into the 116-byte MAT header; overwrite it so the same
    data gives the same bytes."""
    savemat(path, variables, do_compression=False)
    data = bytearray(path.read_bytes())
    data[:116] = b"MATLAB 5.0 MAT-file, written by autoassign.data.synthetic".ljust(116)
    path.write_bytes(bytes(data))
