"""Run a trained checkpoint on images.

    python -m autoassign.predict CHECKPOINT IMAGES... [--out DIR] [--score-threshold T]
        [--root DIR] [--draw-threshold T] [--device auto|cpu|cuda]
        [--format autoassign|coco-results|widerface|voc] [--annotations FILE] [--split S]

CHECKPOINT is a checkpoint directory (e.g. ``runs/x/checkpoints/last``) or its
``checkpoint.pt``, or a model URI that an installed package resolves
(:mod:`autoassign.checkpoint_sources`): with the platform installed,
``models:/autoassign-coco@best`` or ``models:/autoassign-coco/3`` from the MLflow model
registry at ``MLFLOW_TRACKING_URI``. The checkpoint's config says which detector it holds
(``model.kind``: AutoAssign or the FCOS baseline). IMAGES are image files, folders (searched
recursively for .jpg/.jpeg/.png) or list files (``.txt``, one image path a line, relative to
``--root`` or else to the list's folder: WiderFace's ``wider_face_test_filelist.txt`` is
one). The model is
rebuilt from the checkpoint's resolved config and weights; each image is resized as in
evaluation (``model.input``). An image's name is its path relative to ``--root`` when given
(use the dataset's image folder so names match its annotations), else its base name.
Written to ``--out`` (default ``predictions``), by ``--format``:

- ``autoassign`` (the default): ``predictions.json``, one entry per image, ``{"file_name",
  "boxes" (xyxy, original pixels), "scores", "labels" (class names)}``, the format
  ``python -m autoassign.eval`` reads.
- ``coco-results``: ``coco_results.json``, the COCO results list the COCO and Objects365
  servers take (and ``python -m autoassign.eval`` reads), with the image and category ids of
  ``--annotations`` (the dataset's json; for COCO test-dev its ``image_info`` json). Images
  it does not list are not run (a note says how many).
- ``widerface``: ``widerface/<event>/<image>.txt``, the official layout; needs names with
  their event folder (``--root WIDER_test/images``).
- ``voc``: ``voc/comp4_det_<split>_<class>.txt``, the devkit's files (``--split``, default
  ``test``).

See :mod:`autoassign.submission` for each layout. Always written:
``images/<file_name>``, each image with its boxes (score >= ``--draw-threshold``) drawn.

Exit status: 0 done, 1 bad checkpoint or image file, 2 bad command line (or image paths that
do not exist).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from autoassign.errors import ConfigError, run_cli
from autoassign.submission import FORMATS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autoassign.predict",
        description="Detect objects in images with a trained checkpoint (AutoAssign or FCOS, "
        "as its config says).",
    )
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory or file written by training, or a model URI that an "
        "installed resolver knows (models:/NAME@ALIAS with the platform installed)",
    )
    parser.add_argument(
        "images", nargs="+", type=Path, help="image files, folders or .txt lists of images"
    )
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
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="autoassign",
        help="what to write: the project's predictions.json (default) or a benchmark's "
        "submission files",
    )
    parser.add_argument(
        "--annotations",
        type=Path,
        default=None,
        help="coco-results: the COCO-style json whose image and category ids to use",
    )
    parser.add_argument(
        "--split", default="test", help="voc: the split named in the file names (default test)"
    )
    args = parser.parse_args(argv)
    if args.format == "coco-results" and args.annotations is None:
        parser.error("--format coco-results needs --annotations (the dataset's json)")
    if args.annotations is not None and args.format != "coco-results":
        parser.error("--annotations is only used by --format coco-results")
    return args


def find_images(paths: Iterable[Path], root: Path | None = None) -> list[Path]:
    """The image files among ``paths``: folders expanded recursively (sorted), ``.txt`` files
    read as lists (:func:`read_image_list`, relative to ``root``)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file() and path.suffix.lower() == ".txt":
            found.extend(read_image_list(path, root))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such image file or folder")
    if not found:
        raise ConfigError("no images found (looked for .jpg, .jpeg, .png)")
    return found


def read_image_list(path: Path, root: Path | None) -> list[Path]:
    """The images a list file names: one path a line (blank lines skipped), relative to
    ``root``, else to the list's folder.

    Raises:
        ConfigError: a line that names no image file, or an image that does not exist (the
            list and its line are named).
    """
    base = root if root is not None else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the image list ({error})") from None
    found = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if not name.lower().endswith(IMAGE_SUFFIXES):
            raise ConfigError(f"{path} line {number}: {name!r} is not an image path")
        image = base / name
        if not image.is_file():
            raise ConfigError(f"{path} line {number}: {image} does not exist")
        found.append(image)
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
    """Predict, draw and write; returns the file (or folder) of ``args.format`` written."""
    from PIL import Image

    from autoassign.checkpoint_sources import resolve_checkpoint
    from autoassign.viz import draw_detections

    images = find_images(args.images, args.root)
    names = [image_name(path, args.root) for path in images]
    predictor = Predictor(resolve_checkpoint(args.checkpoint), device=args.device)
    # Every check of names and ids runs before the model sees the first image.
    write, unlisted = submission_writer(args, names, predictor)
    if unlisted:
        print(
            f"note: {args.annotations} does not list {len(unlisted)} of the images (first: "
            f"{', '.join(unlisted[:3])}); they are not run"
        )
        skipped = set(unlisted)
        kept = [(path, name) for path, name in zip(images, names) if name not in skipped]
        images, names = [path for path, _ in kept], [name for _, name in kept]
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

    return write(predictions)


def submission_writer(
    args: argparse.Namespace, names: list[str], predictor: Predictor
) -> tuple[Callable[[list[dict]], Path], list[str]]:
    """The writer of ``args.format`` for these image names, checked now (a name the format
    cannot take raises :class:`~autoassign.submission.SubmissionError` before any prediction),
    and the names it has no place for (``coco-results``: images ``--annotations`` does not
    list, such as COCO test2017 images outside test-dev), which are not to be run.

    The writer takes one ``{"file_name", "boxes", "scores", "labels"}`` dict per image and
    returns what it wrote under ``args.out``.
    """
    from autoassign.data.records import DetectionDataset
    from autoassign.eval.base import to_image_predictions
    from autoassign.eval.predictions import write_predictions
    from autoassign.submission import coco_results, voc, widerface

    class_names = predictor.class_names
    out: Path = args.out
    unlisted: list[str] = []

    def store(predictions: list[dict]) -> dict:
        return {
            p["file_name"]: to_image_predictions(p, len(class_names), where=p["file_name"])
            for p in predictions
        }

    if args.format == "coco-results":
        ids = coco_results.read_coco_ids(args.annotations, names, len(class_names))
        unlisted = ids.unlisted

        def write(predictions: list[dict]) -> Path:
            path = out / "coco_results.json"
            count = coco_results.write_coco_results(path, store(predictions), ids)
            print(f"wrote {path} ({count} detections, {len(predictions)} images)")
            return path

    elif args.format == "widerface":
        widerface.check_names(names)

        def write(predictions: list[dict]) -> Path:
            files = widerface.write_widerface(out / "widerface", store(predictions))
            print(f"wrote {len(files)} files under {out / 'widerface'} (one per image)")
            return out / "widerface"

    elif args.format == "voc":
        voc.check_names(names)
        for class_name in class_names:
            voc.results_file_name(args.split, class_name)

        def write(predictions: list[dict]) -> Path:
            files = voc.write_voc(out / "voc", store(predictions), class_names, args.split)
            print(f"wrote {len(files)} files under {out / 'voc'} (one per class)")
            return out / "voc"

    else:

        def write(predictions: list[dict]) -> Path:
            # write_predictions takes the class names from a dataset; these images have none.
            classes = DetectionDataset(
                format=predictor.config.data.format,
                split="predict",
                records=[],
                class_names=class_names,
            )
            out.mkdir(parents=True, exist_ok=True)
            path = out / "predictions.json"
            write_predictions(path, classes, predictions)
            print(f"wrote {path} ({len(predictions)} images)")
            return path

    return write, unlisted


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
