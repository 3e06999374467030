"""Score a predictions file with the dataset's own protocol.

    python -m autoassign.eval --format coco --root data/coco --split val2017 preds.json
    python -m autoassign.eval --format voc --root data/VOC2007 --split test preds.json \\
        --voc-metric area --json
    python -m autoassign.eval --format voc --root data/hardhats --split val preds.json \\
        --classes helmet,vest

Prints a table of the metrics (fractions), or one JSON object with ``--json`` (NaN as null).
Notes on deviations from the official protocol go to stderr. Bad input exits with status 1
and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from autoassign.config import EvalConfig
from autoassign.data.class_lists import parse_class_list
from autoassign.data.errors import DatasetError
from autoassign.errors import AutoAssignError
from autoassign.eval import build_evaluator
from autoassign.eval.predictions import load_predictions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m autoassign.eval",
        description="Score a predictions file with the dataset's evaluation protocol.",
    )
    parser.add_argument(
        "--format", required=True, choices=["coco", "voc", "objects365", "widerface"]
    )
    parser.add_argument("--root", required=True, type=Path, help="the dataset's root folder")
    parser.add_argument("--split", required=True, help="split name, e.g. val2017, test, val")
    parser.add_argument("predictions", type=Path, help="JSON list or JSON lines file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--voc-metric", choices=["11pt", "area"], default="11pt")
    parser.add_argument("--objects365-version", type=int, choices=[1, 2], default=2)
    parser.add_argument(
        "--classes",
        type=parse_class_list,
        metavar="A,B,...",
        help="the dataset's own class names in label order (as in training's data.classes); "
        "only these are scored",
    )
    parser.add_argument(
        "--widerface-ground-truth",
        type=Path,
        default=None,
        help="folder of the official wider_*_val.mat files (default <root>/ground_truth)",
    )
    return parser.parse_args(argv)


def format_table(metrics: dict[str, float]) -> str:
    """Summary metrics first, then per-class AP, one ``name  value`` row each."""
    summary = [name for name in metrics if not name.startswith("AP/")]
    per_class = [name for name in metrics if name.startswith("AP/")]
    width = max((len(name) for name in metrics), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name in summary + per_class:
        value = metrics[name]
        shown = "   nan" if math.isnan(value) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, float]:
    # Imported here: the dataset readers are only needed by the command line.
    from autoassign.config import DataConfig
    from autoassign.data import build_dataset

    data_cfg = DataConfig(
        format=args.format,
        root=args.root,
        objects365_version=args.objects365_version,
        val_split=args.split,
        classes=args.classes,
    )
    dataset = build_dataset(data_cfg, args.split)
    dataset.meta.setdefault("root", args.root)  # where the WiderFace ground_truth/ folder is
    eval_cfg = EvalConfig(
        voc_metric=args.voc_metric, widerface_ground_truth=args.widerface_ground_truth
    )
    evaluator = build_evaluator(dataset, eval_cfg)
    evaluator.reset()
    evaluator.process(load_predictions(args.predictions, dataset))
    metrics = evaluator.evaluate()
    for note in evaluator.notes:
        print(f"note: {note}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        metrics = run(args)
    except (AutoAssignError, DatasetError, ValidationError, OSError) as error:
        print(f"error: {error or type(error).__name__}", file=sys.stderr)
        return 1
    if args.json:
        clean = {name: (None if math.isnan(v) else v) for name, v in metrics.items()}
        print(json.dumps(clean))
    else:
        print(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
