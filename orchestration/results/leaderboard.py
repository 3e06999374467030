"""The best trial of each dataset, from Tune's results and the trials' MLflow runs.

One row per dataset: the winning trial by the dataset's ranking metric (its last reported
value), the protocol's other metrics, the searched parameters, the checkpoint URI and the
MLflow run. A dataset all of whose trials failed gets a row with ``status: failed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.definition.sweep_config import KNOWN_METRICS, SweepConfig
from orchestration.definition.trial_names import DATASET_KEY, trial_label, trial_params


def build_leaderboard(
    sweep: SweepConfig, results: Any, *, tracker: Any, run_of: Mapping[str, str]
) -> list[dict[str, Any]]:
    """The rows, from Tune's ``results``; ``run_of``: each trial's MLflow run id, by trial id
    (a trial that never opened a run is missing)."""
    by_dataset: dict[str, list[Any]] = {d.name: [] for d in sweep.datasets}
    for result in results:
        config = result.config or {}
        if config.get(DATASET_KEY) in by_dataset:
            by_dataset[config[DATASET_KEY]].append(result)
    rows = []
    for dataset in sweep.datasets:
        trials = by_dataset[dataset.name]
        metric = dataset.ranking_metric
        usable = [r for r in trials if r.error is None and _finite((r.metrics or {}).get(metric))]
        common = {
            "dataset": dataset.name,
            "format": dataset.format,
            "metric": metric,
            "trials": len(trials),
            "failed": sum(r.error is not None for r in trials),
        }
        if not usable:
            rows.append(leaderboard_row(**common, winner=None))
            continue
        best = max(usable, key=lambda r: r.metrics[metric])
        params = trial_params(best.config)
        trial_id = Path(best.path).name
        run_id = run_of.get(trial_id)
        # Train-in-Tune: the last checkpoint's path arrives with the metrics (Ray's
        # TuneReportCallback); a trial that trained in its own process has a Tune checkpoint.
        checkpoint = best.metrics.get("checkpoint_path")
        if not checkpoint and best.checkpoint is not None:
            checkpoint = best.checkpoint.path
        if checkpoint and sweep.storage.is_s3 and not checkpoint.startswith("s3://"):
            checkpoint = f"s3://{checkpoint}"
        winner = Winner(best.metrics, params, run_id, _run_url(tracker, run_id), checkpoint)
        row = leaderboard_row(**common, winner=winner)
        row.update(
            trial_id=trial_id,
            trial=trial_label(dataset.name, params),
            epochs=int(best.metrics.get("epoch", 0)),
        )
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Winner:
    """The best trial of a dataset, wherever it was read from (Tune's results or MLflow)."""

    metrics: Mapping[str, Any]
    params: dict[str, Any]
    run_id: str | None
    run_url: str | None
    checkpoint: str | None


def leaderboard_row(
    *, dataset: str, format: str, metric: str, trials: int, failed: int, winner: Winner | None
) -> dict[str, Any]:
    """One leaderboard row: ``status`` ``ok`` with the winner's ranking value, the protocol's
    (finite) metrics, params, run and checkpoint, or ``failed`` when no trial scored."""
    row: dict[str, Any] = {
        "dataset": dataset,
        "format": format,
        "metric": metric,
        "trials": trials,
        "failed": failed,
    }
    if winner is None:
        return {**row, "status": "failed"}
    return {
        **row,
        "status": "ok",
        "value": float(winner.metrics[metric]),
        "metrics": {
            name: float(winner.metrics[name])
            for name in KNOWN_METRICS[format]
            if _finite(winner.metrics.get(name))
        },
        "params": winner.params,
        "run_id": winner.run_id,
        "run_url": winner.run_url,
        "checkpoint": winner.checkpoint,
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _run_url(tracker: Any, run_id: str | None) -> str | None:
    table = tracker.runs_table_url(None)
    if table is None or run_id is None:
        return None
    return f"{table}/{run_id}"


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as a fixed-width table."""
    header = ("dataset", "metric", "value", "best trial", "epochs", "trials", "failed", "run")
    lines = [header]
    for row in rows:
        if row["status"] != "ok":
            lines.append(
                (
                    row["dataset"],
                    row["metric"],
                    "-",
                    "ALL FAILED",
                    "-",
                    str(row["trials"]),
                    str(row["failed"]),
                    "-",
                )
            )
            continue
        lines.append(
            (
                row["dataset"],
                row["metric"],
                f"{row['value']:.4f}",
                row["trial"],
                str(row["epochs"]),
                str(row["trials"]),
                str(row["failed"]),
                row["run_id"] or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "leaderboard (best trial per dataset):\n" + "\n".join(text)
