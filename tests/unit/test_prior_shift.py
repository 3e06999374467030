"""``python -m orchestration.prior_shift``: each trial's learned center prior, per class and seed.

The trial runs and their ``center_prior.json`` artifacts are written with MLflow's own client
into a real SQLite store with a local artifact folder, tagged the way a sweep tags them.
"""

from __future__ import annotations

import json

import pytest

from orchestration.results.prior_shift import _same_sign, main, shape_mass_offset
from orchestration.tracking.tags import TAG_DATASET, TAG_FORMAT, TAG_KIND, TAG_METRIC, TAG_SWEEP_ID

# (variant, seed, l_shape mean, disc mean)
PRIORS = [
    ("full", 0, (-0.30, 0.20), (0.05, -0.02)),
    ("full", 1, (-0.10, 0.40), (-0.04, 0.01)),
    ("fixed_prior", 0, (0.0, 0.0), (0.0, 0.0)),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("priors")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pri", artifact_location=str(folder / "artifacts"))
    for variant, seed, l_mean, disc_mean in PRIORS:
        run = client.create_run(
            experiment,
            tags={TAG_KIND: "trial", TAG_SWEEP_ID: "pri-1", TAG_DATASET: "shapes",
                  TAG_FORMAT: "coco", TAG_METRIC: "bbox_mAP"},
        )  # fmt: skip
        client.log_param(run.info.run_id, "search.variant", variant)
        client.log_param(run.info.run_id, "search.seed", seed)
        client.log_metric(run.info.run_id, "bbox_mAP", 0.5)
        priors = [
            {"class": "disc", "mean": list(disc_mean), "sigma": [1.0, 1.0]},
            {"class": "l_shape", "mean": list(l_mean), "sigma": [1.2, 0.8 + seed / 10]},
        ]
        local = folder / "upload" / f"{variant}{seed}"
        local.mkdir(parents=True)
        (local / "center_prior.json").write_text(json.dumps(priors))
        client.log_artifact(run.info.run_id, str(local / "center_prior.json"))
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri


def test_mass_offsets_of_the_synthetic_shapes():
    assert shape_mass_offset("disc") == pytest.approx((0.0, 0.0), abs=0.005)
    l_x, l_y = shape_mass_offset("l_shape")  # the vertical bar on the left, the foot below
    assert l_x == pytest.approx(-0.248, abs=0.01) and l_y == pytest.approx(0.248, abs=0.01)
    assert shape_mass_offset("right_triangle") == pytest.approx((-1 / 3, 1 / 3), abs=0.01)
    assert shape_mass_offset("crescent")[0] < -0.3  # the thick left side


def test_learned_means_per_class_and_seed(store, capsys):
    code = main(["pri", "--tracking-uri", store, "--by", "variant", "--synthetic",
                 "--format", "json"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    rows = {(r["group"], r["class"]): r for r in json.loads(out)}
    full_l = rows["full", "l_shape"]
    assert full_l["seeds"] == ["0", "1"]
    assert full_l["mean_per_seed"] == [[-0.30, 0.20], [-0.10, 0.40]]
    assert full_l["mean"] == pytest.approx([-0.20, 0.30])
    assert full_l["sigma"] == pytest.approx([1.2, 0.85])
    assert full_l["same_sign"] == [True, True]
    assert full_l["shape"] == "l_shape"
    assert full_l["mass_offset"] == pytest.approx([-0.248, 0.248], abs=0.01)
    assert rows["full", "disc"]["same_sign"] == [False, False]
    assert rows["fixed_prior", "l_shape"]["same_sign"] == [None, None]  # one seed says nothing
    assert _same_sign([0.0, 0.1]) is False and _same_sign([-0.2, -0.1]) is True  # 0: no sign

    code = main(["pri", "--tracking-uri", store, "--by", "variant", "--synthetic"])
    out, _ = capsys.readouterr()
    assert code == 0
    line = next(
        x for x in out.splitlines() if x.startswith("shapes") and "full" in x and "l_sh" in x
    )
    assert "-0.300 -0.100" in line and "+0.200 +0.400" in line and "yes/yes" in line


def test_unknown_names_exit_2_listing_what_there_is(store, capsys):
    assert main(["pri", "--tracking-uri", store, "--by", "lr"]) == 2
    assert "seed, variant" in capsys.readouterr().err
    assert main(["pri", "--tracking-uri", store, "--dataset", "faces"]) == 2
    assert "it has: shapes" in capsys.readouterr().err
