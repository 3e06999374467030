"""The model registry (orchestration.tracking.registry) on a real SQLite MLflow store with local
artifacts: versions and the ``best`` alias over three sweeps, the second one worse; loading a
registered model predicts exactly what its checkpoint predicts. The registration at the end of
a real sweep on an ``mlflow server`` with S3 artifacts is in tests/integration/test_sweep.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import pytest
import torch
from PIL import Image

from autoassign.config import ExperimentConfig
from autoassign.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint
from autoassign.model import build_detector
from autoassign.predict import Predictor
from orchestration.running.storage import Storage
from orchestration.tracking.mlflow_model import SIGNATURE
from orchestration.tracking.registry import (
    BEST_ALIAS,
    TAG_COMPARISON,
    load_detector,
    register_best,
    resolve_version,
)
from tests.unit.test_engine import tiny_config


@pytest.fixture
def world(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    data = tiny_config(tmp_path / "data", tmp_path / "out").model_dump(mode="json")
    data["model"]["input"] = {"min_size": 256, "max_size": 256}  # P7 needs more than 1x1 for GN
    # An untrained head scores about 0.01: keep every candidate, so predictions are compared.
    data["model"]["inference"] = {"score_threshold": 0.0, "max_detections": 50}
    config = ExperimentConfig.model_validate(data)
    torch.manual_seed(0)
    model = build_detector(config.model)
    checkpoints = {}
    for name in ("sweep1", "sweep2", "sweep3"):
        folder = tmp_path / "ckpt" / name
        for parameter in model.parameters():  # a different model per sweep
            parameter.data.add_(0.01 * torch.randn_like(parameter))
        state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
        save_checkpoint({**state, "epoch": 1, "iteration": 10}, folder / CHECKPOINT_FILE)
        checkpoints[name] = folder
    image = tmp_path / "scene.png"
    pixels = torch.randint(0, 255, (180, 240, 3), generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(image)
    return {"uri": uri, "client": client, "experiment": experiment, "ckpt": checkpoints,
            "image": image}  # fmt: skip


def finish_sweep(world, sweep: str, value: float):
    client = world["client"]
    run = client.create_run(world["experiment"])
    row = {"status": "ok", "dataset": "shapes", "metric": "bbox_mAP", "value": value,
           "run_id": run.info.run_id, "checkpoint": str(world["ckpt"][sweep])}  # fmt: skip
    (registration,) = register_best(client, [row], storage=Storage(root="."), sweep_id=sweep)
    return registration


def test_best_moves_only_to_a_better_version(world):
    client = world["client"]
    first = finish_sweep(world, "sweep1", 0.40)
    worse = finish_sweep(world, "sweep2", 0.30)
    better = finish_sweep(world, "sweep3", 0.45)
    assert [r.version for r in (first, worse, better)] == ["1", "2", "3"]
    assert [r.became_best for r in (first, worse, better)] == [True, False, True]
    assert str(client.get_model_version_by_alias("autoassign-shapes", BEST_ALIAS).version) == "3"
    tag = client.get_model_version("autoassign-shapes", "2").tags[TAG_COMPARISON]
    assert tag == "bbox_mAP 0.3000 <= 0.4000 of version 1, which stays best"
    assert better.comparison == "bbox_mAP 0.4500 > 0.4000 of version 1: now best"


def test_a_worse_sweep_leaves_best_on_the_better_version(world):
    client = world["client"]
    finish_sweep(world, "sweep1", 0.40)
    finish_sweep(world, "sweep2", 0.30)
    assert str(client.get_model_version_by_alias("autoassign-shapes", BEST_ALIAS).version) == "1"
    assert str(resolve_version(client, "models:/autoassign-shapes/2").version) == "2"
    assert str(resolve_version(client, "autoassign-shapes").version) == "2"  # the latest


def test_a_loaded_model_predicts_what_its_checkpoint_predicts(world):
    finish_sweep(world, "sweep1", 0.40)
    finish_sweep(world, "sweep2", 0.30)
    loaded = load_detector("autoassign-shapes@best", tracking_uri=world["uri"], device="cpu")
    direct = Predictor(world["ckpt"]["sweep1"], device="cpu")
    other = Predictor(world["ckpt"]["sweep2"], device="cpu")
    got, want = loaded(world["image"]), direct(world["image"])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[key], want[key]), key
    assert not torch.equal(loaded.model.head.cls_logits.weight, other.model.head.cls_logits.weight)


def test_loading_a_model_leaves_no_download_behind(world, tmp_path, monkeypatch):
    finish_sweep(world, "sweep1", 0.40)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for _ in range(2):
        load_detector("autoassign-shapes@best", tracking_uri=world["uri"], device="cpu")
    assert list(scratch.iterdir()) == []


def test_cli_load_and_unknown_models(world, tmp_path, capsys):
    from orchestration.tracking import registry

    finish_sweep(world, "sweep1", 0.40)
    cli = ["--tracking-uri", world["uri"]]
    assert (
        registry.main([*cli, "load", "autoassign-shapes@best", "--out", str(tmp_path / "m")]) == 0
    )
    assert (tmp_path / "m" / "model" / "artifacts" / CHECKPOINT_FILE).is_file()
    assert (tmp_path / "m" / "model" / "MLmodel").is_file()
    assert "2 classes" in capsys.readouterr().out
    assert registry.main([*cli, "load", "autoassign-nothing@best"]) == 2
    assert "registered models: autoassign-shapes" in capsys.readouterr().err


def test_a_version_is_an_mlflow_model_with_a_signature(world, monkeypatch):
    import mlflow.pyfunc
    import numpy as np

    finish_sweep(world, "sweep1", 0.40)
    # The environment, not mlflow.set_*_uri: those export MLFLOW_*_URI for good, and every
    # later subprocess of the session (the integration sweeps) would use this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", world["uri"])
    model = mlflow.pyfunc.load_model("models:/autoassign-shapes@best")
    assert model.metadata.signature == SIGNATURE
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, -1, 3)
    pixels = np.asarray(Image.open(world["image"]).convert("RGB"))
    table = model.predict(pixels)
    direct = Predictor(world["ckpt"]["sweep1"], device="cpu")
    want = direct(world["image"])
    assert list(table.columns) == ["x1", "y1", "x2", "y2", "score", "label", "class_name"]
    assert len(table) == len(want["scores"]) > 0
    np.testing.assert_allclose(table[["x1", "y1", "x2", "y2"]].to_numpy(), want["boxes"].numpy())
    np.testing.assert_allclose(table["score"].to_numpy(), want["scores"].numpy())
    assert table["class_name"].tolist() == [direct.class_names[i] for i in want["labels"].tolist()]
    cut = float(want["scores"].median())
    high = model.predict(pixels, params={"score_threshold": cut})
    assert len(high) == int((want["scores"] >= cut).sum()) < len(table)
    with pytest.raises(Exception, match="shape|Shape"):
        model.predict(pixels[..., :1])  # one channel: the signature refuses it


def test_a_saved_model_is_code_not_a_pickle_and_saving_warns_of_nothing(world, tmp_path):
    """MLflow warns when a model is a pickled Python object (loading it runs arbitrary code)
    and when predict has no type hints; the model is models-from-code with a typed predict."""
    import logging
    import warnings

    from orchestration.tracking.mlflow_model import save_detector_model

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            folder = save_detector_model(world["ckpt"]["sweep1"], tmp_path / "model")
    finally:
        mlflow_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
    assert not list(folder.rglob("*.pkl"))
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (folder / "MLmodel").read_text()


def test_autoassign_predict_takes_a_registry_uri(world, tmp_path, monkeypatch, capsys):
    from autoassign import predict

    finish_sweep(world, "sweep1", 0.40)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["uri"])
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOASSIGN_CACHE_DIR", str(cache))

    def run(model: str, out: str) -> int:
        args = [model, str(world["image"]), "--out", str(tmp_path / out), "--device", "cpu"]
        return predict.main(args)

    assert run("models:/autoassign-shapes@best", "a") == 0
    assert run(str(world["ckpt"]["sweep1"]), "b") == 0
    got = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert got == json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert got[0]["scores"]  # something was detected, so equality says something
    capsys.readouterr()

    # The version is downloaded once: the second run reads the cache, not the artifact store.
    assert len(list(cache.rglob("checkpoint.pt"))) == 1
    shutil.move(tmp_path / "art", tmp_path / "art-away")
    assert run("models:/autoassign-shapes@best", "again") == 0
    assert json.loads((tmp_path / "again" / "predictions.json").read_text()) == got
    shutil.move(tmp_path / "art-away", tmp_path / "art")
    # The alias is resolved on every run: a better version is fetched when it takes `best`.
    finish_sweep(world, "sweep2", 0.50)
    assert run("models:/autoassign-shapes@best", "better") == 0
    assert len(list(cache.rglob("checkpoint.pt"))) == 2
    assert json.loads((tmp_path / "better" / "predictions.json").read_text()) != got

    # Errors: one line on stderr, exit 1 (predict.main is what `python -m` runs).
    assert run("models:/autoassign-nothing@best", "c") == 1
    assert "registered models: autoassign-shapes" in capsys.readouterr().err
    assert run("gs://bucket/checkpoint.pt", "d") == 1
    error = capsys.readouterr().err
    assert "no checkpoint resolver for the scheme 'gs' (resolvers: models:)" in error
