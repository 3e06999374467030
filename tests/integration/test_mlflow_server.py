"""The tests' tracking server serves as the compose stack's does (its ``MLFLOW_SERVER_*`` and
``MLFLOW_UVICORN_OPTS`` settings, read from docker-compose.yml): here, without uvicorn's
access log, a line per request that cost a tenth of the server's CPU at 1,000 trials."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.integration.compose_mlflow import compose_mlflow_settings


def test_the_server_answers_requests_without_an_access_line_each(mlflow_server):
    assert compose_mlflow_settings()["MLFLOW_UVICORN_OPTS"] == "--no-access-log"
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.create_experiment("no-access-log")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    log = mlflow_server.log.read_text(errors="replace")
    assert "Application startup complete" in log  # the server's own lines are there
    assert "/api/2.0/mlflow/runs/create" not in log
    assert "/api/2.0/mlflow/runs/log-metric" not in log
