"""Where a sweep's things go (output folder, tracking store, Ray storage, Ray address),
with defaults that run anywhere, and the plan printed before it starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestration.common.redaction import redact
from orchestration.definition.sweep_config import SweepConfig


@dataclass(frozen=True)
class Locations:
    output_dir: Path
    tracking_uri: str
    experiment: str
    storage_root: str
    storage_endpoint: str | None
    ray_address: str | None


def resolve_locations(sweep: SweepConfig) -> Locations:
    """Defaults that run anywhere: SQLite MLflow, local folders, a local Ray."""
    from orchestration.running.storage import s3_endpoint

    output_dir = sweep.resolved_output_dir.resolve()
    tracking_uri = (
        sweep.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{output_dir / 'mlflow.db'}"
    )
    storage_root = sweep.storage.path or str(output_dir / "ray")
    return Locations(
        output_dir=output_dir,
        tracking_uri=tracking_uri,
        experiment=sweep.tracking.experiment or sweep.name,
        storage_root=storage_root.rstrip("/"),
        storage_endpoint=s3_endpoint(sweep.storage.endpoint_url),
        ray_address=sweep.ray.address or os.environ.get("RAY_ADDRESS"),
    )


def format_plan(sweep: SweepConfig, scans: dict[str, str], where: Locations) -> str:
    from orchestration.definition.search_space import describe_space, trials_per_dataset

    per_dataset = trials_per_dataset(sweep)
    res = sweep.resources
    lines = [f"sweep {sweep.name}: {per_dataset * len(sweep.datasets)} trials", "datasets:"]
    for dataset in sweep.datasets:
        lines.append(
            f"  {dataset.name} ({dataset.format}, ranked by {dataset.ranking_metric}): "
            f"{per_dataset} trials; {scans[dataset.name]}"
        )
    searched = sweep.search_space or sweep.variants
    lines.append("search space:" if searched else "search space: (none)")
    for key, text in describe_space(sweep).items():
        lines.append(f"  {key}: {text}")
    lines += [
        f"search: {sweep.search.algorithm}, {sweep.search.num_samples} sample(s) per grid "
        f"point, scheduler {sweep.search.scheduler.type}",
        f"resources per trial: {res.workers_per_trial} worker(s) x ({res.cpus_per_worker:g} CPU"
        f", {res.gpus_per_worker:g} GPU), "
        + (
            "trained in the trial's own process"
            if res.runner == "trial"
            else "a Ray Train worker group"
        ),
        f"max concurrent trials: {sweep.search.max_concurrent_trials or 'from the cluster'}",
        f"storage: {redact(where.storage_root)}"
        + (f" (endpoint {where.storage_endpoint})" if where.storage_endpoint else ""),
        f"tracking: {redact(where.tracking_uri)} (experiment {where.experiment!r})",
        f"ray: {redact(where.ray_address) or 'a local Ray started for the sweep'}",
        f"output: {where.output_dir}",
    ]
    return "\n".join(lines)
