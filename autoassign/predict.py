"""Run a trained checkpoint on images.

    python -m autoassign.predict CHECKPOINT IMAGES... [--out DIR] [--score-threshold T]
        [--root DIR] [--draw-threshold T] [--device auto|cpu|cuda]

CHECKPOINT is a checkpoint directory (e.g. ``runs/x/checkpoints/last``) or its
``checkpoint.pt``, or a model URI that an installed package resolves
(:mod:`autoassign.checkpoint_sources`): with the platform installed,
``models:/autoassign-coco@best`` or ``models:/autoassign-coco/3`` from the MLflow model
registry at ``MLFLOW_TRACKING_URI``. IMAGES are image files or folders (searched recursively for
.jpg/.jpeg/.png). The model is rebuilt from the checkpoint's resolved config and weights;
each image is resized as in evaluation (``model.input``). Written to ``--out`` (default
``predictions``):

- ``predictions.json``: one entry per image, ``{"file_name", "boxes" (xyxy, original
  pixels), "scores", "labels" (class names)}``, the format ``python -m autoassign.eval``
  reads. ``file_name`` is the path relative to ``--root`` when given (use the dataset's image
  folder so names match its annotations), else the file's base name.
- ``images/<file_name>``: each image with its boxes (score >= ``--draw-threshold``) drawn.

Exit status: 0 done, 1 bad checkpoint or image file, 2 bad command line (or image paths that
do not exist).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from autoassign.errors import ConfigError, run_cli

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autoassign.predict",
        description="Detect objects in images with a trained AutoAssign checkpoint.",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory or file written by training, or a model URI that an "
        "installed resolver knows (models:/NAME@ALIAS with the platform installed)",
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep detections scoring at least this (default: the model's own threshold)",
    )
    parser.add_argument(
        "--draw-threshold", type=float, default=0.3, help="draw boxes scoring at least this"
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="name images by their path relative to this"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser.parse_args(argv)


def find_images(paths: Iterable[Path]) -> list[Path]:
    """The image files among ``paths``, folders expanded recursively (sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    if not found:
        raise ConfigError("no images found (looked for .jpg, .jpeg, .png)")
    return found


def image_name(path: Path, root: Path | None) -> str:
    """The ``file_name`` of an image: relative to ``root`` (POSIX separators) or its base name."""
    if root is None:
        return path.name
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"{path}: not inside --root {root}") from None


class Predictor:
    """A detector rebuilt from a training checkpoint, run one image at a time.

    Images are resized like evaluation (short side ``min_size``, long side at most
    ``max_size``) and padded alone, so results equal the engine's evaluation with
    ``eval.batch_size: 1`` (GroupNorm sees the padding, so batch composition matters).
    """

    def __init__(self, checkpoint_path: Path, *, device: str | torch.device = "auto"):
        """Rebuild the detector of ``checkpoint_path`` (a checkpoint directory or file)."""
        from autoassign.config import ExperimentConfig
        from autoassign.config_loading import validate_model
        from autoassign.engine.checkpoint import load_checkpoint
        from autoassign.engine.device import resolve_device
        from autoassign.model import build_detector
        from autoassign.model.weights import load_state_dict_checked

        checkpoint = load_checkpoint(checkpoint_path)
        config = validate_model(
            checkpoint["config"], ExperimentConfig, source=f"{checkpoint_path} (its config)"
        )
        # The weights come from the checkpoint: never load the files the config points at.
        model_cfg = config.model.model_copy(
            update={
                "checkpoint": None,
                "backbone": config.model.backbone.model_copy(update={"weights": None}),
            }
        )
        self.config = config
        self.class_names: list[str] = list(
            checkpoint.get("class_names") or [str(i) for i in range(model_cfg.num_classes)]
        )
        self.device = resolve_device(device)
        model = build_detector(model_cfg)
        load_state_dict_checked(
            model, checkpoint["model"], source=checkpoint_path, target="the model of its config"
        )
        self.model = model.to(self.device).eval()

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        """Detections of one image file: ``boxes`` ``[K, 4]`` xyxy in its pixels, ``scores``
        ``[K]``, ``labels`` ``[K]`` class indices."""
        from autoassign.data.transforms import load_image

        return self.detect(load_image(path))

    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Detections of one decoded image, ``[3, H, W]`` uint8 RGB (what ``load_image``
        gives): ``boxes`` ``[K, 4]`` xyxy in its pixels, ``scores`` ``[K]``, ``labels`` ``[K]``."""
        from autoassign.data.transforms import resize_image

        original_size = (int(image.shape[-2]), int(image.shape[-1]))
        input_cfg = self.config.model.input
        resized, _ = resize_image(image, input_cfg.min_size, input_cfg.max_size)
        (output,) = self.model([resized.to(self.device)], original_sizes=[original_size])
        return {key: value.cpu() for key, value in output.items()}


def run(args: argparse.Namespace) -> Path:
    from PIL import Image

    from autoassign.checkpoint_sources import resolve_checkpoint
    from autoassign.data.records import DetectionDataset
    from autoassign.eval.predictions import write_predictions
    from autoassign.viz import draw_detections

    images = find_images(args.images)
    names = [image_name(path, args.root) for path in images]
    predictor = Predictor(resolve_checkpoint(args.checkpoint), device=args.device)
    predictions = []
    for path, name in zip(images, names):
        output = predictor(path)
        if args.score_threshold is not None:
            keep = output["scores"] >= args.score_threshold
            output = {key: value[keep] for key, value in output.items()}
        predictions.append({"file_name": name, **output})

        drawn = output["scores"] >= args.draw_threshold
        with Image.open(path) as picture:
            canvas = draw_detections(
                picture,
                output["boxes"][drawn].numpy(),
                output["labels"][drawn].tolist(),
                output["scores"][drawn].numpy(),
                predictor.class_names,
            )
        target = args.out / "images" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(target)
        print(f"{name}: {len(output['scores'])} detections, {int(drawn.sum())} drawn")

    # write_predictions takes the class names from a dataset; these images have no annotations.
    classes = DetectionDataset(
        format=predictor.config.data.format,
        split="predict",
        records=[],
        class_names=predictor.class_names,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "predictions.json"
    write_predictions(out_file, classes, predictions)
    print(f"wrote {out_file} ({len(predictions)} images)")
    return out_file


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
