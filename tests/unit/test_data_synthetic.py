"""Synthetic datasets: every reader gives back exactly what was drawn; files are reproducible."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from autoassign.config import DataConfig
from autoassign.data import build_dataset, read_widerface, synthetic
from autoassign.data.synthetic import OFF_CENTRE_CLASSES, SHAPES, render_mask, write_synthetic

SIZE = 128


def _expected(format, objects):
    boxes = np.asarray([o.box for o in objects], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray([o.label for o in objects], dtype=np.int64)
    if format == "voc":
        ignore = [bool(o.flags["difficult"]) for o in objects]
    elif format == "widerface":
        ignore = [
            bool(o.flags["invalid"]) or o.box[2] <= o.box[0] or o.box[3] <= o.box[1]
            for o in objects
        ]
    else:
        ignore = [bool(o.flags["iscrowd"]) for o in objects]
    return boxes, labels, np.asarray(ignore, dtype=bool)


@pytest.mark.parametrize(
    "format, version",
    [("coco", 2), ("voc", 2), ("objects365", 2), ("objects365", 1), ("widerface", 2)],
)
def test_reader_gives_back_exactly_what_was_written(tmp_path, format, version):
    written = write_synthetic(
        format, tmp_path, num_images=12, image_size=SIZE, seed=3, objects365_version=version
    )
    cfg = DataConfig(
        format=format, root=tmp_path, objects365_version=version, skip_empty_train_images=False
    )
    for split in ("train", "val"):
        dataset = build_dataset(cfg, split)
        truth = written.objects[split]
        assert (
            len(dataset) == len(truth) == written.images[split] == (12 if split == "train" else 4)
        )
        assert dataset.class_names == synthetic.class_names(format)
        total = 0
        for record, (file_name, objects) in zip(dataset.records, truth):
            boxes, labels, ignore = _expected(format, objects)
            assert record.file_name == file_name
            assert (record.width, record.height) == (SIZE, SIZE)
            assert record.path.is_file()
            np.testing.assert_array_equal(record.boxes, boxes)
            np.testing.assert_array_equal(record.labels, labels)
            np.testing.assert_array_equal(record.ignore, ignore)
            if format == "widerface":
                for name in ("blur", "expression", "illumination", "invalid", "occlusion", "pose"):
                    np.testing.assert_array_equal(
                        record.attributes[name], [o.flags[name] for o in objects]
                    )
            total += len(record.boxes)
        assert total == written.boxes[split]


def test_training_split_skips_images_without_targets(tmp_path):
    written = write_synthetic("coco", tmp_path, num_images=20, image_size=96, seed=1)
    cfg = DataConfig(format="coco", root=tmp_path)
    with_targets = [
        name
        for name, objects in written.objects["train"]
        if any(not o.flags["iscrowd"] for o in objects)
    ]
    train = build_dataset(cfg, "train")
    assert [r.file_name for r in train.records] == with_targets
    assert train.meta["skipped_empty"] == 20 - len(with_targets) >= 2  # images 9 and 19 are empty
    val = build_dataset(cfg, "val")
    assert len(val) == 5  # evaluation keeps every image


def test_each_format_has_its_special_cases(tmp_path):
    coco = write_synthetic("coco", tmp_path / "coco", num_images=30, image_size=96, seed=0)
    objects = [o for _, objs in coco.objects["train"] for o in objs]
    assert sum(o.flags["iscrowd"] for o in objects) >= 1
    assert sum(not objs for _, objs in coco.objects["train"]) == 3
    voc = write_synthetic("voc", tmp_path / "voc", num_images=30, image_size=96, seed=0)
    assert sum(o.flags["difficult"] for _, objs in voc.objects["train"] for o in objs) >= 1
    trainval = (tmp_path / "voc/ImageSets/Main/trainval.txt").read_text().split()
    assert len(trainval) == 30 + 7

    faces = write_synthetic("widerface", tmp_path / "wf", num_images=12, image_size=320, seed=0)
    per_image = [objs for _, objs in faces.objects["train"]]
    assert max(len(objs) for objs in per_image) >= 100  # crowded images
    assert sum(not objs for objs in per_image) == 1  # image 11 has no face
    all_faces = [o for objs in per_image for o in objs]
    assert any(o.flags["invalid"] for o in all_faces)
    assert any(o.box[2] == o.box[0] or o.box[3] == o.box[1] for o in all_faces)
    heights = [o.box[3] - o.box[1] for o in all_faces]
    assert min(h for h in heights if h > 0) <= 10 and max(heights) >= 60


def test_object_sizes_span_several_fpn_levels(tmp_path):
    written = write_synthetic("coco", tmp_path, num_images=40, image_size=320, seed=0)
    sides = [
        np.sqrt((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        for _, objs in written.objects["train"]
        for o in objs
    ]
    assert min(sides) < 32 and max(sides) > 100
    assert len({o.label for _, objs in written.objects["train"] for o in objs}) == 6


def test_box_is_the_tight_box_of_the_drawn_pixels(tmp_path):
    written = write_synthetic("coco", tmp_path, num_images=4, image_size=160, seed=5)
    name, objects = next((n, objs) for n, objs in written.objects["train"] if objs)
    image = np.asarray(Image.open(tmp_path / "train" / name).convert("RGB"), dtype=np.int32)
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        colour = np.array(synthetic.COLOURS[SHAPES[obj.label]])
        near = np.abs(image - colour).sum(axis=2) < 90  # JPEG and jitter move colours a little
        inside = near[y1:y2, x1:x2]
        # The shape touches all four sides of its box, and does not continue past them.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        if y1 > 1:
            assert near[y1 - 2, x1:x2].sum() <= 1


@pytest.mark.parametrize("shape", SHAPES)
def test_off_centre_classes_have_their_mass_off_the_box_centre(shape):
    mask = render_mask(shape, 60, 48)
    ys, xs = np.nonzero(mask)
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
    offset = np.hypot(
        (xs.mean() + 0.5 - centre_x) / (x2 - x1), (ys.mean() + 0.5 - centre_y) / (y2 - y1)
    )
    centre_covered = mask[int(centre_y), int(centre_x)]
    if shape in OFF_CENTRE_CLASSES:
        assert offset > 0.08 or not centre_covered
    else:
        assert offset < 0.02 and centre_covered


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    for format in ("coco", "widerface"):
        a, b, c = tmp_path / f"{format}a", tmp_path / f"{format}b", tmp_path / f"{format}c"
        write_synthetic(format, a, num_images=8, image_size=96, seed=7)
        write_synthetic(format, b, num_images=8, image_size=96, seed=7)
        write_synthetic(format, c, num_images=8, image_size=96, seed=8)
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        assert len(files) > 8
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
        assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_widerface_mat_files_have_the_official_layout(tmp_path):
    write_synthetic("widerface", tmp_path, num_images=24, image_size=160, seed=2)
    dataset = read_widerface(
        tmp_path / "wider_face_split/wider_face_val_bbx_gt.txt", tmp_path / "WIDER_val/images"
    )
    by_name = {r.file_name: r for r in dataset.records}
    faces = loadmat(tmp_path / "ground_truth/wider_face_val.mat")
    settings = {
        s: loadmat(tmp_path / f"ground_truth/wider_{s}_val.mat")["gt_list"]
        for s in ("easy", "medium", "hard")
    }
    seen = 0
    counted = {"easy": 0, "medium": 0, "hard": 0}
    for i in range(len(faces["event_list"])):
        event = faces["event_list"][i][0][0]
        files = faces["file_list"][i][0]
        for j in range(len(files)):
            name = files[j][0][0]
            record = by_name[f"{event}/{name}.jpg"]
            xywh = faces["face_bbx_list"][i][0][j][0].reshape(-1, 4)
            np.testing.assert_array_equal(xywh[:, :2] + xywh[:, 2:], record.boxes[:, 2:])
            np.testing.assert_array_equal(xywh[:, :2], record.boxes[:, :2])
            index_sets = {s: set(settings[s][i][0][j][0].ravel().tolist()) for s in settings}
            assert index_sets["easy"] <= index_sets["medium"] <= index_sets["hard"]
            # hard counts exactly the faces that are not ignore regions (1-based indices).
            assert index_sets["hard"] == {k + 1 for k in np.flatnonzero(~record.ignore)}
            for s in counted:
                counted[s] += len(index_sets[s])
            seen += 1
    assert seen == len(dataset) == 6
    assert 0 < counted["easy"] < counted["medium"] < counted["hard"]


def test_synth_cli_writes_a_readable_set_and_rejects_bad_arguments(tmp_path):
    out = tmp_path / "voc"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoassign.data",
            "synth",
            "--format",
            "voc",
            "--out",
            str(out),
            "--images",
            "4",
            "--size",
            "96x80",
            "--classes",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    dataset = build_dataset(DataConfig(format="voc", root=out), "train")
    assert len(dataset) == 4 and (dataset.records[0].width, dataset.records[0].height) == (96, 80)
    assert set(np.concatenate([r.labels for r in dataset.records]).tolist()) <= {0, 1, 2}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoassign.data",
            "synth",
            "--format",
            "coco",
            "--out",
            str(tmp_path / "x"),
            "--classes",
            "11",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "num_classes" in bad.stderr and "Traceback" not in bad.stderr


def test_synthesize_if_missing_writes_the_root_once(tmp_path):
    root = tmp_path / "made"
    cfg = DataConfig(format="objects365", root=root, synthesize_if_missing=True)
    train = build_dataset(cfg, "train")
    assert len(train) > 100 and (root / "annotations/zhiyuan_objv2_val.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["made"]  # no staging folder left behind
