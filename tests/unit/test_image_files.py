"""Image files as real datasets hold them: grayscale, palette, transparency, 16-bit, CMYK,
EXIF-rotated, upper-case extensions, truncated and non-image files. Each file is written with
PIL here and read through the project's readers, validator and loaders."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from autoassign.config import DataConfig, InputConfig
from autoassign.data.coco import read_coco
from autoassign.data.decoding import ImageLoadError, apply_orientation, rgb_pixels
from autoassign.data.images import read_image_header, read_image_size
from autoassign.data.loader import build_eval_loader, build_train_loader, iterations_per_epoch
from autoassign.data.transforms import load_image, train_sample
from autoassign.data.validate import scan_dataset
from autoassign.data.widerface import read_widerface

LOADER_LOG = "autoassign.data.loader"
INPUT = InputConfig(min_size=32, max_size=64, size_divisor=32)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _quadrants(height: int, width: int) -> np.ndarray:
    """``[H, W, 3]``: red top-left, green top-right, blue bottom-left, white bottom-right."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w] = (255, 0, 0)
    pixels[:h, w:] = (0, 255, 0)
    pixels[h:, :w] = (0, 0, 255)
    pixels[h:, w:] = (255, 255, 255)
    return pixels


def _quadrant_colours(image: torch.Tensor) -> list[list[int]]:
    """The colour at the centre of each quadrant of ``[3, H, W]``: TL, TR, BL, BR."""
    height, width = image.shape[-2:]
    ys, xs = (height // 4, 3 * height // 4), (width // 4, 3 * width // 4)
    return [image[:, y, x].tolist() for y in ys for x in xs]


def _near(colour: list[int], expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --------------------------------------------------------------------------------------------
# Decoding each kind of file
# --------------------------------------------------------------------------------------------


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    gray = np.arange(6 * 9, dtype=np.uint8).reshape(6, 9) * 4
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")

    image = load_image(tmp_path / "gray.png")

    assert image.dtype == torch.uint8 and image.shape == (3, 6, 9)
    for channel in image:
        assert torch.equal(channel, torch.from_numpy(gray))


def test_palette_png_expands_to_its_colours_and_transparent_entries_to_white(tmp_path):
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([10, 20, 30, 200, 100, 0] + [0, 0, 0] * 254)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    palette_image.save(tmp_path / "palette.png")
    palette_image.save(tmp_path / "transparent.png", transparency=0)

    opaque = load_image(tmp_path / "palette.png")
    transparent = load_image(tmp_path / "transparent.png")

    assert opaque.shape == transparent.shape == (3, 2, 4)
    assert opaque[:, 0, 0].tolist() == [10, 20, 30] and opaque[:, 0, 1].tolist() == [200, 100, 0]
    assert transparent[:, 0, 0].tolist() == [255, 255, 255]  # entry 0 is transparent
    assert transparent[:, 0, 1].tolist() == [200, 100, 0]


def test_rgba_and_gray_alpha_pngs_are_composited_onto_white(tmp_path):
    rgba = np.array(
        [[[200, 100, 0, 128], [200, 100, 0, 255], [200, 100, 0, 0], [0, 0, 0, 64]]], np.uint8
    )
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    gray_alpha = np.array([[[100, 0], [100, 255], [100, 51]]], np.uint8)
    Image.fromarray(gray_alpha, "LA").save(tmp_path / "la.png")

    image = load_image(tmp_path / "rgba.png")
    gray = load_image(tmp_path / "la.png")

    assert image.shape == (3, 1, 4)
    # v * a/255 + 255 * (1 - a/255), rounded: half-transparent orange is light orange.
    assert image[:, 0, 0].tolist() == [227, 177, 127]
    assert image[:, 0, 1].tolist() == [200, 100, 0]  # opaque: unchanged
    assert image[:, 0, 2].tolist() == [255, 255, 255]  # fully transparent: the background
    assert image[:, 0, 3].tolist() == [191, 191, 191]  # a quarter-opaque black
    assert gray.shape == (3, 1, 3)
    assert gray[0, 0].tolist() == [255, 100, 224]  # 100 * 0.2 + 255 * 0.8 = 224


def test_16bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"

    image = load_image(tmp_path / "deep.png")

    assert image.dtype == torch.uint8 and image.shape == (3, 1, 5)
    assert image[0, 0].tolist() == [0, 1, 128, 255, 4]  # round(v * 255 / 65535)
    assert torch.equal(image[0], image[2])
    # PIL's 32-bit integer mode "I" (how older PIL versions open 16-bit PNGs) scales the same.
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    assert rgb_pixels(as_int)[0, :, 0].tolist() == [0, 1, 128, 255, 4]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum)


def test_16bit_colour_png_keeps_the_high_byte(tmp_path):
    # PIL cannot write 16-bit colour PNGs: one red 0xFFFF/green 0x8080/blue 0x0100 pixel by hand.
    header = struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0)
    row = b"\x00" + struct.pack(">HHH", 0xFFFF, 0x8080, 0x0100)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
    png += _png_chunk(b"IDAT", zlib.compress(row)) + _png_chunk(b"IEND", b"")
    (tmp_path / "deep_rgb.png").write_bytes(png)

    image = load_image(tmp_path / "deep_rgb.png")

    assert image.shape == (3, 1, 1) and image[:, 0, 0].tolist() == [255, 128, 1]


def test_cmyk_jpeg_converts_to_about_its_rgb(tmp_path):
    colours = np.zeros((16, 32, 3), dtype=np.uint8)
    colours[:, :16] = (200, 30, 60)
    colours[:, 16:] = (20, 160, 90)
    cmyk = Image.fromarray(colours).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    image = load_image(tmp_path / "cmyk.jpg")

    assert image.shape == (3, 16, 32)
    assert _near(image[:, 8, 4].tolist(), (200, 30, 60), tolerance=6)
    assert _near(image[:, 8, 28].tolist(), (20, 160, 90), tolerance=6)


def test_exif_rotated_jpegs_decode_as_displayed(tmp_path):
    stored = _quadrants(20, 40)  # 40 wide, 20 high as stored
    Image.fromarray(stored).save(tmp_path / "six.jpg", quality=95, exif=_exif(6))
    Image.fromarray(stored).save(tmp_path / "eight.jpg", quality=95, exif=_exif(8))

    six = load_image(tmp_path / "six.jpg")
    eight = load_image(tmp_path / "eight.jpg")

    # Orientation 6 shows the pixels turned 90 degrees clockwise: the stored top-left (red)
    # is the displayed top-right; 8 turns them counter-clockwise: red is bottom-left.
    assert six.shape == eight.shape == (3, 40, 20)
    tl, tr, bl, br = _quadrant_colours(six)
    assert _near(tl, BLUE) and _near(tr, RED) and _near(bl, WHITE) and _near(br, GREEN)
    tl, tr, bl, br = _quadrant_colours(eight)
    assert _near(tl, GREEN) and _near(tr, WHITE) and _near(bl, RED) and _near(br, BLUE)
    assert read_image_size(tmp_path / "six.jpg") == (20, 40)
    assert read_image_header(tmp_path / "six.jpg").orientation == 6


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    stored = np.kron(stored, np.ones((4, 4, 1), dtype=np.uint8))  # 4x4 blocks survive JPEG
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=_exif(orientation))

    image = load_image(path)
    with Image.open(path) as opened:
        expected = np.array(ImageOps.exif_transpose(opened).convert("RGB"))

    assert tuple(image.shape) == (3, *expected.shape[:2])
    assert read_image_size(path) == (expected.shape[1], expected.shape[0])
    difference = image.permute(1, 2, 0).int() - torch.from_numpy(expected).int()
    assert int(difference.abs().max()) <= 3
    # Lossless: the turn itself equals PIL's transpose exactly.
    lossless = apply_orientation(torch.from_numpy(stored).permute(2, 0, 1), orientation)
    turned = Image.fromarray(stored)
    turned.getexif()[0x0112] = orientation
    turned.info["exif"] = turned.getexif().tobytes()
    assert torch.equal(
        lossless.permute(1, 2, 0), torch.from_numpy(np.array(ImageOps.exif_transpose(turned)))
    )


def test_truncated_and_non_image_files_name_the_file_and_reason(tmp_path):
    _truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("this is a text file, not an image\n")

    with pytest.raises(ImageLoadError, match=r"cut\.jpg: cannot decode image \(.*truncated"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageLoadError, match=r"text\.jpg: cannot decode image \(cannot identify"):
        load_image(tmp_path / "text.jpg")


# --------------------------------------------------------------------------------------------
# Readers and the validator
# --------------------------------------------------------------------------------------------


def _noisy(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _truncated_jpeg(path: Path, seed: int = 0) -> None:
    _noisy(32, 48, seed).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_coco(root: Path, images: list[tuple[str, int, int]]) -> Path:
    """``root/annotations/instances_train.json`` listing ``(file_name, width, height)`` under
    ``root/train``, with one box per image; returns the json."""
    entries, annotations = [], []
    for number, (name, width, height) in enumerate(images, start=1):
        entries.append({"id": number, "file_name": name, "width": width, "height": height})
        box = [2, 2, width / 2, height / 2]
        annotations.append(
            {"id": number, "image_id": number, "category_id": 1, "bbox": box, "iscrowd": 0}
        )
    data = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    annotation_file = root / "annotations" / "instances_train.json"
    annotation_file.parent.mkdir(parents=True, exist_ok=True)
    annotation_file.write_text(json.dumps(data))
    return annotation_file


def _mixed_coco(root: Path) -> None:
    """A COCO train split with one file of each kind; the last four are broken."""
    images = root / "train"
    images.mkdir(parents=True)
    _noisy(32, 48, 1).save(images / "upper.JPG")
    _noisy(32, 48, 2).convert("L").save(images / "gray.png")
    _noisy(32, 48, 3).convert("RGBA").save(images / "rgba.png")
    _noisy(32, 48, 4).convert("CMYK").save(images / "cmyk.jpg")
    _noisy(32, 48, 5).save(images / "turned.jpg", exif=_exif(6))  # displayed 32x48
    _noisy(32, 48, 6).save(images / "trailer.jpg")
    with open(images / "trailer.jpg", "ab") as f:  # data after the end marker, as some
        f.write(b"\x00trailer" * 2000)  # cameras write: still a complete image
    _truncated_jpeg(images / "cut.jpg")
    (images / "text.jpg").write_text("not an image")
    _noisy(32, 48, 7).save(images / "stored_size.jpg", exif=_exif(8))
    _noisy(32, 48, 8).save(images / "swapped.jpg")
    _write_coco(
        root,
        [
            ("upper.JPG", 48, 32),
            ("gray.png", 48, 32),
            ("rgba.png", 48, 32),
            ("cmyk.jpg", 48, 32),
            ("turned.jpg", 32, 48),  # recorded as displayed: consistent
            ("trailer.jpg", 48, 32),
            ("cut.jpg", 48, 32),
            ("text.jpg", 48, 32),
            ("stored_size.jpg", 48, 32),  # recorded as stored, but EXIF turns it
            ("swapped.jpg", 32, 48),  # recorded turned, but nothing turns it
        ],
    )


def test_validator_names_truncated_unreadable_and_turned_images(tmp_path):
    _mixed_coco(tmp_path)

    report = scan_dataset(DataConfig(format="coco", root=tmp_path), "train")

    assert not report.ok and report.num_images == 6
    by_where = {problem.where: problem for problem in report.errors}
    assert sorted(by_where) == ["image id 10", "image id 7", "image id 8", "image id 9"]
    cut, text = by_where["image id 7"], by_where["image id 8"]
    assert cut.kind == text.kind == "unreadable_image"
    assert str(tmp_path / "train" / "cut.jpg") in cut.message
    assert "truncated" in cut.message and "end marker is missing" in cut.message
    assert str(tmp_path / "train" / "text.jpg") in text.message
    assert "not a readable image" in text.message
    stored, swapped = by_where["image id 9"], by_where["image id 10"]
    assert stored.kind == swapped.kind == "size_mismatch"
    assert "annotated size 48x32 differs from the 32x48" in stored.message
    assert "EXIF orientation 8 (rotated 90 degrees counter-clockwise)" in stored.message
    assert "annotated size 32x48 differs from the 48x32" in swapped.message
    assert "only after a turn by 90 degrees" in swapped.message
    assert "no EXIF orientation that turns it (orientation 1" in swapped.message


def test_validator_command_line_prints_the_truncated_file(tmp_path):
    _mixed_coco(tmp_path)

    run = subprocess.run(
        [sys.executable, "-m", "autoassign.data", "validate", "--format", "coco"]
        + ["--root", str(tmp_path)],
        capture_output=True,
        text=True,
    )

    assert run.returncode == 1 and "Traceback" not in run.stderr
    line = next(line for line in run.stdout.splitlines() if "cut.jpg" in line)
    assert line.startswith("  ERROR [unreadable_image]") and "image id 7" in line
    assert f"cannot decode image {tmp_path / 'train' / 'cut.jpg'}" in line


def test_records_of_every_kind_load_at_their_recorded_size(tmp_path):
    _mixed_coco(tmp_path)
    dataset = read_coco(tmp_path / "annotations/instances_train.json", tmp_path / "train")

    usable = dataset.records[:6]
    for index, record in enumerate(usable):
        sample = train_sample(record, index, min_size=32, max_size=64, flip=False)
        assert sample.original_size == (record.height, record.width), record.file_name
        assert sample.image.shape[0] == 3
    assert (usable[4].width, usable[4].height) == (32, 48)  # the EXIF-turned one, displayed


def test_widerface_reads_upper_case_extensions_and_displayed_sizes(tmp_path):
    folder = tmp_path / "0--Parade"
    folder.mkdir()
    _noisy(30, 40, 0).save(folder / "a.JPG")
    _noisy(30, 40, 1).save(folder / "b.jpg", exif=_exif(6))
    gt = tmp_path / "gt.txt"
    gt.write_text(
        "0--Parade/a.JPG\n1\n1 2 10 12 0 0 0 0 0 0\n0--Parade/b.jpg\n1\n1 2 10 12 0 0 0 0 0 0\n"
    )

    dataset = read_widerface(gt, tmp_path)

    assert [(r.file_name, r.width, r.height) for r in dataset.records] == [
        ("0--Parade/a.JPG", 40, 30),
        ("0--Parade/b.jpg", 30, 40),
    ]
    assert load_image(dataset.records[1].path).shape == (3, 40, 30)


# --------------------------------------------------------------------------------------------
# Loaders: an unusable image never stops an epoch
# --------------------------------------------------------------------------------------------


def _coco_with_one_truncated(root: Path, count: int = 8, bad: int = 3):
    """``count`` 48x32 JPEGs in a COCO split, image ``bad`` (0-based) truncated; read with
    the strict reader, as training reads it."""
    images = root / "train"
    images.mkdir(parents=True)
    names = []
    for index in range(count):
        path = images / f"{index:03d}.jpg"
        if index == bad:
            _truncated_jpeg(path, seed=index)
        else:
            _noisy(32, 48, index).save(path)
        names.append((path.name, 48, 32))
    _write_coco(root, names)
    return read_coco(root / "annotations/instances_train.json", images)


def _data_cfg(**overrides) -> DataConfig:
    settings = {"batch_size": 2, "num_workers": 0, "flip_prob": 0.5}
    settings.update(overrides)
    return DataConfig(**settings)


def _skip_warnings(caplog) -> list[str]:
    messages = [record.getMessage() for record in caplog.records if record.name == LOADER_LOG]
    return [message for message in messages if "skipped" in message]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_epoch_replaces_a_truncated_image_and_warns_once(tmp_path, caplog, num_workers):
    dataset = _coco_with_one_truncated(tmp_path)
    data_cfg = _data_cfg(num_workers=num_workers)
    loader = build_train_loader(dataset, data_cfg, INPUT, seed=0)
    caplog.set_level(logging.WARNING, logger=LOADER_LOG)

    epochs = []
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        epochs.append(list(loader))

    for batches in epochs:
        assert len(batches) == iterations_per_epoch(dataset, data_cfg) == 4
        assert all(len(batch) == 2 and batch.images.shape[0] == 2 for batch in batches)
        used = [index for batch in batches for index in batch.indices]
        assert 3 not in used
        assert used.count(4) == 2  # the next image of the group takes image 3's place
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 1
    assert f"training image {tmp_path / 'train' / '003.jpg'} skipped" in warnings[0]
    assert "truncated" in warnings[0]


def test_every_rank_keeps_its_iterations_with_a_truncated_image(tmp_path):
    dataset = _coco_with_one_truncated(tmp_path, count=8, bad=0)
    data_cfg = _data_cfg()

    per_rank = [
        list(build_train_loader(dataset, data_cfg, INPUT, seed=5, rank=rank, world_size=2))
        for rank in range(2)
    ]

    assert [len(batches) for batches in per_rank] == [2, 2]
    assert iterations_per_epoch(dataset, data_cfg, world_size=2) == 2
    for batches in per_rank:
        assert all(len(batch) == 2 for batch in batches)
        assert all(0 not in batch.indices for batch in batches)


def test_evaluation_runs_an_unusable_image_blank_and_warns(tmp_path, caplog):
    dataset = _coco_with_one_truncated(tmp_path, count=5, bad=2)
    caplog.set_level(logging.WARNING, logger=LOADER_LOG)

    batches = list(build_eval_loader(dataset, INPUT, batch_size=2, num_workers=0))

    assert [index for batch in batches for index in batch.indices] == [0, 1, 2, 3, 4]
    blank = batches[1].images[0]  # image 2 is the first of the second batch
    assert batches[1].indices[0] == 2 and int(blank.count_nonzero()) == 0
    assert int(batches[1].images[1].count_nonzero()) > 0
    warnings = [r.getMessage() for r in caplog.records if r.name == LOADER_LOG]
    assert len(warnings) == 1 and "002.jpg run as a blank image" in warnings[0]


def test_a_group_without_any_usable_image_is_a_clear_error(tmp_path):
    dataset = _coco_with_one_truncated(tmp_path, count=2, bad=0)
    (tmp_path / "train" / "001.jpg").write_text("not an image")

    with pytest.raises(ImageLoadError, match=r"000\.jpg and the 1 training image tried in"):
        list(build_train_loader(dataset, _data_cfg(), INPUT, seed=0))
