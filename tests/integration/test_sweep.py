"""A small sweep end to end on real services: Ray (2-worker gloo DDP trials), an MLflow
server with artifacts on S3, Ray checkpoints on S3.

Two synthetic datasets (COCO and WiderFace formats) x a learning-rate grid whose second value
(1e10) makes the loss non-finite: the sweep must finish the good trials, fail the bad ones
alone with the library's reason, and record all of it in MLflow.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from tests.integration.conftest import BUCKET, POSTGRES_BIN, SECRET_KEY, synthetic, tiny_sweep
from tests.integration.mlflow_ui import RunsTable, missing_browser
from tests.integration.test_fault_tolerance import epochs_logged, trial_runs, wait_until

pytestmark = pytest.mark.integration

GOOD_LR, BAD_LR = 0.01, 1.0e10
SHAPE_CLASSES = ("ring", "disc")  # of the synthetic shapes disc, ring, square


@pytest.fixture(scope="module")
def finished_sweep(sweep_runner, mlflow_server, s3_server):
    folder = sweep_runner.folder
    config = tiny_sweep(
        "it-main",
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[
            # Three shapes drawn, two of them the dataset's own classes in their own order:
            # the third's annotations are left out of training and evaluation.
            {
                **synthetic("shapes", "coco", folder, images=8, classes=3),
                "num_classes": None,
                "classes": list(SHAPE_CLASSES),
            },
            synthetic("faces", "widerface", folder, images=8),
        ],
        search_space={"train.lr": {"grid": [GOOD_LR, BAD_LR]}},
        workers=2,
        flush_every_s=None,  # the default: metrics sent every 10 s, the rest at the end
    )
    path = sweep_runner.write("it-main", config)
    code, log = sweep_runner.run(path)
    output = folder / "it-main"
    return {"code": code, "log": log, "output": output, "config": config}


def _runs(mlflow_server, experiment="it-main"):
    client = mlflow_server.client()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, client.search_runs([experiment_id], max_results=100)


def test_sweep_exits_zero_and_writes_leaderboard(finished_sweep):
    assert finished_sweep["code"] == 0, finished_sweep["log"][-4000:]
    assert "Traceback" not in finished_sweep["log"].split("leaderboard")[-1]
    board = json.loads((finished_sweep["output"] / "leaderboard.json").read_text())
    assert [row["dataset"] for row in board] == ["shapes", "faces"]
    for row in board:
        assert row["status"] == "ok"
        assert row["trials"] == 2 and row["failed"] == 1
        assert row["params"]["train.lr"] == GOOD_LR
        assert row["checkpoint"].startswith(f"s3://{BUCKET}/ray/")
        assert 0.0 <= row["value"] <= 1.0
    assert board[0]["metric"] == "bbox_mAP" and board[1]["metric"] == "AP_hard"
    assert "leaderboard (best trial per dataset)" in finished_sweep["log"]
    manifest = json.loads((finished_sweep["output"] / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["trials"]) == 4


TERMINAL_NOISE = (
    "PlacementGroupCleaner",
    "Checkpoint successfully created at",
    "Reporting training result",
    "core_worker.cc",
    "PreemptionWatcher",
    "Requesting resources",
    "Attempting to start training worker group",
    "world_rank=",
    "Setting up process group",
    "CloudPickle",
    "Add type hints",
    "Downloading artifacts",
    "Trial status:",
    "Configuration for experiment",
    "(RayTrainWorker pid=",
    "(TrainController pid=",
    "Traceback",
)
"""What Ray, Tune and MLflow printed on a sweep's terminal before issue 17 (hundreds of lines
a demo sweep): by default it goes to the sweep's log file."""
EPOCH_LINE = re.compile(r"^(?P<trial>\S+)  epoch (?P<epoch>\d+)/(?P<total>\d+)  loss ", re.M)


def test_the_terminal_shows_the_sweep_and_the_log_file_the_rest(finished_sweep):
    log = finished_sweep["log"]  # the sweep's stdout and stderr
    for noise in TERMINAL_NOISE:
        assert noise not in log, noise
    epochs: dict[str, list[int]] = {}
    for line in EPOCH_LINE.finditer(log):
        assert line["total"] == "2", line[0]
        epochs.setdefault(line["trial"], []).append(int(line["epoch"]))
    # Each epoch once, in order: the good trials' two, the bad ones' up to the epoch they
    # fail in (the step their loss goes non-finite depends on the data: the first or the
    # second epoch); the evaluated metric on each.
    failed = {
        trial: (int(epoch), reason)
        for trial, epoch, reason in re.findall(r"^(\S+)  FAILED in epoch (\d+): (.*)$", log, re.M)
    }
    assert sorted(failed) == ["faces·lr=1e+10", "shapes·lr=1e+10"], failed
    assert all("non-finite" in reason for _, reason in failed.values()), failed
    assert all(epoch in (1, 2) for epoch, _ in failed.values()), failed
    assert epochs == {
        "shapes·lr=0.01": [1, 2],
        "faces·lr=0.01": [1, 2],
        **{
            trial: list(range(1, epoch))
            for trial, (epoch, _) in failed.items()
            if epoch > 1  # a trial failing in its first epoch shows no epoch line
        },
    }, epochs
    assert re.search(r"^shapes·lr=0.01  epoch 2/2  loss .* bbox_mAP \d\.\d{4}", log, re.M)
    finished = re.findall(r"^(\S+)  finished: 2 epochs in .*\(\d/4 trials ended\)$", log, re.M)
    assert sorted(finished) == ["faces·lr=0.01", "shapes·lr=0.01"]
    assert "leaderboard (best trial per dataset)" in log
    assert re.search(r"^registry: autoassign-shapes version \d+: ", log, re.M)
    # Nothing was lost: Ray's processes' lines are in the log file.
    file_text = (finished_sweep["output"] / "sweep.log").read_text()
    assert "Reporting training result" in file_text and "(RayTrainWorker pid=" in file_text
    assert "shapes·lr=0.01  epoch 2/2" in file_text  # and the terminal's lines, with times
    lines = log.splitlines()
    assert len(lines) < 60, f"{len(lines)} lines:\n{log}"


def test_parent_and_child_runs(finished_sweep, mlflow_server):
    client, runs = _runs(mlflow_server)
    parents = [r for r in runs if r.data.tags.get("autoassign.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("autoassign.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search_space.train.lr"] == f"grid [{GOOD_LR}, {BAD_LR}]"
    assert "versions.torch" in parent.data.params
    assert sorted(d.dataset.name for d in parent.inputs.dataset_inputs) == [
        "faces (widerface train)",
        "shapes (coco train)",
    ]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.json", "compare.md", "sweep_resolved.yaml", "it-main.yaml"} <= (
        parent_artifacts
    )
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/metric_vs_train.lr.png"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["autoassign.sweep_id"] == parent.data.tags["autoassign.sweep_id"]
        dataset = child.data.params["dataset"]
        assert child.data.tags["autoassign.dataset"] == dataset
        assert child.info.run_name.startswith(f"{dataset}·lr=")
        inputs = [d.dataset.name for d in child.inputs.dataset_inputs]
        assert inputs == [f"{dataset} ({'coco' if dataset == 'shapes' else 'widerface'} train)"]
        assert float(child.data.params["train.lr"]) in (GOOD_LR, BAD_LR)
        assert child.data.params["model.center_prior.sigma_init"] == "[1.0, 1.0]"


def test_good_trials_log_every_step_and_epoch_once(finished_sweep, mlflow_server, tmp_path_factory):
    client, runs = _runs(mlflow_server)
    good = [r for r in runs if r.data.params.get("train.lr") == str(GOOD_LR)]
    assert len(good) == 2
    for run in good:
        assert run.info.status == "FINISHED"
        run_id = run.info.run_id
        # Two epochs, each logged once at its last global step; every step logged once.
        epochs = [(m.step, m.value) for m in client.get_metric_history(run_id, "epoch")]
        per_epoch = epochs[0][0]
        assert epochs == [(per_epoch, 1.0), (2 * per_epoch, 2.0)]
        steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert steps == list(range(1, 2 * per_epoch + 1))
        metric = "bbox_mAP" if run.data.params["dataset"] == "shapes" else "AP_hard"
        history = client.get_metric_history(run_id, metric)
        assert [m.step for m in history] == [per_epoch, 2 * per_epoch]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {
            "config.yaml",
            "final_metrics.json",
            "per_class_ap.json",
            "center_prior.png",
            "center_prior.json",
            "pr_curves.png",
            "pr_curves.json",
            "validation_samples",
        } <= artifacts
        samples = client.list_artifacts(run_id, "validation_samples")
        assert 1 <= len(samples) <= 3
        _check_pr_curves(client, run_id, metric, history[-1].value, tmp_path_factory)
        assert run.data.tags["autoassign.checkpoint_uri"].startswith(f"s3://{BUCKET}/ray/")


def _check_pr_curves(client, run_id: str, metric: str, final_value: float, tmp_path_factory):
    """The curves a trial logged are the final evaluation's: COCO one per class with ground
    truth (101 points), WiderFace one per setting with AP_<setting> its AP."""
    folder = tmp_path_factory.mktemp("pr")
    curves = json.loads(
        Path(client.download_artifacts(run_id, "pr_curves.json", str(folder))).read_text()
    )
    if metric == "AP_hard":
        assert sorted(curves) == ["easy", "hard", "medium"]
        assert curves["hard"]["ap"] == pytest.approx(final_value)
    else:
        assert curves and all(len(c["recall"]) == 101 for c in curves.values())
    with PIL.Image.open(client.download_artifacts(run_id, "pr_curves.png", str(folder))) as png:
        assert png.format == "PNG" and png.size == (700, 600)


def test_nonfinite_trials_fail_alone_with_reason(finished_sweep, mlflow_server):
    _, runs = _runs(mlflow_server)
    bad = [r for r in runs if r.data.params.get("train.lr") == str(BAD_LR)]
    assert len(bad) == 2
    for run in bad:
        assert run.info.status == "FAILED"
        reason = run.data.tags["autoassign.failure_reason"]
        assert "non-finite" in reason and "iteration" in reason


def test_artifacts_and_checkpoints_are_on_s3(finished_sweep, s3_server):
    artifact_keys = s3_server.keys("mlflow/")
    assert any(key.endswith("center_prior.png") for key in artifact_keys)
    # The bucket is shared by the session's sweeps: only this sweep's prefix counts.
    checkpoint_keys = [k for k in s3_server.keys("ray/it-main-") if k.endswith("/checkpoint.pt")]
    per_trial: dict[str, int] = {}
    for key in checkpoint_keys:  # ray/<sweep>/train/<trial run>/<checkpoint>/checkpoint.pt
        trial_run = key.split("/")[3]
        per_trial[trial_run] = per_trial.get(trial_run, 0) + 1
    # Every trial reported a checkpoint after its first epoch; at most storage.num_to_keep
    # (2) are kept per trial.
    assert 2 <= len(per_trial) <= 4  # the two good trials at least
    assert all(1 <= count <= 2 for count in per_trial.values()), per_trial
    assert not any("/trials/" in key for key in checkpoint_keys)
    # MLflow records the results: Tune writes no result files of its own per trial.
    ray_keys = s3_server.keys("ray/it-main-")
    assert any(key.endswith(".json") for key in ray_keys)  # Tune's experiment state is there
    duplicates = ("progress.csv", "result.json", "params.json", "events.out.tfevents")
    assert not [key for key in ray_keys if any(d in key.rsplit("/", 1)[-1] for d in duplicates)]


def test_no_secret_in_runs_artifacts_or_logs(finished_sweep, mlflow_server, s3_server):
    assert SECRET_KEY not in finished_sweep["log"]
    client, runs = _runs(mlflow_server)
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(SECRET_KEY in str(value) for value in values)
    s3 = s3_server.client()
    for key in s3_server.keys("mlflow/"):
        if key.endswith((".yaml", ".json")):
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            assert SECRET_KEY not in body, key


def test_compare_from_mlflow_alone_agrees_with_the_leaderboard(finished_sweep, mlflow_server):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.compare",
            "it-main",
            "--format",
            "json",
            "--tracking-uri",
            mlflow_server.uri,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    compared = {row["dataset"]: row for row in json.loads(result.stdout)}
    board = json.loads((finished_sweep["output"] / "leaderboard.json").read_text())
    for row in board:
        same = compared[row["dataset"]]
        assert same["metric"] == row["metric"] and same["run_id"] == row["run_id"]
        assert same["value"] == pytest.approx(row["value"])
        assert (same["trials"], same["failed"]) == (2, 1)
        assert same["checkpoint"].startswith(f"s3://{BUCKET}/ray/")
        assert same["run_url"].endswith(f"/runs/{row['run_id']}")
    table = (finished_sweep["output"] / "compare.md").read_text()
    assert table.startswith("| dataset | metric | value |") and "| shapes |" in table


def test_best_trials_are_registered_and_load_from_the_registry(finished_sweep, mlflow_server):
    from orchestration.tracking.registry import load_detector

    client = mlflow_server.client()
    board = json.loads((finished_sweep["output"] / "leaderboard.json").read_text())
    for row in board:
        version = client.get_model_version_by_alias(f"autoassign-{row['dataset']}", "best")
        assert str(version.version) == "1" and version.run_id == row["run_id"]
        assert float(version.tags["autoassign.metric_value"]) == pytest.approx(row["value"])
        assert version.tags["autoassign.best_comparison"].endswith("first version, now best")
    assert "registry: autoassign-shapes version 1" in finished_sweep["log"]
    # The checkpoint travelled from Ray's S3 storage to the run's artifacts (S3 behind MLflow).
    predictor = load_detector(
        "autoassign-shapes@best", tracking_uri=mlflow_server.uri, device="cpu"
    )
    assert predictor.config.model.num_classes == 2
    assert predictor.config.train.lr == GOOD_LR
    # The dataset's own class list, in its order, is the model's; the third shape is no class.
    assert predictor.class_names == list(SHAPE_CLASSES)
    assert predictor.config.data.classes == list(SHAPE_CLASSES)
    run = client.get_run(board[0]["run_id"])
    assert {"AP/ring", "AP/disc"} <= set(run.data.metrics)
    assert not any(key.endswith("/square") for key in run.data.metrics)
    assert "annotations of unlisted classes (square " in finished_sweep["log"]


def test_the_stack_tracking_store_is_postgresql_and_holds_the_sweep(
    finished_sweep, mlflow_server, postgres
):
    """The compose stack's tracking configuration (PostgreSQL store, S3 artifacts behind the
    server): the sweep's runs, metrics, tags and registered models are rows in PostgreSQL."""
    if postgres is None:
        message = f"no PostgreSQL 15 under {POSTGRES_BIN}"
        if os.environ.get("AUTOASSIGN_REQUIRE_POSTGRES") == "1":  # set by .ci/run
            pytest.fail(message)
        pytest.skip(message)
    import psycopg

    assert mlflow_server.backend_store_uri == postgres.uri
    client, runs = _runs(mlflow_server)
    with psycopg.connect(postgres.uri) as db, db.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) "
            "WHERE experiments.name = 'it-main'"
        )
        assert cursor.fetchone()[0] == len(runs) == 5  # the parent and four trials
        good = next(r for r in runs if r.data.tags.get("autoassign.dataset") == "shapes"
                    and r.info.status == "FINISHED")  # fmt: skip
        cursor.execute(
            "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'train/loss'",
            (good.info.run_id,),
        )
        logged = len(client.get_metric_history(good.info.run_id, "train/loss"))
        assert cursor.fetchone()[0] == logged > 0
        cursor.execute("SELECT name FROM registered_models ORDER BY name")
        names = [row[0] for row in cursor.fetchall()]
        assert {"autoassign-faces", "autoassign-shapes"} <= set(names)
        cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                       ("autoassign-shapes",))  # fmt: skip
        assert cursor.fetchall() == [("best", 1)]
    # Artifacts are not in the database: they are objects under the compose file's prefix.
    assert mlflow_server.artifacts_destination == f"s3://{BUCKET}/mlflow"


def _browser_or_skip() -> None:
    reason = missing_browser()
    if reason is None:
        return
    if os.environ.get("AUTOASSIGN_REQUIRE_BROWSER") == "1":  # set by .ci/run
        pytest.fail(f"the MLflow UI test needs a browser: {reason}")
    pytest.skip(f"the MLflow UI test needs a browser: {reason}")


def _shows(cell: str, value: float) -> bool:
    """The UI rounds metrics: the cell equals ``value`` to the decimals it shows."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return abs(float(cell) - value) <= 0.5 * 10**-decimals + 1e-12


def test_the_mlflow_ui_shows_the_sweep_nested_with_its_columns(
    finished_sweep, mlflow_server, tmp_path
):
    _browser_or_skip()
    # The link the sweep printed opens its runs table in the view the sweep stored.
    url = re.findall(r"MLflow runs table: (\S+)", finished_sweep["log"])[-1]
    assert url.startswith(mlflow_server.uri) and "viewStateShareKey=autoassign-sweep" in url
    client, runs = _runs(mlflow_server)
    (parent,) = [r for r in runs if r.data.tags.get("autoassign.kind") == "sweep"]
    parent_id = parent.info.run_id
    children = {
        r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id
    }
    assert len(children) == 4

    with RunsTable() as table:
        table.open(url)
        top = [row.run_id for row in table.rows()]
        assert top == [parent_id]  # the trials are nested, collapsed until opened
        table.expand(parent_id)
        assert {"Run Name", "Dataset", "bbox_mAP", "AP_hard", "train.lr"} <= set(table.headers())
        rows = table.rows()
        table.screenshot(tmp_path / "runs_table.png")

    assert rows[0].run_id == parent_id and rows[0].depth == 0
    nested = rows[1:]
    assert {row.run_id for row in nested} == set(children)
    assert all(row.depth == 1 for row in nested)
    for row in nested:
        run = children[row.run_id]
        dataset = run.data.params["dataset"]
        assert row.cells["Dataset"].startswith(f"{dataset} (")  # e.g. "shapes (coco val)"
        assert row.cells["train.lr"] == run.data.params["train.lr"]
        metric = "bbox_mAP" if dataset == "shapes" else "AP_hard"
        if run.info.status == "FINISHED":
            assert metric in run.data.metrics
        if metric in run.data.metrics:
            assert _shows(row.cells[metric], run.data.metrics[metric]), (row.cells, metric)
        else:
            assert row.cells[metric] == "-"


def test_ctrl_c_records_the_sweep_as_interrupted_and_resume_finishes_it(
    sweep_runner, mlflow_server, s3_server
):
    """Left to itself, Ray Tune catches SIGINT and returns with the trials marked finished:
    the sweep must not then rank and register half-trained trials. (Last in the session: an
    interrupted sweep is the one thing here that may leave the shared cluster untidy.)"""
    folder = sweep_runner.folder
    name = "it-ctrl-c"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("ctrl-c-shapes", "coco", folder, images=8, classes=2)],
        epochs=6,  # seconds each: Ctrl-C after the first must land well before the last
    )
    path = sweep_runner.write(name, config)
    process = sweep_runner.start(path)
    client = mlflow_server.client()

    def one_epoch_logged():
        runs = [r for r in trial_runs(client, name) if r.info.status == "RUNNING"]
        return runs[0] if runs and epochs_logged(client, runs[0].info.run_id) else None

    try:
        running = wait_until(one_epoch_logged, timeout=400, what="a trial's first epoch")
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    log = path.with_suffix(".log").read_text()
    assert code == 130, log[-3000:]
    assert "interrupted; continue it with: python -m orchestration.sweep" in log
    assert f"python -m orchestration.sweep {path} --resume" in log
    assert "leaderboard (best trial per dataset)" not in log
    manifest = json.loads((folder / name / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert not (folder / name / "leaderboard.json").exists()
    experiment_id = client.get_experiment_by_name(name).experiment_id
    (parent,) = [
        r
        for r in client.search_runs([experiment_id], max_results=100)
        if r.data.tags.get("autoassign.kind") == "sweep"
    ]
    assert parent.info.status == "KILLED"

    code, log = sweep_runner.run(path, "--resume", "--verbose")
    assert code == 0, log[-4000:]
    # --verbose brings Ray's own lines back to the terminal (Tune's verbosity is part of the
    # state Tuner.restore reads: a resumed sweep keeps the first run's, without its table).
    resumed_part = log.split("\ninterrupted\n", 1)[-1]
    assert "(RayTrainWorker pid=" in resumed_part and "Reporting training result" in resumed_part
    (trial,) = trial_runs(client, name)
    assert trial.info.run_id == running.info.run_id and trial.info.status == "FINISHED"
    assert [v for _, v in epochs_logged(client, trial.info.run_id)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((folder / name / "manifest.json").read_text())["status"] == "finished"
