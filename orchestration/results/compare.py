"""``python -m orchestration.compare EXPERIMENT``: what a sweep found, from MLflow alone.

One row per dataset: the best finished trial by the dataset's ranking metric, the other
metrics of its protocol, its searched parameters, run link and checkpoint URI. ``--by PARAM``
shows how one searched parameter (or ``variant``) moves each dataset's metric: trials,
mean ± sample standard deviation, min and max per value; when other parameters were searched
too (``seed`` aside), also each value's best setting of them (the one with the highest mean
over its seeds: ``--by variant`` over a learning-rate grid gives each model at its best
learning rate) and that mean; ``--classes A,B`` adds the mean per-class AP of those classes
against the others. No Ray is needed, only the tracking
server (or the sweep's SQLite file).

Exit status: 0 with a table, 2 for an experiment, sweep, metric or parameter that does not
exist (the message lists what does).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.common.redaction import redact
from orchestration.definition.sweep_config import DEFAULT_RANKING_METRIC
from orchestration.results.leaderboard import Winner, leaderboard_row
from orchestration.tracking.run_search import (
    cyclic_gc_paused,
    search_all,
    search_parts,
    search_runs_in_parts,
)
from orchestration.tracking.tags import (
    TAG_CHECKPOINT,
    TAG_DATASET,
    TAG_FORMAT,
    TAG_KIND,
    TAG_METRIC,
    TAG_SWEEP_ID,
)

FORMATS = ("table", "csv", "md", "json")
SEARCH_PREFIX = "search."  # trial runs log their searched parameters as search.<dot path>
SEED_PARAMS = ("seed",)
"""Searched parameters that repeat a setting rather than change it: ``--by`` averages over
them instead of picking the best."""


class CompareError(Exception):
    """A request that names something the tracking store does not have."""


@dataclass
class Trial:
    """One finished trial run, as the comparison needs it."""

    run_id: str
    dataset: str
    format: str
    metric: str
    metrics: dict[str, float]
    params: dict[str, str]
    checkpoint: str | None


@dataclass
class DatasetSummary:
    dataset: str
    format: str
    metric: str
    trials: list[Trial] = field(default_factory=list)
    failed: int = 0

    @property
    def scored(self) -> list[Trial]:
        return [t for t in self.trials if _finite(t.metrics.get(self.metric))]

    @property
    def best(self) -> Trial | None:
        return max(self.scored, key=lambda t: t.metrics[self.metric], default=None)


def load_trials(
    client: Any, experiment: str, *, sweep_id: str | None = None, parts: int = 1
) -> tuple[str, list[DatasetSummary]]:
    """The experiment's id and its trial runs (``sweep_id``'s only, when given) grouped by
    dataset (in order of appearance); ``parts``: see :func:`search_runs_in_parts`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"experiment {experiment!r} not found; the tracking store has: "
            + (", ".join(names) or "(none)")
        )
    trials = f"tags.`{TAG_KIND}` = 'trial'"
    if sweep_id is None:
        runs = search_runs_in_parts(client, found.experiment_id, trials, parts)
        return found.experiment_id, summarize_runs(runs)
    # The sweep's own runs only: an experiment of nightly sweeps holds thousands of others.
    runs = search_runs_in_parts(
        client, found.experiment_id, f"{trials} and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'", parts
    )
    if not runs:
        everyone = search_all(client, found.experiment_id, trials)
        sweeps = sorted({r.data.tags.get(TAG_SWEEP_ID, "") for r in everyone})
        raise CompareError(
            f"sweep {sweep_id!r} has no trials in experiment {experiment!r}; its sweeps: "
            + (", ".join(s for s in sweeps if s) or "(none)")
        )
    return found.experiment_id, summarize_runs(runs)


def summarize_runs(runs: Sequence[Any]) -> list[DatasetSummary]:
    """Trial runs (MLflow ``Run`` objects) grouped by dataset, in order of start."""
    summaries: dict[str, DatasetSummary] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        tags, params = run.data.tags, run.data.params
        dataset = tags.get(TAG_DATASET) or params.get("dataset", "?")
        format_ = tags.get(TAG_FORMAT) or params.get("data.format", "coco")
        metric = tags.get(TAG_METRIC) or DEFAULT_RANKING_METRIC[format_]
        summary = summaries.setdefault(dataset, DatasetSummary(dataset, format_, metric))
        if run.info.status == "FAILED":
            summary.failed += 1
            continue
        summary.trials.append(
            Trial(
                run_id=run.info.run_id,
                dataset=dataset,
                format=format_,
                metric=metric,
                metrics=dict(run.data.metrics),
                params={
                    k[len(SEARCH_PREFIX) :]: v
                    for k, v in params.items()
                    if k.startswith(SEARCH_PREFIX)
                },
                checkpoint=tags.get(TAG_CHECKPOINT),
            )
        )
    return list(summaries.values())


def with_metric(summaries: list[DatasetSummary], metric: str | None) -> list[DatasetSummary]:
    """Rank every dataset by ``metric`` instead of its own (it must be one it reports)."""
    if metric is None:
        return summaries
    for summary in summaries:
        reported = sorted({k for t in summary.trials for k in t.metrics})
        if metric not in reported:
            raise CompareError(
                f"--metric {metric!r}: dataset {summary.dataset!r} reports no such metric; "
                f"it has: {', '.join(reported) or '(none)'}"
            )
        summary.metric = metric
    return summaries


def leaderboard(summaries: list[DatasetSummary], runs_url: str | None) -> list[dict[str, Any]]:
    """One row per dataset, with the best trial's protocol metrics, params and links."""
    rows = []
    for s in summaries:
        best = s.best
        winner = None
        if best is not None:
            run_url = f"{runs_url}/{best.run_id}" if runs_url else None
            winner = Winner(best.metrics, best.params, best.run_id, run_url, best.checkpoint)
        rows.append(
            leaderboard_row(
                dataset=s.dataset,
                format=s.format,
                metric=s.metric,
                trials=len(s.trials) + s.failed,
                failed=s.failed,
                winner=winner,
            )
        )
    return rows


def by_parameter(
    summaries: list[DatasetSummary], param: str, classes: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Per dataset and value of ``param``: trials, and the ranking metric's mean, sample
    standard deviation, min and max over them (the spread over seeds, in a seeded sweep).

    When other parameters were searched as well (:data:`SEED_PARAMS` aside), each row also
    has ``best_setting``, the setting of those parameters whose trials have the highest mean
    (e.g. ``{"train.lr": "0.02"}``), and ``at_best``, those trials' spread (trials, mean, sd,
    min, best).

    With ``classes``, two more statistics: the mean per-class AP (``AP/<class>``) of the
    named classes the dataset has, and of its other classes, each averaged over the trials.
    """
    searched = sorted({k for s in summaries for t in s.trials for k in t.params})
    if param not in searched:
        raise CompareError(
            f"--by {param!r} was not searched; the searched parameters are: "
            + (", ".join(searched) or "(none)")
        )
    settings = [k for k in searched if k != param and k not in SEED_PARAMS]
    rows = []
    for s in summaries:
        groups: dict[str, list[Trial]] = {}
        for trial in s.scored:
            groups.setdefault(trial.params.get(param, "-"), []).append(trial)
        named, others = _class_split(s, classes) if classes else ([], [])
        for value in sorted(groups, key=natural_order):
            trials = groups[value]
            row = {"dataset": s.dataset, "metric": s.metric, param: value}
            row.update(_spread([t.metrics[s.metric] for t in trials]))
            if settings:
                row.update(_best_setting(trials, settings, s.metric))
            if classes:
                row["classes"] = _spread([_mean_ap(t, named) for t in trials], prefix="named_")
                row["classes"].update(
                    _spread([_mean_ap(t, others) for t in trials], prefix="others_")
                )
            rows.append(row)
    return rows


def _best_setting(trials: list[Trial], settings: list[str], metric: str) -> dict[str, Any]:
    """``best_setting`` (the values of ``settings`` whose trials have the highest mean
    ``metric``; the first in natural order on a tie) and ``at_best`` (their spread)."""
    groups: dict[tuple[str, ...], list[float]] = {}
    for trial in trials:
        key = tuple(trial.params.get(name, "-") for name in settings)
        groups.setdefault(key, []).append(trial.metrics[metric])
    ordered = sorted(groups, key=lambda key: [natural_order(v) for v in key])
    best = max(ordered, key=lambda key: statistics.fmean(groups[key]))
    return {"best_setting": dict(zip(settings, best)), "at_best": _spread(groups[best])}


def _spread(values: list[float], prefix: str = "") -> dict[str, Any]:
    finite = [v for v in values if _finite(v)]
    return {
        f"{prefix}trials": len(finite),
        f"{prefix}mean": statistics.fmean(finite) if finite else None,
        f"{prefix}sd": statistics.stdev(finite) if len(finite) > 1 else None,
        f"{prefix}min": min(finite, default=None),
        f"{prefix}best": max(finite, default=None),
    }


def _class_split(summary: DatasetSummary, classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The ``AP/<class>`` metric names of those ``classes`` the dataset reports, and of its
    other classes (datasets name classes their own way: one list can serve several)."""
    reported = sorted({k for t in summary.trials for k in t.metrics if k.startswith("AP/")})
    named = [key for key in (f"AP/{name}" for name in classes) if key in reported]
    if not named:
        have = ", ".join(key[3:] for key in reported) or "(no per-class AP)"
        raise CompareError(
            f"--classes: dataset {summary.dataset!r} reports no AP for any of "
            f"{', '.join(classes)}; its classes are: {have}"
        )
    return named, [key for key in reported if key not in named]


def _mean_ap(trial: Trial, keys: list[str]) -> float:
    values = [trial.metrics[k] for k in keys if _finite(trial.metrics.get(k))]
    return statistics.fmean(values) if values else float("nan")


# ---- output ----------------------------------------------------------------------------------


def leaderboard_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Flat columns: dataset, metric, value, the protocol metrics, params, run, checkpoint."""
    metric_names = _ordered(k for r in rows for k in r.get("metrics", {}))
    param_names = _ordered(k for r in rows for k in r.get("params", {}))
    header = ["dataset", "metric", "value", *metric_names, *param_names]
    header += ["trials", "failed", "run_id", "checkpoint"]
    cells = []
    for r in rows:
        metrics, params = r.get("metrics", {}), r.get("params", {})
        cells.append(
            [
                r["dataset"],
                r["metric"],
                _number(r.get("value")) if r["status"] == "ok" else "ALL FAILED",
                *(_number(metrics.get(m)) for m in metric_names),
                *(params.get(p, "") for p in param_names),
                str(r["trials"]),
                str(r["failed"]),
                r.get("run_id") or "",
                r.get("checkpoint") or "",
            ]
        )
    return header, cells


def by_parameter_cells(rows: list[dict[str, Any]], param: str):
    """Columns: dataset, metric, the value, trials, mean, sd, min, best (the max); with other
    searched parameters, ``best <parameter>`` for each (the value's best setting of them) and
    that setting's trials, mean and sd (``its trials``, ``its mean``, ``its sd``); with a
    class split, the named and the other classes' mean AP and its sd."""
    split = any("classes" in r for r in rows)
    settings = _ordered(k for r in rows for k in r.get("best_setting", {}))
    header = ["dataset", "metric", param, "trials", "mean", "sd", "min", "best"]
    if settings:
        header += [f"best {name}" for name in settings] + ["its trials", "its mean", "its sd"]
    if split:
        header += ["named AP", "named sd", "other AP", "other sd"]
    cells = []
    for r in rows:
        line = [r["dataset"], r["metric"], str(r[param]), str(r["trials"])]
        line += [_number(r[k]) for k in ("mean", "sd", "min", "best")]
        if settings:
            line += [str(r["best_setting"].get(name, "")) for name in settings]
            line += [str(r["at_best"]["trials"])]
            line += [_number(r["at_best"][k]) for k in ("mean", "sd")]
        if split:
            line += [_number(r["classes"][k]) for k in ("named_mean", "named_sd")]
            line += [_number(r["classes"][k]) for k in ("others_mean", "others_sd")]
        cells.append(line)
    return header, cells


def render(header: list[str], cells: list[list[str]], fmt: str) -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(cells)
        return out.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in column) for column in zip(header, *cells)]
    lines = [header, ["-" * w for w in widths], *cells]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join(text) + "\n"


def _number(value: Any) -> str:
    return f"{value:.4f}" if _finite(value) else ""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _ordered(keys) -> list[str]:
    return list(dict.fromkeys(keys))


def natural_order(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def markdown_table(summaries: list[DatasetSummary]) -> str:
    """The leaderboard of ``summaries`` as Markdown, for a sweep's parent run."""
    return render(*leaderboard_cells(leaderboard(summaries, None)), "md")


# ---- CLI -------------------------------------------------------------------------------------


def default_tracking_uri(experiment: str) -> str | None:
    """``MLFLOW_TRACKING_URI``, else the demo default: ``runs/<experiment>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = Path("runs") / experiment / "mlflow.db"
    return f"sqlite:///{local.resolve()}" if local.is_file() else None


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that name a sweep's trials: the experiment, its store, the sweep id."""
    parser.add_argument("experiment", help="MLflow experiment (a sweep's name by default)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else the "
                        "sweep's SQLite file runs/<experiment>/mlflow.db")  # fmt: skip
    parser.add_argument("--sweep", help="only this sweep id (default: every trial)")


def tracking_client(args: argparse.Namespace) -> tuple[Any, str]:
    """An MlflowClient of the store :func:`add_experiment_arguments` names, and its URI."""
    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or default_tracking_uri(args.experiment)
    if uri is None:
        raise CompareError(
            "no tracking store: pass --tracking-uri or set MLFLOW_TRACKING_URI (no "
            f"runs/{args.experiment}/mlflow.db here)"
        )
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise CompareError(f"--tracking-uri {uri}: no such SQLite file")
    return MlflowClient(uri), uri


def run_report(report: Callable[[argparse.Namespace], str], args: argparse.Namespace) -> int:
    """Print ``report(args)``; exit status 0, or 2 with the message of a CompareError."""
    try:
        sys.stdout.write(report(args))
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m orchestration.compare",
        description="The best trial per dataset of a sweep's MLflow experiment.",
    )
    add_experiment_arguments(parser)
    parser.add_argument("--metric", help="rank every dataset by this metric instead")
    parser.add_argument("--by", metavar="PARAM", help="a searched parameter's effect instead "
                        "(mean ± sd, min and max of the metric per value, and its best "
                        "setting of the other searched parameters; variant for a sweep's "
                        "variants)")  # fmt: skip
    parser.add_argument("--classes", metavar="A,B,...", help="with --by: also the mean "
                        "per-class AP of these classes against the other classes")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="table")
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> str:
    client, uri = tracking_client(args)
    parts = search_parts(uri)
    experiment_id, summaries = load_trials(
        client, args.experiment, sweep_id=args.sweep, parts=parts
    )
    summaries = with_metric(summaries, args.metric)
    if args.classes and not args.by:
        raise CompareError("--classes goes with --by")
    if args.by:
        classes = [c.strip() for c in (args.classes or "").split(",") if c.strip()]
        rows = by_parameter(summaries, args.by, classes)
        if args.format == "json":
            return json.dumps(rows, indent=2) + "\n"
        return render(*by_parameter_cells(rows, args.by), args.format)
    runs_url = f"{redact(uri).rstrip('/')}/#/experiments/{experiment_id}/runs"
    rows = leaderboard(summaries, runs_url if uri.startswith("http") else None)
    if args.format == "json":
        return json.dumps(rows, indent=2) + "\n"
    return render(*leaderboard_cells(rows), args.format)


def main(argv: Sequence[str] | None = None) -> int:
    # A short-lived command that builds tens of thousands of objects: Python's cyclic
    # collector is off for all of it, MLflow's import included (see cyclic_gc_paused).
    with cyclic_gc_paused():
        return run_report(compare, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
