"""The dataset scan: one broken file per problem kind per format, each reported in place."""

import json
import re
import subprocess
import sys

import pytest

from autoassign.config import DataConfig
from autoassign.data.synthetic import write_synthetic
from autoassign.data.validate import scan_dataset

SIZE = 96
NUM_IMAGES = 6


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _replace(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _garbage(path):
    assert path.is_file()
    path.write_bytes(b"this is not an image")


# --- COCO ------------------------------------------------------------------------------------

COCO_JSON = "annotations/instances_train.json"


def _coco_set(key, value):
    def change(data):
        section, index, field = key
        data[section][index][field] = value

    return lambda root: _edit_json(root / COCO_JSON, change)


COCO_CASES = {
    "malformed": (
        lambda root: (root / COCO_JSON).write_text('{\n  "images": [\n    {"id": 1,}\n'),
        COCO_JSON,
        "line 3 column",
    ),
    "missing_image": (
        lambda root: (root / "train/000000000001.jpg").unlink(),
        COCO_JSON,
        "image id 103",
    ),
    "unreadable_image": (
        lambda root: _garbage(root / "train/000000000002.jpg"),
        COCO_JSON,
        "image id 106",
    ),
    "size_mismatch": (_coco_set(("images", 0, "width"), 97), COCO_JSON, "image id 100"),
    "unknown_category": (
        _coco_set(("annotations", 0, "category_id"), 999),
        COCO_JSON,
        "annotation id 1",
    ),
    "unknown_image": (_coco_set(("annotations", 0, "image_id"), 5), COCO_JSON, "annotation id 1"),
    "duplicate_id": (_coco_set(("annotations", 1, "id"), 1), COCO_JSON, "annotation id 1"),
    "box_outside": (
        _coco_set(("annotations", 0, "bbox"), [90, 10, 20, 20]),
        COCO_JSON,
        "annotation id 1",
    ),
    # No "box_size": a COCO-style box under 1 px wide or high is left out by a training
    # filter and counted per rule (tests/unit/test_training_filters.py), not repaired.
}

# --- Objects365 (v2 layout) ------------------------------------------------------------------

O365_JSON = "annotations/zhiyuan_objv2_train.json"


def _o365_set(key, value):
    def change(data):
        section, index, field = key
        data[section][index][field] = value

    return lambda root: _edit_json(root / O365_JSON, change)


O365_CASES = {
    "malformed": (lambda root: (root / O365_JSON).write_text("[1, 2"), O365_JSON, "line 1 column"),
    "missing_image": (
        lambda root: (root / "train/patch1/objects365_v2_00000002.jpg").unlink(),
        O365_JSON,
        "image id 2",
    ),
    "unreadable_image": (
        lambda root: _garbage(root / "train/patch0/objects365_v2_00000003.jpg"),
        O365_JSON,
        "image id 3",
    ),
    "size_mismatch": (_o365_set(("images", 0, "height"), 95), O365_JSON, "image id 1"),
    "unknown_category": (
        _o365_set(("annotations", 0, "category_id"), 400),
        O365_JSON,
        "annotation id 1",
    ),
    "duplicate_id": (
        lambda root: _edit_json(root / O365_JSON, lambda d: d["images"].append(d["images"][0])),
        O365_JSON,
        "image id 1",
    ),
    "box_outside": (
        _o365_set(("annotations", 0, "bbox"), [-4, 10, 20, 20]),
        O365_JSON,
        "annotation id 1",
    ),
    # No "box_size", as for COCO.
}

# --- VOC -------------------------------------------------------------------------------------

XML0 = "Annotations/train_000000.xml"
SPLIT = "ImageSets/Main/train.txt"


def _first_object_line(root):
    lines = (root / XML0).read_text().splitlines()
    return "line " + str(next(i for i, line in enumerate(lines, start=1) if "<object>" in line))


def _voc_first_box_to(root, make_xmax):
    text = (root / XML0).read_text()
    xmin = int(re.search(r"<xmin>(\d+)</xmin>", text).group(1))
    _replace(
        root / XML0,
        re.search(r"<xmax>\d+</xmax>", text).group(0),
        f"<xmax>{make_xmax(xmin)}</xmax>",
    )


VOC_CASES = {
    "malformed": (
        lambda root: (root / XML0).write_text("<annotation>\n<size>\n</annotation>\n"),
        XML0,
        "line 3",
    ),
    "missing_file": (
        lambda root: (root / "Annotations/train_000001.xml").unlink(),
        "train_000001.xml",
        "",
    ),
    "missing_image": (
        lambda root: (root / "JPEGImages/train_000002.jpg").unlink(),
        "Annotations/train_000002.xml",
        "image id train_000002",
    ),
    "unreadable_image": (
        lambda root: _garbage(root / "JPEGImages/train_000003.jpg"),
        "Annotations/train_000003.xml",
        "image id train_000003",
    ),
    "size_mismatch": (
        lambda root: _replace(root / XML0, f"<width>{SIZE}</width>", "<width>95</width>"),
        XML0,
        "image id train_000000",
    ),
    "unknown_category": (
        lambda root: (root / XML0).write_text(
            re.sub(r"<name>\w+</name>", "<name>unicorn</name>", (root / XML0).read_text(), count=1)
        ),
        XML0,
        _first_object_line,
    ),
    "duplicate_id": (
        lambda root: (root / SPLIT).write_text((root / SPLIT).read_text() + "train_000000\n"),
        SPLIT,
        f"line {NUM_IMAGES + 1}",
    ),
    "box_outside": (
        lambda root: _voc_first_box_to(root, lambda xmin: 500),
        XML0,
        _first_object_line,
    ),
    "box_size": (
        lambda root: _voc_first_box_to(root, lambda xmin: xmin - 1),
        XML0,
        _first_object_line,
    ),
}
VOC_EXTRA_MALFORMED = (
    lambda root: (root / SPLIT).write_text((root / SPLIT).read_text() + "two ids\n"),
    SPLIT,
    f"line {NUM_IMAGES + 1}",
)

# --- WiderFace -------------------------------------------------------------------------------

GT = "wider_face_split/wider_face_train_bbx_gt.txt"


def _gt_line(number, new_text):
    """Replace the gt file's 1-based line ``number``."""

    def change(root):
        lines = (root / GT).read_text().splitlines()
        lines[number - 1] = new_text
        (root / GT).write_text("\n".join(lines) + "\n")

    return change


def _first_image(root):
    return root / "WIDER_train/images" / (root / GT).read_text().splitlines()[0]


def _repeat_first_image(root):
    lines = (root / GT).read_text().splitlines()
    count = int(lines[1])
    (root / GT).write_text("\n".join(lines + lines[: 2 + max(count, 1)]) + "\n")


WIDER_CASES = {
    "malformed": (_gt_line(2, "abc"), GT, "line 2"),
    "missing_image": (lambda root: _first_image(root).unlink(), GT, "line 1"),
    "unreadable_image": (lambda root: _garbage(_first_image(root)), GT, "line 1"),
    "duplicate_id": (
        _repeat_first_image,
        GT,
        lambda root: f"line {len((root / GT).read_text().splitlines()) + 1}",
    ),
    "box_outside": (_gt_line(3, "90 10 20 20 0 0 0 0 0 0"), GT, "line 3"),
    "box_size": (_gt_line(3, "10 10 0 20 0 0 0 0 0 0"), GT, "line 3"),
}
WIDER_EXTRA_MALFORMED = (_gt_line(3, "1 2 3"), GT, "line 3")

WARNING_KINDS = {"box_outside", "box_size"}

CASES = (
    [("coco", kind, case) for kind, case in COCO_CASES.items()]
    + [("objects365", kind, case) for kind, case in O365_CASES.items()]
    + [("voc", kind, case) for kind, case in VOC_CASES.items()]
    + [("voc", "malformed", VOC_EXTRA_MALFORMED)]
    + [("widerface", kind, case) for kind, case in WIDER_CASES.items()]
    + [("widerface", "malformed", WIDER_EXTRA_MALFORMED)]
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One small valid dataset per format, copied by each test before breaking it."""
    base = tmp_path_factory.mktemp("pristine")
    for format in ("coco", "objects365", "voc", "widerface"):
        write_synthetic(
            format, base / format, num_images=NUM_IMAGES, image_size=SIZE, seed=4, splits=("train",)
        )
    return base


def _copy(pristine, format, tmp_path):
    import shutil

    root = tmp_path / format
    shutil.copytree(pristine / format, root)
    return root


def _cfg(format, root):
    return DataConfig(format=format, root=root)


@pytest.mark.parametrize("format", ["coco", "objects365", "voc", "widerface"])
def test_valid_synthetic_sets_scan_clean(pristine, format):
    report = scan_dataset(_cfg(format, pristine / format), "train")
    assert report.ok and report.errors == []
    assert report.num_images == NUM_IMAGES
    assert report.num_boxes > 0
    if format != "widerface":  # the synthetic WiderFace has zero-size faces on purpose
        assert report.warnings == []


@pytest.mark.parametrize(
    "format, kind, case", CASES, ids=[f"{f}-{k}-{i}" for i, (f, k, _) in enumerate(CASES)]
)
def test_each_problem_is_reported_with_its_file_and_place(pristine, tmp_path, format, kind, case):
    root = _copy(pristine, format, tmp_path)
    breaks, file_suffix, where = case
    expected_where = where(root) if callable(where) else where
    breaks(root)
    report = scan_dataset(_cfg(format, root), "train")
    matching = [p for p in report.problems if p.kind == kind]
    assert matching, report.summary()
    problem = matching[0]
    assert problem.file.endswith(file_suffix), problem
    if expected_where:
        assert problem.where.startswith(expected_where), problem
    else:
        assert problem.where == ""
    severity = "warning" if kind in WARNING_KINDS else "error"
    assert problem.severity == severity
    assert report.ok == (severity == "warning")
    # Nothing else is wrong: a single mutation gives problems of its own kind only.
    assert {p.kind for p in report.errors} <= {kind}
    assert str(problem) in report.summary()


def test_widerface_scan_resumes_after_a_malformed_entry(pristine, tmp_path):
    root = _copy(pristine, "widerface", tmp_path)
    _gt_line(2, "abc")(root)
    report = scan_dataset(_cfg("widerface", root), "train")
    assert [p.where for p in report.errors] == ["line 2"]
    assert report.num_images == NUM_IMAGES - 1  # only the broken image is lost


def test_objects365_known_missing_image_is_a_note_not_an_error(pristine, tmp_path):
    root = _copy(pristine, "objects365", tmp_path)

    def add_missing(data):
        data["images"].append(
            {
                "id": 99,
                "file_name": "images/v2/patch16/objects365_v2_00908726.jpg",
                "width": 9,
                "height": 9,
            }
        )
        data["annotations"].append(
            {"id": 999, "image_id": 99, "category_id": 1, "bbox": [1, 1, 2, 2]}
        )

    _edit_json(root / O365_JSON, add_missing)
    report = scan_dataset(_cfg("objects365", root), "train")
    assert report.ok and report.num_images == NUM_IMAGES
    assert any("patch16/objects365_v2_00908726.jpg" in note for note in report.notes)


def test_scan_covers_the_extra_training_roots(pristine, tmp_path):
    first = _copy(pristine, "voc", tmp_path / "a")
    second = _copy(pristine, "voc", tmp_path / "b")
    (second / "JPEGImages/train_000004.jpg").unlink()
    cfg = DataConfig(format="voc", root=first, extra_train_roots=[second])
    report = scan_dataset(cfg, "train")
    assert not report.ok and report.num_images == 2 * NUM_IMAGES - 1
    assert report.errors[0].file == str(second / "Annotations/train_000004.xml")
    assert scan_dataset(cfg, "val").errors[0].kind == "missing_file"  # no val split written


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "autoassign.data", "validate", *args], capture_output=True, text=True
    )


def test_cli_exit_codes_and_json(pristine, tmp_path):
    good = _cli("--format", "coco", "--root", str(pristine / "coco"))
    assert good.returncode == 0, good.stderr
    assert "usable" in good.stdout and "0 errors" in good.stdout

    root = _copy(pristine, "voc", tmp_path)
    (root / "JPEGImages/train_000002.jpg").unlink()
    _voc_first_box_to(root, lambda xmin: 500)
    broken = _cli("--format", "voc", "--root", str(root), "--split", "train")
    assert broken.returncode == 1
    assert "Traceback" not in broken.stderr
    assert "train_000002.xml: image id train_000002" in broken.stdout
    assert "NOT usable" in broken.stdout

    as_json = _cli("--format", "voc", "--root", str(root), "--json")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["num_images"] == NUM_IMAGES - 1
    assert [(e["kind"], e["where"]) for e in report["errors"]] == [
        ("missing_image", "image id train_000002")
    ]
    assert [w["kind"] for w in report["warnings"]] == ["box_outside"]
    assert report["warnings"][0]["file"].endswith("train_000000.xml")
    assert sum(report["boxes_per_class"].values()) == report["num_boxes"]

    warned = _copy(pristine, "coco", tmp_path / "w")
    _coco_set(("annotations", 0, "bbox"), [90, 10, 20, 20])(warned)
    only_warnings = _cli("--format", "coco", "--root", str(warned), "--json")
    assert only_warnings.returncode == 0
    assert json.loads(only_warnings.stdout)["warnings"][0]["where"] == "annotation id 1"

    for bad_args in (
        ["--format", "yolo", "--root", str(root)],
        ["--format", "voc", "--root", str(tmp_path / "nowhere")],
        ["--format", "voc"],
    ):
        run = _cli(*bad_args)
        assert run.returncode == 2, bad_args
        assert "Traceback" not in run.stderr
