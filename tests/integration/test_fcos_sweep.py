"""``model.kind: fcos`` through a real sweep: Ray (a 2-worker gloo DDP trial), the MLflow
server with artifacts on S3, the registry, and the registered model predicting.

One trial: a sweep whose only variant is ``fcos: {model.kind: fcos}``, so that its trial is
its dataset's best and is registered (what configs/baseline.yaml does, at one point of its
grid; the comparison table of a sweep with both models is tested on real runs in
tests/unit/test_fcos_kind.py).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.integration.conftest import synthetic, tiny_sweep
from tests.integration.test_fault_tolerance import epochs_logged, trial_runs

pytestmark = pytest.mark.integration

NAME = "it-fcos"
FCOS_LOSSES = ("loss_classification", "loss_bbox_regression", "loss_bbox_ctrness")


@pytest.fixture(scope="module")
def fcos_sweep(sweep_runner, mlflow_server, s3_server):
    folder = sweep_runner.folder
    config = tiny_sweep(
        NAME,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        datasets=[synthetic("fcos-shapes", "coco", folder, images=8, classes=2)],
        workers=2,
    )
    config["variants"] = {"fcos": {"model.kind": "fcos"}}
    path = sweep_runner.write(NAME, config)
    code, log = sweep_runner.run(path)
    return {"code": code, "log": log, "output": folder / NAME}


def test_an_fcos_trial_finishes_with_its_own_losses_in_mlflow(fcos_sweep, mlflow_server):
    assert fcos_sweep["code"] == 0, fcos_sweep["log"][-4000:]
    client = mlflow_server.client()
    (run,) = trial_runs(client, NAME)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.kind"] == "fcos"
    assert run.data.params["search.variant"] == "fcos"
    assert [v for _, v in epochs_logged(client, run.info.run_id)] == [1, 2]
    metrics = run.data.metrics
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    for name in FCOS_LOSSES:
        assert np.isfinite(metrics[f"train/{name}"]) and np.isfinite(metrics[f"epoch/train_{name}"])
    assert not any("loss_pos" in key for key in metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "final_metrics.json", "pr_curves.json"} <= artifacts
    assert not any(path.startswith("center_prior") for path in artifacts)
    # The terminal's epoch line names torchvision's three losses.
    line = re.compile(
        r"  epoch 2/2  loss [0-9.]+ \(classification [0-9.]+, bbox_regression [0-9.]+, "
        r"bbox_ctrness [0-9.]+\)  bbox_mAP [0-9.]+"
    )
    assert line.search(fcos_sweep["log"]), fcos_sweep["log"][-3000:]
    board = json.loads((fcos_sweep["output"] / "leaderboard.json").read_text())
    assert board[0]["run_id"] == run.info.run_id and board[0]["status"] == "ok"


def test_the_fcos_trial_is_registered_and_its_model_predicts(
    fcos_sweep, mlflow_server, tmp_path, monkeypatch
):
    import mlflow.pyfunc

    from autoassign.model.fcos import FCOSDetector
    from orchestration.tracking.registry import load_detector

    assert fcos_sweep["code"] == 0, fcos_sweep["log"][-4000:]
    client = mlflow_server.client()
    (run,) = trial_runs(client, NAME)
    version = client.get_model_version_by_alias("autoassign-fcos-shapes", "best")
    assert version.run_id == run.info.run_id
    assert "registry: autoassign-fcos-shapes version 1" in fcos_sweep["log"]

    predictor = load_detector(
        "autoassign-fcos-shapes@best", tracking_uri=mlflow_server.uri, device="cpu"
    )
    assert isinstance(predictor.model, FCOSDetector)
    assert predictor.config.model.kind == "fcos"
    pixels = torch.randint(0, 255, (100, 140, 3), generator=torch.Generator().manual_seed(2))
    image = pixels.to(torch.uint8).numpy()
    Image.fromarray(image).save(tmp_path / "scene.png")
    want = predictor(tmp_path / "scene.png")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server.uri)
    model = mlflow.pyfunc.load_model("models:/autoassign-fcos-shapes@best")
    table = model.predict(image, params={"score_threshold": 0.0})
    assert list(table.columns) == ["x1", "y1", "x2", "y2", "score", "label", "class_name"]
    assert len(table) == len(want["scores"])
    np.testing.assert_allclose(table["score"].to_numpy(), want["scores"].numpy())
    assert set(table["class_name"]) <= set(predictor.class_names)
