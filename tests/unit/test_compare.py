"""``python -m orchestration.compare``: the best trial per dataset from MLflow alone.

The runs are written with MLflow's own client into a real SQLite tracking store, tagged the
way a sweep tags them; the comparison against a finished sweep on a real ``mlflow server`` is
in ``tests/integration/test_sweep.py``.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.results.compare import main
from orchestration.tracking.tags import (
    TAG_CHECKPOINT,
    TAG_DATASET,
    TAG_FORMAT,
    TAG_KIND,
    TAG_METRIC,
    TAG_PARENT,
    TAG_SWEEP_ID,
)

REPO = Path(__file__).resolve().parents[2]
SIGMA = "model.center_prior.sigma_init"

# (dataset, format, metric, sigma, metrics, status)
TRIALS = [
    ("shapes", "coco", "bbox_mAP", 1.0, {"bbox_mAP": 0.30, "bbox_mAP_50": 0.55}, "FINISHED"),
    ("shapes", "coco", "bbox_mAP", 1.5, {"bbox_mAP": 0.42, "bbox_mAP_50": 0.61}, "FINISHED"),
    ("shapes", "coco", "bbox_mAP", 1.5, {"bbox_mAP": 0.36, "bbox_mAP_50": 0.58}, "KILLED"),
    ("shapes", "coco", "bbox_mAP", 2.0, {}, "FAILED"),
    ("faces", "widerface", "AP_hard", 1.0, {"AP_easy": 0.5, "AP_hard": 0.10}, "FINISHED"),
    ("faces", "widerface", "AP_hard", 1.5, {"AP_easy": 0.6, "AP_hard": 0.05}, "FINISHED"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("cmp")
    parent = client.create_run(experiment, tags={TAG_KIND: "sweep", TAG_SWEEP_ID: "cmp-1"})
    run_ids = []
    for dataset, format_, metric, sigma, metrics, status in TRIALS:
        run = client.create_run(
            experiment,
            tags={
                TAG_KIND: "trial",
                TAG_SWEEP_ID: "cmp-1",
                TAG_DATASET: dataset,
                TAG_FORMAT: format_,
                TAG_METRIC: metric,
                TAG_PARENT: parent.info.run_id,
                TAG_CHECKPOINT: f"s3://bucket/{dataset}/{sigma}",
            },
        )
        client.log_param(run.info.run_id, f"search.{SIGMA}", sigma)
        client.log_param(run.info.run_id, "dataset", dataset)
        for name, value in metrics.items():
            client.log_metric(run.info.run_id, name, value * 0.5, step=10)  # an earlier epoch
            client.log_metric(run.info.run_id, name, value, step=20)
        client.set_terminated(run.info.run_id, status)
        run_ids.append(run.info.run_id)
    return {"uri": uri, "run_ids": run_ids}


def compare(store, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["cmp", "--tracking-uri", store["uri"], *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_best_trial_of_each_dataset_with_its_protocol_metrics(store, capsys):
    code, out, _ = compare(store, capsys, "--format", "json")
    assert code == 0
    shapes, faces = json.loads(out)
    assert shapes["dataset"] == "shapes" and shapes["metric"] == "bbox_mAP"
    assert shapes["value"] == pytest.approx(0.42)  # the last value, not the earlier epoch's
    assert shapes["metrics"] == pytest.approx({"bbox_mAP": 0.42, "bbox_mAP_50": 0.61})
    assert shapes["run_id"] == store["run_ids"][1]
    assert shapes["params"] == {SIGMA: "1.5"}
    assert shapes["checkpoint"] == "s3://bucket/shapes/1.5"
    assert (shapes["trials"], shapes["failed"]) == (4, 1)
    assert faces["metric"] == "AP_hard" and faces["value"] == pytest.approx(0.10)
    assert faces["run_id"] == store["run_ids"][4]
    assert faces["metrics"] == pytest.approx({"AP_easy": 0.5, "AP_hard": 0.10})


def test_rank_by_another_metric(store, capsys):
    code, out, _ = compare(store, capsys, "--format", "json", "--metric", "AP_easy", "--sweep",
                           "cmp-1")  # fmt: skip
    assert code == 2  # shapes (COCO) reports no AP_easy
    code, out, err = compare(store, capsys, "--metric", "bbox_mAP_75")
    assert code == 2 and "bbox_mAP_50" in err and "bbox_mAP_75" in err


def test_by_parameter_gives_mean_and_best_per_value(store, capsys):
    code, out, _ = compare(store, capsys, "--by", SIGMA, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    table = {(r["dataset"], r[SIGMA]): r for r in rows}
    assert set(table) == {("shapes", "1.0"), ("shapes", "1.5"), ("faces", "1.0"), ("faces", "1.5")}
    assert table["shapes", "1.5"]["trials"] == "2"
    assert float(table["shapes", "1.5"]["mean"]) == pytest.approx(0.39)
    assert float(table["shapes", "1.5"]["best"]) == pytest.approx(0.42)
    assert float(table["faces", "1.0"]["mean"]) == pytest.approx(0.10)


@pytest.mark.parametrize("fmt", ["table", "md", "csv"])
def test_text_formats_carry_every_dataset(store, capsys, fmt):
    code, out, _ = compare(store, capsys, "--format", fmt)
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == (3 if fmt == "csv" else 4)  # header (+ rule) + two datasets
    assert "0.4200" in out and "0.1000" in out and SIGMA in out


def test_a_sweeps_comparison_reads_that_sweeps_runs_only(tmp_path, monkeypatch):
    """An experiment of nightly sweeps holds thousands of trial runs: ``--sweep`` (and the
    sweep's own compare.md) must not read every one of them."""
    from mlflow.tracking import MlflowClient

    from orchestration.results.compare import load_trials

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("nightly")
    for sweep_id, trials in (("night-1", 3), ("night-2", 12)):
        for _ in range(trials):
            tags = {TAG_KIND: "trial", TAG_SWEEP_ID: sweep_id, TAG_DATASET: "shapes"}
            client.create_run(experiment, tags=tags)
    read: list[int] = []
    search_runs = client.search_runs

    def counted(*args, **kwargs):
        page = search_runs(*args, **kwargs)
        read.append(len(page))
        return page

    monkeypatch.setattr(client, "search_runs", counted)
    _, summaries = load_trials(client, "nightly", sweep_id="night-1")
    assert [len(s.trials) for s in summaries] == [3]
    assert sum(read) == 3  # not the 15 trial runs of the experiment


def test_names_that_do_not_exist_exit_2_listing_what_does(store, capsys):
    code, _, err = compare(store, capsys, "--by", "train.lr")
    assert code == 2 and SIGMA in err
    code, _, err = compare(store, capsys, "--sweep", "nope")
    assert code == 2 and "cmp-1" in err
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.compare", "nope", "--tracking-uri", store["uri"]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "experiment 'nope' not found" in result.stderr and "cmp" in result.stderr


# (variant, seed, bbox_mAP, AP/ring, AP/disc, AP/square)
ABLATION = [
    ("full", 0, 0.60, 0.50, 0.70, 0.60),
    ("full", 1, 0.64, 0.56, 0.72, 0.64),
    ("fixed_prior", 0, 0.50, 0.30, 0.66, 0.54),
    ("fixed_prior", 1, 0.56, 0.40, 0.70, 0.58),
]


@pytest.fixture(scope="module")
def ablation_store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('ablation') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("abl")
    for variant, seed, ap, ring, disc, square in ABLATION:
        run = client.create_run(
            experiment,
            tags={TAG_KIND: "trial", TAG_SWEEP_ID: "abl-1", TAG_DATASET: "shapes",
                  TAG_FORMAT: "coco", TAG_METRIC: "bbox_mAP"},
        )  # fmt: skip
        client.log_param(run.info.run_id, "search.variant", variant)
        client.log_param(run.info.run_id, "search.seed", seed)
        metrics = {"bbox_mAP": ap, "AP/ring": ring, "AP/disc": disc, "AP/square": square}
        for name, value in metrics.items():
            client.log_metric(run.info.run_id, name, value, step=5)
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def test_by_variant_gives_the_spread_over_seeds_and_the_class_split(ablation_store, capsys):
    code = main(["abl", "--tracking-uri", ablation_store, "--by", "variant", "--classes",
                 "ring", "--format", "json"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    rows = {r["variant"]: r for r in json.loads(out)}
    assert list(rows) == ["fixed_prior", "full"]
    full = rows["full"]
    assert (full["trials"], full["mean"], full["min"], full["best"]) == pytest.approx(
        (2, 0.62, 0.60, 0.64)
    )
    assert full["sd"] == pytest.approx(0.02 * 2**0.5)  # sample sd of 0.60 and 0.64
    # Named: ring alone; others: the mean of disc and square per trial, then over seeds.
    assert full["classes"]["named_mean"] == pytest.approx(0.53)
    assert full["classes"]["others_mean"] == pytest.approx((0.65 + 0.68) / 2)
    assert rows["fixed_prior"]["classes"]["named_mean"] == pytest.approx(0.35)
    assert rows["fixed_prior"]["classes"]["named_sd"] == pytest.approx(0.05 * 2**0.5)

    code = main(["abl", "--tracking-uri", ablation_store, "--by", "variant", "--classes",
                 "ring,bicycle", "--format", "csv"])  # fmt: skip
    out, _ = capsys.readouterr()
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO(out))}
    assert table["full"]["mean"] == "0.6200" and table["full"]["named AP"] == "0.5300"
    assert table["fixed_prior"]["other AP"] == "0.6200"  # (0.60 + 0.64) / 2


def test_a_class_split_naming_an_unknown_class_lists_the_classes(ablation_store, capsys):
    code = main(["abl", "--tracking-uri", ablation_store, "--by", "variant", "--classes", "star"])
    _, err = capsys.readouterr()
    assert code == 2 and "no AP for any of star" in err and "disc, ring, square" in err
    code = main(["abl", "--tracking-uri", ablation_store, "--classes", "ring"])
    _, err = capsys.readouterr()
    assert code == 2 and "--classes goes with --by" in err


@pytest.mark.parametrize("parts", [2, 4, 7])
def test_searching_in_parts_reads_every_run_once(store, parts):
    """What ``compare`` does against a tracking server: the runs' start times split into
    ranges searched at once; together they hold each run exactly once."""
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.run_search import search_runs_in_parts

    client = MlflowClient(store["uri"])
    experiment_id = client.get_experiment_by_name("cmp").experiment_id
    trials = f"tags.`{TAG_KIND}` = 'trial'"
    found = [r.info.run_id for r in search_runs_in_parts(client, experiment_id, trials, parts)]
    assert sorted(found) == sorted(store["run_ids"])
    one = f"{trials} and tags.`{TAG_DATASET}` = 'faces' and attributes.status = 'FINISHED'"
    assert len(search_runs_in_parts(client, experiment_id, one, parts)) == 2
    none = f"{trials} and tags.`{TAG_DATASET}` = 'nowhere'"
    assert search_runs_in_parts(client, experiment_id, none, parts) == []
