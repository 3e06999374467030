"""Registry identities (orchestration.tracking.registry) on a real SQLite MLflow store with real
checkpoint files: a version competes for ``best`` only with versions of the same data
(format, class names, evaluation split, ranking metric), whatever the dataset is called in
the sweep config. The synthetic demo's 6-class "coco" must not take ``best`` from a real
80-class COCO model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoassign.config import ExperimentConfig
from autoassign.data.synthetic.shapes import SHAPES
from autoassign.engine.checkpoint import CHECKPOINT_FILE, save_checkpoint
from autoassign.model import build_detector
from orchestration.running.storage import Storage
from orchestration.tracking.registry import (
    BEST_ALIAS,
    TAG_COMPARISON,
    TAG_IDENTITY,
    TAG_IDENTITY_KEY,
    TAG_METRIC,
    TAG_REFUSED,
    TAG_VALUE,
    register_best,
)
from tests.unit.test_engine import tiny_config

COCO_CLASSES = ["person", "bicycle", "car", "motorcycle", "airplane"] + [
    f"coco_{i}" for i in range(5, 80)
]
DEMO_CLASSES = list(SHAPES[:6])  # the synthetic demo's "coco"
REAL = "80 coco classes (person, bicycle, car, motorcycle, airplane, ...), split val2017"
DEMO = "6 coco classes (disc, ring, square, l_shape, diamond, ...), split val"


def write_checkpoint(
    folder: Path, classes: list[str], split: str, *, seed: int = 0, format: str = "coco"
) -> Path:
    """A checkpoint folder as a trial leaves it: a real detector for ``classes``, trained
    (here: drawn) on ``format`` data and evaluated on ``split``."""
    data = tiny_config(folder / "data", folder / "out").model_dump(mode="json")
    data["model"]["num_classes"] = len(classes)
    data["data"].update(format=format, val_split=split)
    config = ExperimentConfig.model_validate(data)
    torch.manual_seed(seed)
    state = {
        "model": build_detector(config.model).state_dict(),
        "config": config.model_dump(mode="json"),
        "class_names": classes,
        "epoch": 1,
        "iteration": 10,
    }
    save_checkpoint(state, folder / CHECKPOINT_FILE)
    return folder


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    return client, experiment


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "real": write_checkpoint(root / "real", COCO_CLASSES, "val2017", seed=0),
        "real_again": write_checkpoint(root / "real_again", COCO_CLASSES, "val2017", seed=1),
        "demo": write_checkpoint(root / "demo", DEMO_CLASSES, "val", seed=2),
    }


def row(store, dataset: str, checkpoint: Path, value: float) -> dict:
    client, experiment = store
    run = client.create_run(experiment)
    return {"status": "ok", "dataset": dataset, "metric": "bbox_mAP", "value": value,
            "run_id": run.info.run_id, "checkpoint": str(checkpoint)}  # fmt: skip


def register(store, *rows: dict) -> list:
    return register_best(store[0], list(rows), storage=Storage(root="."), sweep_id="s")


def best(client, name: str) -> str:
    return str(client.get_model_version_by_alias(name, BEST_ALIAS).version)


def test_the_demo_named_coco_does_not_take_best_from_a_real_coco_model(store, checkpoints, capsys):
    client = store[0]
    (real,) = register(store, row(store, "coco", checkpoints["real"], 0.40))
    demo = row(store, "coco", checkpoints["demo"], 0.431)
    shapes = row(store, "shapes", checkpoints["demo"], 0.431)
    # The refused row does not stop the sweep's other rows.
    (other,) = register(store, demo, shapes)

    assert (real.model, real.version, other.model) == ("autoassign-coco", "1", "autoassign-shapes")
    assert best(client, "autoassign-coco") == "1"
    assert [str(v.version) for v in client.search_model_versions("name = 'autoassign-coco'")] == [
        "1"
    ]
    message = (
        f"autoassign-coco holds models of {REAL}, ranked by bbox_mAP; this one is of {DEMO}, "
        "ranked by bbox_mAP: not registered (versions of different data never compete for "
        "best); give the dataset another name in the sweep config"
    )
    assert f"registry: {message}" in capsys.readouterr().err
    assert client.get_run(demo["run_id"]).data.tags[TAG_REFUSED] == message
    assert client.list_artifacts(demo["run_id"]) == []  # nothing logged for the refused row
    assert [a.path for a in client.list_artifacts(shapes["run_id"])] == ["model"]


def test_a_real_coco_model_is_refused_where_the_demo_came_first(store, checkpoints, capsys):
    client = store[0]
    register(store, row(store, "coco", checkpoints["demo"], 0.431))
    assert register(store, row(store, "coco", checkpoints["real"], 0.40)) == []
    assert best(client, "autoassign-coco") == "1"
    error = capsys.readouterr().err
    assert f"autoassign-coco holds models of {DEMO}, ranked by bbox_mAP; this one is of {REAL}" in (
        error
    )


def test_versions_of_the_same_data_compete_and_record_their_identity(store, checkpoints):
    client = store[0]
    first, better = register(
        store,
        row(store, "coco", checkpoints["real"], 0.40),
        row(store, "coco", checkpoints["real_again"], 0.45),
    )
    assert (first.became_best, better.became_best) == (True, True)
    assert best(client, "autoassign-coco") == "2"
    assert better.comparison == "bbox_mAP 0.4500 > 0.4000 of version 1: now best"
    version = client.get_model_version("autoassign-coco", "2")
    assert json.loads(version.tags[TAG_IDENTITY]) == {
        "format": "coco", "classes": COCO_CLASSES, "split": "val2017", "metric": "bbox_mAP"
    }  # fmt: skip
    keys = {
        client.get_model_version("autoassign-coco", "1").tags[TAG_IDENTITY_KEY],
        version.tags[TAG_IDENTITY_KEY],
        client.get_registered_model("autoassign-coco").tags[TAG_IDENTITY_KEY],
    }
    assert len(keys) == 1 and len(keys.pop()) == 12


def test_a_tie_leaves_best_on_the_earlier_version(store, checkpoints):
    client = store[0]
    register(store, row(store, "coco", checkpoints["real"], 0.40))
    (tie,) = register(store, row(store, "coco", checkpoints["real_again"], 0.40))
    assert best(client, "autoassign-coco") == "1" and not tie.became_best
    assert tie.comparison == "bbox_mAP 0.4000 <= 0.4000 of version 1, which stays best"


def test_a_model_from_before_identities_adopts_the_first_one_that_comes(store, checkpoints, capsys):
    client = store[0]
    # A model and version as the registry wrote them before identities: no identity tags.
    old_run = client.create_run(store[1])
    client.create_registered_model("autoassign-coco")
    client.create_model_version(
        "autoassign-coco", source=f"{old_run.info.artifact_uri}/model", run_id=old_run.info.run_id,
        tags={TAG_METRIC: "bbox_mAP", TAG_VALUE: "0.9"},
    )  # fmt: skip
    client.set_registered_model_alias("autoassign-coco", BEST_ALIAS, "1")

    (real,) = register(store, row(store, "coco", checkpoints["real"], 0.40))
    assert best(client, "autoassign-coco") == "2"  # unknown data does not compete
    assert real.comparison == (
        "bbox_mAP 0.4000: first version (version 1 held best without a recorded identity, "
        "which does not compete), now best"
    )
    assert client.get_model_version("autoassign-coco", "2").tags[TAG_COMPARISON] == (
        real.comparison
    )
    assert register(store, row(store, "coco", checkpoints["demo"], 0.431)) == []
    assert f"autoassign-coco holds models of {REAL}" in capsys.readouterr().err
    assert best(client, "autoassign-coco") == "2"
