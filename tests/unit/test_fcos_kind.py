"""``model.kind: fcos``: torchvision's FCOS on the project's backbone and FPN, through the
project's own engine, checkpoints, evaluation, prediction, MLflow model and comparison.

The tiny setup of test_engine (ResNet-18/GN from scratch, 32 FPN channels, one conv per head
tower, 96 px synthetic COCO images of 2 classes). The sweep with an FCOS variant on real Ray
and MLflow servers is in tests/integration/test_fcos_sweep.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import Recorder, read_jsonl, run_two_ranks, tiny_config

from autoassign.config import ExperimentConfig
from autoassign.data.synthetic import write_synthetic
from autoassign.engine import Trainer, load_checkpoint
from autoassign.engine.trainer import seed_everything
from autoassign.errors import ConfigError
from autoassign.model import build_detector
from autoassign.model.fcos import FCOS_LOSS_TERMS, FCOSDetector
from autoassign.predict import Predictor

REPO = Path(__file__).resolve().parents[2]
LOSSES = {"loss", *FCOS_LOSS_TERMS}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; also keeps CPU results repeatable
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "coco"
    write_synthetic(
        "coco", root, num_images={"train": 8, "val": 4}, num_classes=2, image_size=96, seed=1
    )
    return root


def fcos_config(root: Path, output_dir: Path, size: int = 96, **train) -> ExperimentConfig:
    data = tiny_config(root, output_dir, **train).model_dump(mode="json")
    data["model"]["kind"] = "fcos"
    data["model"]["input"] = {"min_size": size, "max_size": size}
    return ExperimentConfig.model_validate(data)


@pytest.fixture(scope="module")
def trained(dataset_root, tmp_path_factory) -> dict:
    """6 epochs x 4 iterations of FCOS, evaluated at the end; 160 px input, so that one image
    alone still gives P7 more than one value per GroupNorm group (prediction runs one)."""
    out = tmp_path_factory.mktemp("fcos") / "run"
    cfg = fcos_config(
        dataset_root, out, size=160, epochs=6, milestones=[5], lr=0.005, log_every_iters=4
    )
    seed_everything(cfg.seed)
    initial = {k: v.clone() for k, v in build_detector(cfg.model).state_dict().items()}
    recorder = Recorder()
    trainer = Trainer(cfg, callbacks=[recorder], show_progress=False)
    metrics = trainer.fit()
    return {"cfg": cfg, "out": out, "trainer": trainer, "recorder": recorder,
            "metrics": metrics, "initial": initial}  # fmt: skip


def scene(path: Path) -> Path:
    pixels = torch.randint(0, 255, (90, 120, 3), generator=torch.Generator().manual_seed(1))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
    return path


def test_the_factory_builds_fcos_on_the_projects_backbone_and_fpn(dataset_root, tmp_path):
    from torchvision.models.detection.fcos import FCOSHead

    cfg = fcos_config(dataset_root, tmp_path).model
    model = build_detector(cfg)
    assert isinstance(model, FCOSDetector) and isinstance(model.head, FCOSHead)
    autoassign = build_detector(cfg.model_copy(update={"kind": "autoassign"}))
    assert type(model.backbone) is type(autoassign.backbone)
    assert type(model.fpn) is type(autoassign.fpn)
    backbone_keys = [k for k in autoassign.state_dict() if k.startswith(("backbone.", "fpn."))]
    assert [k for k in model.state_dict() if k.startswith(("backbone.", "fpn."))] == backbone_keys
    # One location per cell of each level, with the FPN's strides: 12x12 ... 1x1 at 96 px.
    features = model.fpn(model.backbone(torch.zeros(1, 3, 96, 96)))
    levels = model.locations(features)
    assert [len(level) for level in levels] == [144, 36, 9, 4, 1]
    centres = (levels[3][:, :2] + levels[3][:, 2:]) / 2
    assert centres.tolist() == [[0, 0], [64, 0], [0, 64], [64, 64]]  # P6: stride 64
    assert (levels[3][:, 2] - levels[3][:, 0]).tolist() == [64] * 4


def test_options_of_autoassign_alone_do_not_change_fcos(dataset_root, tmp_path):
    cfg = fcos_config(dataset_root, tmp_path).model
    other = cfg.model_validate(
        {
            **cfg.model_dump(),
            "center_prior": {"sigma_init": 2.0, "learnable": False, "kind": "uniform"},
            "loss": {"pos_weight": 3.0, "giou_weight": 1.0, "confidence_weighting": False},
        }
    )
    torch.manual_seed(0)
    plain = build_detector(cfg).state_dict()
    torch.manual_seed(0)
    changed = build_detector(other).state_dict()
    assert list(plain) == list(changed)
    for name, value in plain.items():
        assert torch.equal(value, changed[name]), name
    assert not any("center_prior" in name for name in plain)


def test_fcos_trains_with_the_engine_and_logs_its_own_losses(trained):
    steps = trained["recorder"].steps
    assert len(steps) == 24
    assert set(steps[0][2]) == LOSSES | {"grad_norm"}
    assert all(math.isfinite(step[2][name]) for step in steps for name in LOSSES)
    for step in steps:  # the total is the sum of torchvision's three terms
        assert step[2]["loss"] == pytest.approx(sum(step[2][n] for n in FCOS_LOSS_TERMS))
    losses = [step[2]["loss"] for step in steps]
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < 0.9 * first_epoch
    weights = trained["trainer"].detector.state_dict()
    for name in ("head.classification_head.cls_logits.weight", "backbone.conv1.weight",
                 "fpn.p7.weight", "head.regression_head.bbox_ctrness.weight"):  # fmt: skip
        assert not torch.equal(weights[name], trained["initial"][name]), name

    records = read_jsonl(trained["out"] / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert set(train[-1]) >= LOSSES
    assert all(math.isfinite(train[-1][name]) for name in LOSSES)


def test_evaluation_and_outputs_without_a_center_prior(trained):
    metrics, out = trained["metrics"], trained["out"]
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0 and 0.0 <= metrics["bbox_mAP_50"] <= 1.0
    assert metrics["bbox_mAP_50"] > 0  # it learned something in 24 steps
    assert json.loads((out / "final_metrics.json").read_text())["bbox_mAP"] == pytest.approx(
        metrics["bbox_mAP"]
    )
    assert (out / "pr_curves.json").is_file()
    assert not (out / "center_prior.json").exists() and not (out / "center_prior.png").exists()
    assert "kind: fcos" in (out / "config.yaml").read_text()
    saved = load_checkpoint(out / "checkpoints" / "last")
    assert saved["config"]["model"]["kind"] == "fcos"
    assert saved["model"].keys() == trained["trainer"].detector.state_dict().keys()


def test_an_interrupted_fcos_run_resumes_exactly(dataset_root, tmp_path):
    full = Recorder()
    trainer = Trainer(fcos_config(dataset_root, tmp_path / "a"), callbacks=[full],
                      show_progress=False)  # fmt: skip
    trainer.fit()
    first = Recorder(stop_after=3)
    Trainer(fcos_config(dataset_root, tmp_path / "b"), callbacks=[first],
            show_progress=False).fit()  # fmt: skip
    second = Recorder()
    resumed = Trainer(fcos_config(dataset_root, tmp_path / "b"), callbacks=[second],
                      show_progress=False)  # fmt: skip
    resumed.fit(resume_from=tmp_path / "b" / "checkpoints" / "last")

    steps = first.steps + second.steps
    assert [s[0] for s in steps] == [s[0] for s in full.steps] == list(range(1, 9))
    for (_, lr_a, losses_a), (_, lr_b, losses_b) in zip(full.steps, steps):
        assert lr_a == lr_b
        for name in LOSSES:
            assert losses_b[name] == pytest.approx(losses_a[name], rel=1e-5, abs=1e-7)
    reference = trainer.detector.state_dict()
    for name, value in resumed.detector.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_fcos_checkpoint_does_not_resume_as_autoassign(trained, dataset_root, tmp_path):
    from autoassign.errors import CheckpointError

    cfg = tiny_config(dataset_root, tmp_path / "aa")
    with pytest.raises(CheckpointError, match="does not fit the model of this config"):
        Trainer(cfg, show_progress=False).fit(resume_from=trained["out"] / "checkpoints/last")


def test_prediction_rebuilds_fcos_from_its_checkpoint(trained, tmp_path):
    from autoassign import predict
    from autoassign.data.transforms import load_image, resize_image

    checkpoint = trained["out"] / "checkpoints" / "last"
    predictor = Predictor(checkpoint, device="cpu")
    assert isinstance(predictor.model, FCOSDetector)
    image = scene(tmp_path / "scene.png")
    got = predictor(image)
    assert got["boxes"].shape[1] == 4 and got["labels"].dtype == torch.int64
    assert len(got["scores"]) == len(got["labels"]) == len(got["boxes"]) > 0
    assert (got["boxes"][:, 2] <= 120).all() and (got["boxes"][:, 3] <= 90).all()  # its pixels

    detector = trained["trainer"].detector.eval()
    pixels = load_image(image)
    resized, _ = resize_image(pixels, 160, 160)
    with torch.no_grad():
        (want,) = detector([resized], original_sizes=[(90, 120)])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(got[key], want[key]), key

    code = predict.main([str(checkpoint), str(image), "--out", str(tmp_path / "p"),
                         "--device", "cpu", "--draw-threshold", "0"])  # fmt: skip
    assert code == 0
    (entry,) = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert entry["file_name"] == "scene.png" and len(entry["scores"]) == len(got["scores"])
    assert set(entry["labels"]) <= {"disc", "ring"}


def test_the_mlflow_model_loads_an_fcos_checkpoint_and_predicts(trained, tmp_path):
    import mlflow.pyfunc

    from orchestration.tracking.mlflow_model import SIGNATURE, save_detector_model

    checkpoint = trained["out"] / "checkpoints" / "last" / "checkpoint.pt"
    folder = save_detector_model(checkpoint, tmp_path / "model")
    model = mlflow.pyfunc.load_model(str(folder))
    assert model.metadata.signature == SIGNATURE
    image = scene(tmp_path / "scene.png")
    table = model.predict(np.asarray(Image.open(image).convert("RGB")))
    want = Predictor(checkpoint, device="cpu")(image)
    assert list(table.columns) == ["x1", "y1", "x2", "y2", "score", "label", "class_name"]
    assert len(table) == len(want["scores"]) > 0
    np.testing.assert_allclose(table[["x1", "y1", "x2", "y2"]].to_numpy(), want["boxes"].numpy())
    np.testing.assert_allclose(table["score"].to_numpy(), want["scores"].numpy())
    assert set(table["class_name"]) <= {"disc", "ring"}


class RaiseInHead:
    """Forward hook on FCOS's regression tower raising at iteration ``at`` (one rank only)."""

    def __init__(self, trainer: Trainer, at: int):
        self.trainer, self.at = trainer, at

    def __call__(self, module, inputs, output):
        if self.trainer.state.iteration + 1 == self.at:
            raise RuntimeError("boom inside the head")
        return None


def _ddp_worker(rank: int, init_file: str, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result: dict = {}
    try:
        torch.set_num_threads(1)
        cfg = fcos_config(Path(root), Path(out) / "ok", epochs=1, milestones=[1])
        trainer = Trainer(cfg, show_progress=False)
        result["metrics"] = trainer.fit()
        result["weights"] = {k: v.clone() for k, v in trainer.detector.state_dict().items()}

        cfg = fcos_config(Path(root), Path(out) / "raise", epochs=1, milestones=[1])
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        if rank == 0:
            trainer.detector.head.regression_head.register_forward_hook(RaiseInHead(trainer, 2))
        started = time.monotonic()
        try:
            trainer.fit()
        except RuntimeError as error:
            result["error"] = (str(error), time.monotonic() - started)
    finally:
        torch.save(result, Path(out).parent / f"fcos{rank}.pt")
        dist.destroy_process_group()


def test_fcos_under_ddp_stays_in_step_and_a_failure_on_one_rank_stops_all(dataset_root, tmp_path):
    """FCOS's loss takes part in no collective: a rank whose forward pass failed must not
    join one on its behalf (AutoAssign's loss all-reduces its normalisers)."""
    run_two_ranks(_ddp_worker, str(tmp_path / "init"), str(dataset_root),
                  str(tmp_path / "run"), timeout=150)  # fmt: skip
    ranks = [torch.load(tmp_path / f"fcos{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, msg=name)
    assert 0.0 <= ranks[0]["metrics"]["bbox_mAP"] <= 1.0
    assert ranks[0]["metrics"] == pytest.approx(ranks[1]["metrics"], nan_ok=True)
    assert ranks[0]["error"][0] == "boom inside the head"
    assert "forward pass failed on rank(s) 0" in ranks[1]["error"][0]
    assert max(ranks[0]["error"][1], ranks[1]["error"][1]) < 60  # nobody waited for the other


def test_an_unknown_kind_is_refused_naming_the_file_and_field(dataset_root, tmp_path):
    from autoassign.config_loading import load_experiment_config

    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  kind: retinanet\n")
    with pytest.raises(ConfigError, match="bad.yaml: model.kind: Input should be 'autoassign'"):
        load_experiment_config(path)
    result = subprocess.run(
        [sys.executable, "-m", "autoassign.train", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.yaml: model.kind: Input should be 'autoassign' or 'fcos'" in result.stderr

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        f"name: s\ndatasets:\n  - {{name: shapes, format: coco, root: '{dataset_root}', "
        "num_classes: 2}\nvariants:\n  retina: {model.kind: retinanet}\noutput_dir: out\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.sweep", str(sweep), "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "variants.retina" in result.stderr and "model.kind" in result.stderr


def test_the_baseline_sweep_crosses_both_models_with_the_learning_rates_and_seeds():
    from orchestration.definition.config_loading import load_sweep_config
    from orchestration.definition.search_space import grid_points
    from orchestration.definition.trial_experiments import trial_experiment

    sweep = load_sweep_config(REPO / "configs" / "baseline.yaml")
    assert sweep.variants == {"autoassign": {}, "fcos": {"model.kind": "fcos"}}
    coco = sweep.dataset("coco")
    points = grid_points(sweep)
    assert len(points) == 8
    kinds = {}
    for params in points:
        cfg = trial_experiment(sweep, coco, dict(params))
        kinds[params["variant"], params["train.lr"], params["seed"]] = cfg.model.kind
        assert cfg.train.lr == params["train.lr"] and cfg.seed == params["seed"]
    assert kinds == {
        (variant, lr, seed): variant
        for variant in ("autoassign", "fcos")
        for lr in (0.01, 0.02)
        for seed in (0, 1)
    }


def test_the_terminal_line_shows_fcos_losses_by_name():
    from orchestration.running.trial_progress import _losses

    result = {"train/loss": 1.75, "train/loss_classification": 0.5,
              "train/loss_bbox_regression": 0.625, "train/loss_bbox_ctrness": 0.625}  # fmt: skip
    assert _losses(result) == (
        "loss 1.750 (classification 0.500, bbox_regression 0.625, bbox_ctrness 0.625)"
    )


# (variant, lr, seed, bbox_mAP): FCOS is best at 0.01, AutoAssign at 0.02 (made-up values).
BASELINE = [
    ("autoassign", 0.01, 0, 0.40), ("autoassign", 0.01, 1, 0.44),
    ("autoassign", 0.02, 0, 0.50), ("autoassign", 0.02, 1, 0.46),
    ("fcos", 0.01, 0, 0.45), ("fcos", 0.01, 1, 0.41),
    ("fcos", 0.02, 0, 0.47), ("fcos", 0.02, 1, 0.30),
]  # fmt: skip


@pytest.fixture(scope="module")
def baseline_store(tmp_path_factory) -> str:
    from mlflow.tracking import MlflowClient

    from orchestration.tracking.tags import (
        TAG_DATASET,
        TAG_FORMAT,
        TAG_KIND,
        TAG_METRIC,
        TAG_SWEEP_ID,
    )

    uri = f"sqlite:///{tmp_path_factory.mktemp('baseline') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("base")
    for variant, lr, seed, ap in BASELINE:
        run = client.create_run(
            experiment,
            tags={TAG_KIND: "trial", TAG_SWEEP_ID: "base-1", TAG_DATASET: "coco",
                  TAG_FORMAT: "coco", TAG_METRIC: "bbox_mAP"},
        )  # fmt: skip
        for name, value in (("variant", variant), ("train.lr", lr), ("seed", seed)):
            client.log_param(run.info.run_id, f"search.{name}", value)
        client.log_metric(run.info.run_id, "bbox_mAP", ap, step=8)
        client.set_terminated(run.info.run_id, "FINISHED")
    # A diverged trial: FAILED, so it counts for neither its variant nor its learning rate.
    tags = {TAG_KIND: "trial", TAG_DATASET: "coco", TAG_FORMAT: "coco", TAG_METRIC: "bbox_mAP"}
    run = client.create_run(experiment, tags=tags)
    client.log_param(run.info.run_id, "search.variant", "fcos")
    client.log_param(run.info.run_id, "search.train.lr", 0.04)
    client.set_terminated(run.info.run_id, "FAILED")
    return uri


def test_compare_by_variant_shows_each_model_at_its_best_learning_rate(baseline_store, capsys):
    from orchestration.results.compare import main

    code = main(["base", "--tracking-uri", baseline_store, "--by", "variant",
                 "--format", "json"])  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    rows = {row["variant"]: row for row in json.loads(out)}
    assert list(rows) == ["autoassign", "fcos"]
    autoassign, fcos = rows["autoassign"], rows["fcos"]
    assert (autoassign["trials"], autoassign["mean"], autoassign["best"]) == pytest.approx(
        (4, 0.45, 0.50)
    )
    assert autoassign["best_setting"] == {"train.lr": "0.02"}  # seeds are averaged, not picked
    assert (autoassign["at_best"]["trials"], autoassign["at_best"]["mean"]) == pytest.approx(
        (2, 0.48)
    )
    assert fcos["best_setting"] == {"train.lr": "0.01"}  # 0.43 > 0.385, though 0.47 is at 0.02
    assert fcos["at_best"]["mean"] == pytest.approx(0.43)
    assert fcos["at_best"]["sd"] == pytest.approx(0.02 * 2**0.5)
    assert fcos["best"] == pytest.approx(0.47)

    code = main(["base", "--tracking-uri", baseline_store, "--by", "variant",
                 "--format", "csv"])  # fmt: skip
    out, _ = capsys.readouterr()
    table = {row["variant"]: row for row in csv.DictReader(io.StringIO(out))}
    assert table["autoassign"]["best train.lr"] == "0.02"
    assert table["autoassign"]["its mean"] == "0.4800" and table["autoassign"]["its trials"] == "2"
    assert table["fcos"]["best train.lr"] == "0.01" and table["fcos"]["its mean"] == "0.4300"

    code = main(["base", "--tracking-uri", baseline_store, "--by", "variant"])
    out, _ = capsys.readouterr()
    header = out.splitlines()[0].split()
    assert header[:4] == ["dataset", "metric", "variant", "trials"]
    assert "train.lr" in header and "0.4800" in out and "0.4300" in out

    # By learning rate instead: the variant is then the setting picked per learning rate.
    code = main(["base", "--tracking-uri", baseline_store, "--by", "train.lr",
                 "--format", "json"])  # fmt: skip
    out, _ = capsys.readouterr()
    by_lr = {row["train.lr"]: row for row in json.loads(out)}
    assert by_lr["0.01"]["best_setting"] == {"variant": "fcos"}  # 0.43 > 0.42
    assert by_lr["0.02"]["best_setting"] == {"variant": "autoassign"}
