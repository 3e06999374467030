"""Two sweeps of the same config at the same time (each in its own output folder: one
driver per folder is the record's own guarantee): both finish, neither closes or resumes a
run of the other, and the registry's ``best`` alias ends on the better model whichever
registers last."""

from __future__ import annotations

import pytest

from tests.integration.conftest import synthetic, tiny_sweep

pytestmark = pytest.mark.integration


def test_two_sweeps_at_once_keep_to_their_own_runs_and_best_wins(
    sweep_runner, mlflow_server, s3_server
):
    folder = sweep_runner.folder
    name = "it-twins"
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("twin-shapes", "coco", folder, images=8, classes=2)],
        epochs=2,
    )
    path = sweep_runner.write(name, config)
    # The same file; the second learns at another rate, so one model is the better.
    first = sweep_runner.start(path, f"output_dir={folder / 'twin-a'}")
    second = sweep_runner.start(path, f"output_dir={folder / 'twin-b'}", "base.train.lr=0.02")
    try:
        codes = [first.wait(timeout=900), second.wait(timeout=900)]
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.kill()
    log = path.with_suffix(".log").read_text()
    assert codes == [0, 0], log[-6000:]

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2 and len(trials) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    sweep_of_parent = {p.info.run_id: p.data.tags["autoassign.sweep_id"] for p in parents}
    for trial in trials:  # each trial under its own sweep's parent, none crossed
        parent = trial.data.tags["mlflow.parentRunId"]
        assert trial.data.tags["autoassign.sweep_id"] == sweep_of_parent[parent]
    assert len(set(sweep_of_parent.values())) == 2

    values = {t.info.run_id: t.data.metrics["bbox_mAP"] for t in trials}
    best = client.get_model_version_by_alias("autoassign-twin-shapes", "best")
    assert best.run_id == max(values, key=values.get), (values, best.run_id)
    assert float(best.tags["autoassign.metric_value"]) == pytest.approx(max(values.values()))
