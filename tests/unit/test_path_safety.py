"""Image names in annotation files that would leave their folder are refused where they are
read, with the file and the field named (they later name drawn images and output files)."""

from __future__ import annotations

import json

import pytest

from autoassign.config import DataConfig
from autoassign.data.coco import read_coco
from autoassign.data.errors import DatasetError
from autoassign.data.safe_paths import outside_reason
from autoassign.data.synthetic import write_synthetic
from autoassign.data.validate import scan_dataset
from autoassign.data.voc import read_voc


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("0001.jpg", None),
        ("patch8/objects365_v2_00420917.jpg", None),
        ("images\\site\\0001.jpg", None),
        ("../0001.jpg", "climbs out"),
        ("train/../../secret.jpg", "climbs out"),
        ("..\\..\\secret.jpg", "climbs out"),
        ("/etc/passwd.jpg", "absolute"),
        ("C:\\data\\x.jpg", "absolute"),
    ],
)
def test_names_that_leave_the_folder(name, reason):
    found = outside_reason(name)
    assert (found is None) if reason is None else (reason in found)


def test_coco_file_names_outside_the_image_folder_are_errors_naming_the_image(tmp_path):
    root = tmp_path / "coco"
    write_synthetic("coco", root, num_images={"train": 4}, image_size=64, splits=("train",))
    json_file = root / "annotations" / "instances_train.json"
    data = json.loads(json_file.read_text())
    first, second = data["images"][0], data["images"][1]
    first["file_name"] = "../../outside.jpg"
    second["file_name"] = str(tmp_path / "absolute.jpg")
    json_file.write_text(json.dumps(data))

    with pytest.raises(DatasetError) as raised:
        read_coco(json_file, root / "train")
    assert str(json_file) in str(raised.value)
    assert f"image id {first['id']} file_name" in str(raised.value)
    assert "climbs out of the image folder" in str(raised.value)

    report = scan_dataset(DataConfig(format="coco", root=root), "train")
    assert not report.ok
    messages = [f"{p.where}: {p.message}" for p in report.errors]
    assert any(f"image id {second['id']} file_name" in m and "absolute" in m for m in messages)
    assert report.num_images == 2  # the two others are read, the two refused are not


def test_voc_ids_naming_folders_are_errors_naming_the_split_line(tmp_path):
    root = tmp_path / "voc"
    write_synthetic("voc", root, num_images={"train": 3}, image_size=64, splits=("train",))
    split = root / "ImageSets" / "Main" / "train.txt"
    split.write_text(split.read_text() + "../../etc/passwd\n")
    with pytest.raises(DatasetError) as raised:
        read_voc(root, "train")
    assert f"{split}" in str(raised.value) and "line 4" in str(raised.value)
    assert "is not a VOC image id" in str(raised.value)
