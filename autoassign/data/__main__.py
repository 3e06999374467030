"""Command line of the data package.

    python -m autoassign.data validate --format F --root DIR [--split S] [--classes A,B] [--json]
    python -m autoassign.data synth --format F --out DIR [--images N --classes K --size S --seed N]

``validate`` exits 0 when the split is usable (warnings allowed), 1 when it has errors and 2
for bad arguments; ``--json`` prints the report as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autoassign.config import DataConfig
from autoassign.data.class_lists import parse_class_list
from autoassign.data.errors import DatasetError
from autoassign.data.synthetic import FORMATS, write_synthetic
from autoassign.data.validate import scan_dataset


def _image_size(text: str) -> int | tuple[int, int]:
    """``320`` or ``320x240`` (width x height)."""
    try:
        if "x" in text:
            width, height = (int(v) for v in text.lower().split("x"))
            return width, height
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or WxH, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m autoassign.data", description="Validate or synthesize datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="scan a dataset split for problems")
    validate.add_argument("--format", choices=FORMATS, required=True)
    validate.add_argument("--root", type=Path, required=True)
    validate.add_argument("--split", default="train")
    validate.add_argument("--objects365-version", type=int, choices=(1, 2), default=2)
    validate.add_argument(
        "--classes",
        type=parse_class_list,
        metavar="A,B,...",
        help="your dataset's class names in label order (voc, coco, objects365); "
        "default VOC's 20 classes or every category of the json",
    )
    validate.add_argument("--json", action="store_true", help="print one JSON object")
    validate.add_argument(
        "--max-per-kind", type=int, default=20, help="problems listed per kind in the text report"
    )

    synth = commands.add_parser("synth", help="write a synthetic dataset in a real format")
    synth.add_argument("--format", choices=FORMATS, required=True)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--images", type=int, default=160, help="training images (val: a quarter)")
    synth.add_argument("--classes", type=int, default=None, help="1..10 (WiderFace: 1)")
    synth.add_argument("--size", type=_image_size, default=320, help="N or WxH pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--splits", nargs="+", default=["train", "val"])
    synth.add_argument("--objects365-version", type=int, choices=(1, 2), default=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        if not args.root.is_dir():
            parser.error(f"--root {args.root} is not a folder")
        try:
            cfg = DataConfig(
                format=args.format,
                root=args.root,
                objects365_version=args.objects365_version,
                classes=args.classes,
            )
        except ValueError as error:  # pydantic's ValidationError
            parser.error(f"--classes: {error.errors()[0]['msg']}")
        report = scan_dataset(cfg, args.split)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print(report.summary(max_per_kind=args.max_per_kind))
        return 0 if report.ok else 1

    if args.images < 1:
        parser.error("--images must be at least 1")
    try:
        written = write_synthetic(
            args.format,
            args.out,
            num_images=args.images,
            num_classes=args.classes,
            image_size=args.size,
            seed=args.seed,
            splits=tuple(args.splits),
            objects365_version=args.objects365_version,
        )
    except ValueError as error:
        parser.error(str(error))
    except (DatasetError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for split in written.images:
        print(
            f"{written.format} {split}: {written.images[split]} images, "
            f"{written.boxes[split]} boxes -> {written.root}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
