"""``python -m orchestration.prior_shift EXPERIMENT``: where each trial's learned center prior went.

For every finished trial of a sweep, reads its ``center_prior.json`` artifact (the learned
``mean`` and ``sigma`` per class, in strides; both start at the config's ``mean_init`` and
``sigma_init``) and prints, per dataset, group (``--by``, e.g. ``variant``) and class, the
learned mean ``(x, y)`` of each seed, and whether its sign agrees across seeds.

With ``--synthetic``, classes that are the embedded synthetic shapes also show where the
shape's mass lies: the offset of its pixel centroid from the box centre, as a fraction of
the box's half-size (``+x`` right, ``+y`` down). A learned prior that follows the mass has
means of that sign. VOC's synthetic set draws shape ``i`` for VOC class ``i``.

Exit status: 0 with a table, 2 for an experiment or parameter that does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestration.results.compare import (
    FORMATS,
    CompareError,
    DatasetSummary,
    add_experiment_arguments,
    load_trials,
    natural_order,
    render,
    run_report,
    tracking_client,
)

MASS_MASK_SIZE = 200
"""Pixels of the square mask the mass centroid of a synthetic shape is measured on."""


def shape_mass_offset(shape: str) -> tuple[float, float]:
    """The centroid of ``shape``'s pixels minus the box centre, over the box's half-size:
    ``(x, y)`` in ``[-1, 1]``; ``(0, 0)`` for a shape symmetric about its centre."""
    from autoassign.data.synthetic.shapes import render_mask

    mask = render_mask(shape, MASS_MASK_SIZE, MASS_MASK_SIZE)
    rows, cols = np.nonzero(mask)
    half = (MASS_MASK_SIZE - 1) / 2
    return float((cols.mean() - half) / half), float((rows.mean() - half) / half)


def synthetic_shape(class_name: str, index: int, format_: str) -> str | None:
    """The synthetic shape a class of the embedded set is drawn as, if any."""
    from autoassign.data.synthetic.shapes import SHAPES

    if format_ == "voc":
        return SHAPES[index] if index < len(SHAPES) else None
    return class_name if class_name in SHAPES else None


def read_priors(client: Any, run_id: str) -> list[dict[str, Any]] | None:
    """The run's ``center_prior.json``: per class ``{"class", "mean", "sigma"}``; None when
    the run has no such artifact (it failed before the end)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar a trial
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "center_prior.json", folder)
        except Exception:  # MLflow raises several types for a missing artifact
            return None
        return json.loads(Path(path).read_text())


def prior_table(
    client: Any,
    summaries: list[DatasetSummary],
    *,
    by: str | None,
    seed_param: str,
    synthetic: bool,
) -> list[dict[str, Any]]:
    """One row per dataset, group and class: each seed's learned mean and sigma, the mean over
    seeds, whether the sign of x and of y is the same in every seed (None for one seed), and
    the mass offset."""
    rows = []
    for summary in summaries:
        groups: dict[str, dict[str, list[dict]]] = {}
        for trial in summary.trials:
            priors = read_priors(client, trial.run_id)
            if priors is None:
                continue
            group = trial.params.get(by, "-") if by else "-"
            seed = trial.params.get(seed_param, "-")
            groups.setdefault(group, {})[seed] = priors
        for group in sorted(groups, key=natural_order):
            seeds = sorted(groups[group], key=natural_order)
            classes = groups[group][seeds[0]]
            for index, entry in enumerate(classes):
                name = entry["class"]
                means = [groups[group][s][index]["mean"] for s in seeds]
                sigmas = [groups[group][s][index]["sigma"] for s in seeds]
                row: dict[str, Any] = {
                    "dataset": summary.dataset,
                    "group": group,
                    "class": name,
                    "seeds": seeds,
                    "mean_per_seed": means,
                    "sigma_per_seed": sigmas,
                    "mean": [statistics.fmean(m[axis] for m in means) for axis in (0, 1)],
                    "sigma": [statistics.fmean(s[axis] for s in sigmas) for axis in (0, 1)],
                    "same_sign": [_same_sign([m[axis] for m in means]) for axis in (0, 1)],
                }
                shape = synthetic_shape(name, index, summary.format) if synthetic else None
                row["shape"] = shape
                row["mass_offset"] = list(shape_mass_offset(shape)) if shape else None
                rows.append(row)
    return rows


def _same_sign(values: list[float]) -> bool | None:
    """Whether every seed's value has one sign (zero has none); None for a single seed."""
    if len(values) < 2:
        return None
    return all(v > 0 for v in values) or all(v < 0 for v in values)


def prior_cells(rows: list[dict[str, Any]], by: str | None) -> tuple[list[str], list[list[str]]]:
    header = ["dataset", *([by] if by else []), "class", "mean x per seed", "mean y per seed"]
    header += ["same sign x/y", "sigma x, y (seed mean)"]
    if any(r["mass_offset"] is not None for r in rows):
        header += ["shape", "mass offset x, y"]
    cells = []
    for r in rows:
        line = [r["dataset"], *([r["group"]] if by else []), r["class"]]
        line += [_numbers(m[0] for m in r["mean_per_seed"])]
        line += [_numbers(m[1] for m in r["mean_per_seed"])]
        line += ["/".join({True: "yes", False: "no", None: "-"}[same] for same in r["same_sign"])]
        line += [_numbers(r["sigma"])]
        if len(header) > len(line):
            offset = r["mass_offset"]
            line += [r["shape"] or "", _numbers(offset) if offset else ""]
        cells.append(line)
    return header, cells


def _numbers(values) -> str:
    return " ".join(f"{v:+.3f}" for v in values)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.prior_shift",
        description="The learned center prior of each trial of a sweep, per class and seed.",
    )
    add_experiment_arguments(parser)
    parser.add_argument("--by", metavar="PARAM", help="group trials by this searched parameter "
                        "(e.g. variant)")  # fmt: skip
    parser.add_argument("--seed-param", default="seed", help="the parameter that tells seeds "
                        "apart (default: seed)")  # fmt: skip
    parser.add_argument("--dataset", action="append", help="only these datasets (repeatable)")
    parser.add_argument("--synthetic", action="store_true", help="show the synthetic shapes' "
                        "mass offsets")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="table")
    return parser.parse_args(argv)


def prior_shift(args: argparse.Namespace) -> str:
    client, _ = tracking_client(args)
    _, summaries = load_trials(client, args.experiment, sweep_id=args.sweep)
    if args.dataset:
        known = [s.dataset for s in summaries]
        unknown = [d for d in args.dataset if d not in known]
        if unknown:
            raise CompareError(
                f"--dataset {', '.join(unknown)}: not in the experiment; it has: "
                + ", ".join(known)
            )
        summaries = [s for s in summaries if s.dataset in args.dataset]
    searched = sorted({k for s in summaries for t in s.trials for k in t.params})
    for flag, param in (("--by", args.by), ("--seed-param", args.seed_param)):
        if param is not None and param not in searched:
            raise CompareError(
                f"{flag} {param!r} was not searched; the searched parameters are: "
                + (", ".join(searched) or "(none)")
            )
    rows = prior_table(
        client, summaries, by=args.by, seed_param=args.seed_param, synthetic=args.synthetic
    )
    if args.format == "json":
        return json.dumps(rows, indent=2) + "\n"
    return render(*prior_cells(rows, args.by), args.format)


def main(argv: Sequence[str] | None = None) -> int:
    return run_report(prior_shift, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
