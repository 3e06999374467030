"""Throughput of the training input pipeline, per loader worker, against a plain loop.

    python benchmarks/data_loader.py [--images 96] [--workers 0 1 2] [--dir DIR]

Writes (or reuses) a synthetic COCO-format set of 640x480 JPEGs, then measures images per
second of ``build_train_loader`` (decode, resize to short side 800 capped at 1333, flip,
group, collate and pad) with 0 (in-process), 1 and 2 workers, and of a peer measured in the
same run: a plain single-thread loop of torchvision decode + resize + flip over the same
files. Every worker, and the main process here, uses one torch thread, as DataLoader workers
do by default. Prints images/s per worker and the ratio to the peer; the target is at least
40 images/s per worker.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from autoassign.config import DataConfig, InputConfig
from autoassign.data.loader import build_train_loader
from autoassign.data.records import DetectionDataset, ImageRecord
from autoassign.data.transforms import resized_size

IMAGE_WIDTH, IMAGE_HEIGHT = 640, 480
TARGET_PER_WORKER = 40.0


def synthetic_dataset(folder: Path, num_images: int) -> DetectionDataset:
    """The project's synthetic COCO set when its writer is available, else plain JPEGs with
    boxes written here. Reused when ``folder`` already holds enough images."""
    try:
        from autoassign.data import build_dataset
        from autoassign.data.synthetic import write_synthetic
    except ImportError:
        return _own_jpegs(folder, num_images)
    data_cfg = DataConfig(format="coco", root=folder, skip_empty_train_images=False)
    try:
        dataset = build_dataset(data_cfg, "train")
        if len(dataset) >= num_images:
            return dataset
    except Exception:  # nothing there yet, or an older incomplete set: write it
        pass
    write_synthetic(
        "coco",
        folder,
        num_images=num_images,
        num_classes=8,
        image_size=(IMAGE_WIDTH, IMAGE_HEIGHT),
        seed=0,
        splits=("train",),
    )
    return build_dataset(data_cfg, "train")


def _own_jpegs(folder: Path, num_images: int) -> DetectionDataset:
    """Smooth gradients with a few flat rectangles: closer to photographs' JPEG decode cost
    than white noise, which decodes several times slower."""
    from PIL import Image

    folder = folder / "own_jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:IMAGE_HEIGHT, 0:IMAGE_WIDTH]
    records = []
    for index in range(num_images):
        path = folder / f"{index:06d}.jpg"
        boxes = []
        if not path.exists():
            pixels = np.stack(
                [(xs * (index % 5 + 1) + ys * c) % 256 for c in (1, 2, 3)], axis=-1
            ).astype(np.uint8)
        for _ in range(4):
            x1, y1 = rng.integers(0, IMAGE_WIDTH - 64), rng.integers(0, IMAGE_HEIGHT - 64)
            x2, y2 = x1 + rng.integers(16, 64), y1 + rng.integers(16, 64)
            colour = rng.integers(0, 256, 3, dtype=np.uint8)
            boxes.append([x1, y1, x2, y2])
            if not path.exists():
                pixels[y1:y2, x1:x2] = colour
        if not path.exists():
            Image.fromarray(pixels).save(path, quality=90)
        records.append(
            ImageRecord(
                file_name=path.name,
                path=path,
                width=IMAGE_WIDTH,
                height=IMAGE_HEIGHT,
                boxes=np.asarray(boxes, dtype=np.float32),
                labels=rng.integers(0, 8, len(boxes)),
                ignore=np.zeros(len(boxes), dtype=bool),
            )
        )
    return DetectionDataset("coco", "train", records, [f"class{i}" for i in range(8)])


def build_loader(
    dataset: DetectionDataset, input_cfg: InputConfig, num_workers: int, batch_size: int
):
    """The train loader, after one warm-up epoch (which also starts its persistent workers)."""
    data_cfg = DataConfig(batch_size=batch_size, num_workers=num_workers, flip_prob=0.5)
    loader = build_train_loader(dataset, data_cfg, input_cfg, seed=0, rank=0, world_size=1)
    for _ in loader:
        pass
    return loader


def loader_rate(loader, epoch: int) -> float:
    """Images/s of one epoch of ``loader``."""
    loader.batch_sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        images += len(batch)
    return images / (time.perf_counter() - start)


def peer_rate(dataset: DetectionDataset, input_cfg: InputConfig) -> float:
    """Images/s of a plain loop: read, decode to RGB, bilinear antialiased resize, flip every
    other image; no targets, grouping, collation or workers."""
    paths = [record.path for record in dataset.records]
    start = time.perf_counter()
    for index, path in enumerate(paths):
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        height, width = image.shape[-2:]
        size = resized_size(height, width, input_cfg.min_size, input_cfg.max_size)
        image = F.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
        if index % 2:
            image = image.flip(-1)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images in the set (default 96)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=5, help="epochs measured per setting; medians reported"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "autoassign_bench_data_loader",
        help="where the synthetic set is written or reused",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    input_cfg = InputConfig(min_size=800, max_size=1333, size_divisor=32)
    dataset = synthetic_dataset(args.dir, args.images)
    print(
        f"{len(dataset)} images of {dataset.records[0].width}x{dataset.records[0].height}, "
        f"batch size {args.batch_size}, torch threads per process 1, "
        f"median of {args.rounds} epochs each"
    )
    peer_rate(dataset, input_cfg)  # warm-up: file cache, allocator
    loaders = {w: build_loader(dataset, input_cfg, w, args.batch_size) for w in args.workers}
    # Rounds interleave the settings, so that a burst of load on a shared machine hits them
    # alike rather than one of them.
    peer_rates: list[float] = []
    rates: dict[int, list[float]] = {w: [] for w in args.workers}
    for round_index in range(args.rounds):
        peer_rates.append(peer_rate(dataset, input_cfg))
        for num_workers, loader in loaders.items():
            rates[num_workers].append(loader_rate(loader, epoch=1 + round_index))
    del loaders

    peer = statistics.median(peer_rates)
    print(f"peer (plain decode + resize + flip loop, 1 thread): {peer:7.1f} img/s")
    for num_workers in args.workers:
        total = statistics.median(rates[num_workers])
        per_worker = total / max(num_workers, 1)
        verdict = "ok" if per_worker >= TARGET_PER_WORKER else f"below {TARGET_PER_WORKER:g}"
        print(
            f"train loader, num_workers={num_workers}: {total:7.1f} img/s total, "
            f"{per_worker:7.1f} img/s per worker, {per_worker / peer:5.2f}x peer ({verdict})"
        )


if __name__ == "__main__":
    main()
