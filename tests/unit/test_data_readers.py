"""Readers on small hand-written files: each format's conventions and traps."""

import json

import numpy as np
import pytest
from PIL import Image

from autoassign.config import DataConfig
from autoassign.data import (
    VOC_CLASSES,
    DatasetError,
    build_dataset,
    read_coco,
    read_objects365,
    read_voc,
    read_widerface,
)
from autoassign.data.images import ImageHeaderError, read_image_size
from autoassign.data.synthetic import write_synthetic


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _image(path, width, height, format="JPEG", **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path, format=format, **options)


COCO_GAPS = {
    "images": [
        {"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 3, "file_name": "b.jpg", "width": 32, "height": 32},
    ],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 90, "bbox": [10, 20, 30, 25.5], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 18, "bbox": [1.5, 2.5, 3, 4]},
    ],
    # Out of order and with gaps, as COCO's ids 1..90 are.
    "categories": [
        {"id": 90, "name": "toothbrush"},
        {"id": 1, "name": "person"},
        {"id": 18, "name": "dog"},
    ],
}


def test_coco_maps_sorted_category_ids_to_contiguous_labels(tmp_path):
    _write_json(tmp_path / "instances.json", COCO_GAPS)
    dataset = read_coco(tmp_path / "instances.json", tmp_path / "images", split="val")
    assert dataset.class_names == ["person", "dog", "toothbrush"]
    assert dataset.meta["category_ids"] == [1, 18, 90]
    assert dataset.meta["image_ids"] == [7, 3]
    assert dataset.meta["annotation_file"] == tmp_path / "instances.json"
    first, empty = dataset.records
    assert (first.file_name, first.image_id, first.width, first.height) == ("a.jpg", 7, 64, 48)
    assert first.path == tmp_path / "images" / "a.jpg"
    np.testing.assert_array_equal(
        first.boxes, np.array([[10, 20, 40, 45.5], [0, 0, 5, 5], [1.5, 2.5, 4.5, 6.5]], np.float32)
    )
    assert first.labels.tolist() == [2, 0, 1]
    assert first.ignore.tolist() == [False, True, False]  # iscrowd is an ignore region
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    # An image without annotations is kept (evaluation needs it) with empty arrays.
    assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,) and empty.ignore.shape == (0,)


def test_coco_paths_override_the_default_layout(tmp_path):
    _write_json(tmp_path / "elsewhere" / "gt.json", COCO_GAPS)
    cfg = DataConfig(
        format="coco",
        root=tmp_path,
        paths={"val": {"annotations": "elsewhere/gt.json", "images": tmp_path / "pics"}},
    )
    dataset = build_dataset(cfg, "val")
    assert len(dataset) == 2 and dataset.records[0].path == tmp_path / "pics" / "a.jpg"
    with pytest.raises(DatasetError, match=r"instances_train\.json: annotation file does not"):
        build_dataset(cfg, "train")


def test_coco_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(DatasetError, match=r"instances\.json: line 3 column"):
        read_coco(path, tmp_path)
    bad = json.loads(json.dumps(COCO_GAPS))
    bad["annotations"][1]["category_id"] = 5
    _write_json(path, bad)
    with pytest.raises(DatasetError, match=r"instances\.json: annotation id 2: unknown category"):
        read_coco(path, tmp_path)


VOC_XML = """<annotation>
  <filename>{id}.jpg</filename>
  <size><width>50</width><height>40</height><depth>3</depth></size>
  <object>
    <name>dog</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox>
  </object>
  <object>
    <name>person</name><difficult>1</difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>50</xmax><ymax>40</ymax></bndbox>
  </object>
</annotation>
"""


def _voc_root(root, ids, split="trainval"):
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for image_id in ids:
        (root / "Annotations" / f"{image_id}.xml").write_text(VOC_XML.format(id=image_id))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_voc_converts_one_based_inclusive_boxes(tmp_path):
    _voc_root(tmp_path, ["000005", "000007"])
    dataset = read_voc(tmp_path, "trainval")
    assert dataset.class_names == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert VOC_CLASSES.index("person") == 14 and VOC_CLASSES[0] == "aeroplane"
    record = dataset.records[0]
    assert (record.file_name, record.image_id) == ("000005.jpg", "000005")
    assert record.path == tmp_path / "JPEGImages" / "000005.jpg"
    assert (record.width, record.height) == (50, 40)
    # Pixel 1..10 (1-based, inclusive) is the continuous span 0..10.
    np.testing.assert_array_equal(record.boxes, [[0, 0, 10, 20], [4, 5, 50, 40]])
    assert record.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert record.ignore.tolist() == [False, True]  # difficult is an ignore region


def test_voc_07_plus_12_union_for_training_only(tmp_path):
    voc07, voc12 = tmp_path / "VOC2007", tmp_path / "VOC2012"
    write_synthetic("voc", voc07, num_images=6, image_size=96, seed=0)
    write_synthetic("voc", voc12, num_images=10, image_size=96, seed=1)
    (voc07 / "ImageSets/Main/test.txt").write_text((voc07 / "ImageSets/Main/val.txt").read_text())
    cfg = DataConfig(
        format="voc",
        root=voc07,
        extra_train_roots=[voc12],
        train_split="trainval",
        val_split="test",
        skip_empty_train_images=False,
    )
    train = build_dataset(cfg, "trainval")
    assert len(train) == (6 + 4) + (10 + 4)
    assert [r.path.parent.parent for r in train.records] == [voc07] * 10 + [voc12] * 14
    assert train.meta["roots"] == [voc07, voc12]
    assert len(train.meta["image_ids"]) == 24
    test = build_dataset(cfg, "test")
    assert len(test) == 4 and all(r.path.parent.parent == voc07 for r in test.records)


def _objects365_json(file_names, categories):
    return {
        "images": [
            {"id": i + 1, "file_name": name, "width": 40, "height": 32}
            for i, name in enumerate(file_names)
        ],
        "annotations": [
            {"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": i}
            for i in range(len(file_names))
        ],
        "categories": categories,
    }


def test_objects365_v2_layout_and_known_missing_images(tmp_path):
    names = [
        "images/v2/patch3/objects365_v2_00000001.jpg",
        "images/v2/patch6/objects365_v1_00320532.jpg",  # listed in v2 but absent: skipped
    ]
    categories = [{"id": 3, "name": "Bakset "}, {"id": 1, "name": "Person"}]
    _write_json(
        tmp_path / "annotations/zhiyuan_objv2_val.json", _objects365_json(names, categories)
    )
    dataset = build_dataset(DataConfig(format="objects365", root=tmp_path), "val")
    assert len(dataset) == 1
    record = dataset.records[0]
    assert record.file_name == names[0]
    assert record.path == tmp_path / "val" / "patch3" / "objects365_v2_00000001.jpg"
    assert dataset.class_names == ["Person", "Bakset"]  # by sorted id; names stripped
    assert record.labels.tolist() == [1] and record.ignore.tolist() == [False]
    assert dataset.meta["skipped_missing"] == ["patch6/objects365_v1_00320532.jpg"]


def test_objects365_v1_layout_maps_by_id_not_by_listing_order(tmp_path):
    # v1's train and val jsons list the categories in different orders.
    train_categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    val_categories = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}]
    for split, categories in (("train", train_categories), ("val", val_categories)):
        data = _objects365_json([f"obj365_{split}_000000000001.jpg"], categories)
        _write_json(tmp_path / f"annotations/objects365_{split}.json", data)
    cfg = DataConfig(format="objects365", root=tmp_path, objects365_version=1)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.class_names == val.class_names == ["person", "car"]
    assert train.records[0].labels.tolist() == val.records[0].labels.tolist() == [1]
    assert val.records[0].path == tmp_path / "val" / "obj365_val_000000000001.jpg"
    assert train.meta["version"] == 1
    with pytest.raises(DatasetError, match="zhiyuan_objv2_train.json"):
        read_objects365(
            tmp_path / "annotations/zhiyuan_objv2_train.json", tmp_path / "train", version=2
        )


# The official files end face lines with a space; the last line here has none.
WIDER_GT = "\n".join(
    [
        "0--Parade/0_Parade_marchingband_1_849.jpg",
        "1",
        "10 12 20 30 2 1 0 1 2 0 ",
        "0--Parade/0_Parade_Parade_0_904.jpg",
        "0",
        "0 0 0 0 0 0 0 0 0 0 ",
        "1--Handshaking/1_Handshaking_3.png",
        "3",
        "0 0 8 9 0 0 1 0 1 1 ",
        "5 6 0 7 1 0 0 0 0 0 ",
        "30 20 12 10 0 1 0 0 0 0",
    ]
)


def test_widerface_zero_face_line_and_official_column_order(tmp_path):
    gt = tmp_path / "wider_face_split" / "wider_face_val_bbx_gt.txt"
    gt.parent.mkdir()
    gt.write_text(WIDER_GT)
    images = tmp_path / "WIDER_val" / "images"
    _image(images / "0--Parade/0_Parade_marchingband_1_849.jpg", 64, 48)
    _image(images / "0--Parade/0_Parade_Parade_0_904.jpg", 40, 40)
    _image(images / "1--Handshaking/1_Handshaking_3.png", 50, 36, format="PNG")
    dataset = build_dataset(DataConfig(format="widerface", root=tmp_path), "val")
    assert dataset.class_names == ["face"] and len(dataset) == 3
    first, no_face, third = dataset.records
    assert first.file_name == "0--Parade/0_Parade_marchingband_1_849.jpg"
    assert (first.width, first.height, first.image_id) == (64, 48, 0)
    np.testing.assert_array_equal(first.boxes, [[10, 12, 30, 42]])
    # Columns after x y w h: blur expression illumination invalid occlusion pose.
    assert {k: v.tolist() for k, v in first.attributes.items()} == {
        "blur": [2],
        "expression": [1],
        "illumination": [0],
        "invalid": [1],
        "occlusion": [2],
        "pose": [0],
    }
    assert first.ignore.tolist() == [True]  # invalid
    # The ten zeros after a count of 0 are not a face.
    assert no_face.boxes.shape == (0, 4) and no_face.attributes["blur"].shape == (0,)
    assert (third.width, third.height, third.image_id) == (50, 36, 2)
    np.testing.assert_array_equal(third.boxes, [[0, 0, 8, 9], [5, 6, 5, 13], [30, 20, 42, 30]])
    assert third.ignore.tolist() == [False, True, False]  # the zero-width face is ignored
    assert third.attributes["illumination"].tolist() == [1, 0, 0]
    assert third.attributes["pose"].tolist() == [1, 0, 0]
    assert dataset.meta["annotation_file"] == gt and dataset.meta["root"] == tmp_path


def test_widerface_malformed_line_is_named(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("0--Parade/a.jpg\n2\n1 2 3 4 0 0 0 0 0 0\n1 2 3\n")
    _image(tmp_path / "0--Parade" / "a.jpg", 20, 20)
    with pytest.raises(DatasetError, match=r"gt\.txt: line 4: expected 10 numbers"):
        read_widerface(gt, tmp_path)


def test_image_headers_are_read_without_decoding(tmp_path):
    cases = {
        "plain.jpg": ("JPEG", {}),
        "progressive.jpg": ("JPEG", {"progressive": True}),
        "exif.jpg": ("JPEG", {"exif": Image.Exif().tobytes() + b"\x00" * 60000}),
        "image.png": ("PNG", {}),
        "image.bmp": ("BMP", {}),
    }
    for index, (name, (format, options)) in enumerate(cases.items()):
        _image(tmp_path / name, 31 + index, 17 + 2 * index, format=format, **options)
        assert read_image_size(tmp_path / name) == (31 + index, 17 + 2 * index), name
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises(ImageHeaderError, match="junk.jpg"):
        read_image_size(tmp_path / "junk.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageHeaderError, match="text.png"):
        read_image_size(tmp_path / "text.png")
