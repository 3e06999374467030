"""The sweep's parent MLflow run: its tags, its parameters and artifacts (the config,
redacted), the runs table's columns, and how to open the MLflow UI on it."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from orchestration.common.redaction import redact, redact_data
from orchestration.definition.sweep_config import SweepConfig
from orchestration.running.locations import Locations


def parent_tags(sweep: SweepConfig, where: Locations, config_path: Path) -> dict[str, str]:

    tags = {
        "autoassign.config_file": str(config_path),
        "autoassign.storage": redact(where.storage_root) or "",
        "autoassign.datasets": ",".join(d.name for d in sweep.datasets),
        "python": platform.python_version(),
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


VIEW_METRICS = {
    "coco": ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"),
    "objects365": ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"),
    "voc": ("mAP",),
    "widerface": ("AP_easy", "AP_medium", "AP_hard"),
}


def runs_view_metrics(sweep: SweepConfig) -> list[str]:
    """Each dataset's ranking metric and its protocol's headline metrics, once each."""
    metrics: list[str] = []
    for dataset in sweep.datasets:
        metrics += [dataset.ranking_metric, *VIEW_METRICS[dataset.format]]
    return list(dict.fromkeys(metrics))


def log_parent(tracker: Any, run_id: str, sweep: SweepConfig, config_path: Path) -> None:
    import tempfile

    from orchestration.definition.search_space import describe_space, trials_per_dataset
    from orchestration.tracking.tracker import DatasetInput

    params = {f"search_space.{k}": v for k, v in describe_space(sweep).items()}
    params.update({f"variants.{name}": json.dumps(v) for name, v in sweep.variants.items()})
    params.update(
        {
            "search.algorithm": sweep.search.algorithm,
            "search.num_samples": sweep.search.num_samples,
            "search.scheduler": sweep.search.scheduler.type,
            "trials_per_dataset": trials_per_dataset(sweep),
            "resources.workers_per_trial": sweep.resources.workers_per_trial,
        }
    )
    params.update({f"versions.{name}": version for name, version in package_versions().items()})
    tracker.log_params(run_id, params)
    # The datasets exist in MLflow before the first trials link them: trials starting
    # together would otherwise race to create each one (a unique-key error and a retry).
    for dataset in sweep.datasets:
        tracker.log_dataset(run_id, DatasetInput.of(dataset))
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "sweep_resolved.yaml"
        resolved.write_text(redacted_yaml(sweep.model_dump(mode="json")), encoding="utf-8")
        tracker.log_artifact(run_id, resolved)
        if config_path.is_file():
            tracker.log_artifact(run_id, redacted_copy(config_path, Path(tmp) / "config"))


def redacted_yaml(data: Any) -> str:
    """``data`` as YAML with its URIs' credentials and secret-named values hidden."""
    import yaml

    return yaml.safe_dump(redact_data(data), sort_keys=False)


def redacted_copy(config_path: Path, folder: Path) -> Path:
    """The user's config file as it is, or, when it holds a secret, its redacted YAML
    (comments are lost then, a header says so), under the same name in ``folder``."""
    import yaml

    text = config_path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    copy = folder / config_path.name
    folder.mkdir(parents=True, exist_ok=True)
    if redact_data(data) == data:
        copy.write_text(text, encoding="utf-8")
    else:
        header = "# secrets (URI credentials, query strings, secret-named values) removed\n"
        copy.write_text(header + redacted_yaml(data), encoding="utf-8")
    return copy


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("autoassign-ray", "torch", "torchvision", "ray", "mlflow", "pycocotools"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ui_hint(where: Locations, tracker: Any) -> str:
    url = tracker.runs_table_url("http://127.0.0.1:5000", with_view=True)
    store = redact(where.tracking_uri)
    return f"run `mlflow ui --backend-store-uri {store} --port 5000`, then open {url}"
