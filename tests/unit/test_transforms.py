"""Decoding, resizing, flipping and training targets of single images, on real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoassign.data.records import ImageRecord
from autoassign.data.transforms import (
    ImageLoadError,
    eval_sample,
    hflip_boxes,
    load_image,
    padded_size,
    resize_image,
    resized_size,
    train_sample,
)


def _pixels(height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _record(path: Path, width: int, height: int, boxes, labels, ignore) -> ImageRecord:
    return ImageRecord(
        file_name=path.name,
        path=path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        ignore=np.asarray(ignore, dtype=bool),
    )


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def test_rgb_jpeg_and_png_decode_to_uint8_chw(tmp_path):
    pixels = _pixels(6, 9, 3)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    Image.fromarray(pixels).save(tmp_path / "rgb.jpg", quality=95)

    png = load_image(tmp_path / "rgb.png")
    jpeg = load_image(tmp_path / "rgb.jpg")

    assert png.dtype == torch.uint8 and png.shape == (3, 6, 9)
    assert torch.equal(png, torch.from_numpy(pixels).permute(2, 0, 1))
    assert jpeg.dtype == torch.uint8 and jpeg.shape == (3, 6, 9)


def test_grayscale_png_and_jpeg_replicate_to_three_channels(tmp_path):
    pixels = _pixels(5, 7, 1)
    Image.fromarray(pixels, "L").save(tmp_path / "gray.png")
    Image.fromarray(pixels, "L").save(tmp_path / "gray.jpg")

    png = load_image(tmp_path / "gray.png")
    jpeg = load_image(tmp_path / "gray.jpg")

    assert png.shape == (3, 5, 7)
    for channel in png:
        assert torch.equal(channel, torch.from_numpy(pixels))
    assert jpeg.shape == (3, 5, 7)
    assert torch.equal(jpeg[0], jpeg[1]) and torch.equal(jpeg[1], jpeg[2])


def test_rgba_png_is_composited_onto_white(tmp_path):
    pixels = _pixels(5, 7, 4)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")

    image = load_image(tmp_path / "rgba.png")

    alpha = pixels[..., 3:].astype(np.float64) / 255
    expected = np.round(pixels[..., :3] * alpha + 255 * (1 - alpha))
    assert image.shape == (3, 5, 7)
    difference = image.permute(1, 2, 0).numpy().astype(np.float64) - expected
    assert np.abs(difference).max() <= 1  # rounding of the composite


def test_palette_png_expands_to_its_colours(tmp_path):
    palette_image = Image.fromarray(_pixels(5, 7, 3)).convert("P")
    palette_image.save(tmp_path / "palette.png")
    expected = np.array(palette_image.convert("RGB"))

    image = load_image(tmp_path / "palette.png")

    assert image.shape == (3, 5, 7)
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_16bit_png_rescaled_to_8bit(tmp_path):
    values = np.array([[0, 256, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")

    image = load_image(tmp_path / "deep.png")

    assert image.dtype == torch.uint8 and image.shape == (3, 1, 3)
    assert image[0, 0].tolist() == [0, 1, 255]


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="corrupt.jpg: cannot decode"):
        load_image(tmp_path / "corrupt.jpg")


def test_record_size_disagreeing_with_the_file_is_an_error(tmp_path):
    Image.fromarray(_pixels(10, 20, 3)).save(tmp_path / "a.png")
    record = _record(tmp_path / "a.png", 30, 10, [[0, 0, 5, 5]], [0], [False])

    with pytest.raises(ImageLoadError, match=r"a.png: decoded image is 20x10 .* says 30x10"):
        train_sample(record, 0, min_size=10, max_size=100, flip=False)


# --------------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (480, 640, (800, 1067)),  # short side to 800
        (640, 480, (1067, 800)),  # portrait
        (500, 2000, (333, 1333)),  # long side capped: scale 1333 / 2000
        (800, 1333, (800, 1333)),  # already there
        (1000, 1000, (800, 800)),  # downscale
    ],
)
def test_resized_size_reference_rounding(height, width, expected):
    assert resized_size(height, width, 800, 1333) == expected


def test_resize_image_output_and_per_axis_scales():
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)

    resized, (scale_y, scale_x) = resize_image(image, 800, 1333)

    assert resized.dtype == torch.uint8 and resized.shape == (3, 800, 1067)
    assert scale_y == 800 / 48 and scale_x == 1067 / 64


def test_resize_of_a_constant_image_stays_constant():
    image = torch.full((3, 30, 50), 77, dtype=torch.uint8)

    resized, _ = resize_image(image, 17, 1000)

    assert resized.shape == (3, 17, 28)
    assert bool((resized == 77).all())


def test_padded_size_rounds_up_to_divisor():
    assert padded_size(800, 1067, 32) == (800, 1088)
    assert padded_size(333, 1333, 32) == (352, 1344)
    assert padded_size(1, 32, 32) == (32, 32)


# --------------------------------------------------------------------------------------------
# Training targets
# --------------------------------------------------------------------------------------------


def test_hflip_boxes_exact():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 10.0, 3.0]])
    assert hflip_boxes(boxes, 10).tolist() == [[6.0, 2.0, 9.0, 8.0], [0.0, 0.0, 10.0, 3.0]]


@pytest.fixture
def landscape_record(tmp_path) -> ImageRecord:
    """A 64x48 (w x h) PNG with a target, a box reaching outside, a box entirely right of the
    image, and an ignored box. min_size=32 resizes it to 43x32: sx = 43/64, sy = 32/48."""
    Image.fromarray(_pixels(48, 64, 3)).save(tmp_path / "scene.png")
    return _record(
        tmp_path / "scene.png",
        64,
        48,
        boxes=[[8, 6, 40, 30], [60, 40, 70, 50], [64, 10, 70, 20], [0, 0, 16, 12]],
        labels=[3, 1, 2, 0],
        ignore=[False, False, False, True],
    )


def test_train_targets_scaled_clipped_degenerate_and_ignored_dropped(landscape_record):
    sample = train_sample(landscape_record, 7, min_size=32, max_size=1000, flip=False)

    assert sample.image.shape == (3, 32, 43)
    assert sample.image_size == (32, 43) and sample.original_size == (48, 64)
    assert sample.index == 7 and sample.flipped is False
    # Box 2 scales to x in [40.3125, 47.03], clipped at x = 43 and y = 32; box 3 starts at the
    # right border, so it is 0 px wide after clipping and dropped.
    expected_boxes = torch.tensor([[5.375, 4.0, 26.875, 20.0], [40.3125, 80 / 3, 43.0, 32.0]])
    torch.testing.assert_close(sample.target["boxes"], expected_boxes)
    assert sample.target["boxes"].dtype == torch.float32
    assert sample.target["labels"].tolist() == [3, 1]
    assert sample.target["labels"].dtype == torch.int64
    assert set(sample.target) == {"boxes", "labels"}  # the ignored box 4 is in neither


def test_train_flip_mirrors_image_and_boxes(landscape_record):
    plain = train_sample(landscape_record, 0, min_size=32, max_size=1000, flip=False)
    flipped = train_sample(landscape_record, 0, min_size=32, max_size=1000, flip=True)

    assert flipped.flipped is True
    assert torch.equal(flipped.image, plain.image.flip(-1))
    # x1' = 43 - x2, x2' = 43 - x1
    expected_boxes = torch.tensor([[16.125, 4.0, 37.625, 20.0], [0.0, 80 / 3, 2.6875, 32.0]])
    torch.testing.assert_close(flipped.target["boxes"], expected_boxes)
    assert flipped.target["labels"].tolist() == [3, 1]


def test_image_without_boxes_gives_empty_float_targets(tmp_path):
    Image.fromarray(_pixels(20, 10, 3)).save(tmp_path / "empty.jpg")
    record = _record(tmp_path / "empty.jpg", 10, 20, np.zeros((0, 4)), [], [])

    sample = train_sample(record, 0, min_size=16, max_size=64, flip=True)

    assert sample.image.shape == (3, 32, 16)
    assert sample.target["boxes"].shape == (0, 4)
    assert sample.target["boxes"].dtype == torch.float32
    assert sample.target["labels"].shape == (0,)


def test_eval_sample_keeps_boxes_unclipped_and_never_flips(landscape_record):
    sample = eval_sample(landscape_record, 3, min_size=32, max_size=1000)

    assert sample.flipped is False and sample.image.shape == (3, 32, 43)
    sx, sy = 43 / 64, 32 / 48
    expected = torch.tensor(
        [[8 * sx, 6 * sy, 40 * sx, 30 * sy], [60 * sx, 40 * sy, 70 * sx, 50 * sy]]
        + [[64 * sx, 10 * sy, 70 * sx, 20 * sy]]
    )
    torch.testing.assert_close(sample.target["boxes"], expected)
    assert sample.target["labels"].tolist() == [3, 1, 2]  # the ignored box 4 is left out
