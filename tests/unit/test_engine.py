"""The training engine on a tiny real setup: loss falls, exact resume, non-finite losses,
checkpoint files and errors.

Tiny model: ResNet-18 (GroupNorm, from scratch), 32 FPN channels, one conv per head tower;
a synthetic COCO-format dataset of 96 px images written by the test.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import PIL.Image
import pytest
import torch

from autoassign.config import ExperimentConfig
from autoassign.data.synthetic import write_synthetic
from autoassign.engine import (
    Callback,
    MetricsFileWriter,
    ProgressLogger,
    Trainer,
    TrainState,
    WarmupStepSchedule,
    load_checkpoint,
    resolve_checkpoint_path,
    save_checkpoint,
)
from autoassign.engine.checkpoint import (
    CHECKPOINT_FILE,
    capture_rng_state,
    epoch_checkpoint_dir,
    iteration_checkpoint_dir,
    restore_rng_state,
    save_checkpoint_dir,
    update_last,
)
from autoassign.engine.device import local_rank, resolve_device
from autoassign.engine.resume import resume_position
from autoassign.engine.trainer import resolve_device as trainer_resolve_device
from autoassign.errors import CheckpointError, ConfigError, NonFiniteLossError


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


def tiny_config(root: Path, output_dir: Path, **train) -> ExperimentConfig:
    """A model and schedule small enough for a few CPU seconds per epoch."""
    return ExperimentConfig.model_validate(
        {
            "model": {
                "num_classes": 2,
                "backbone": {"depth": 18, "norm": "gn", "frozen_stages": -1, "style": "pytorch"},
                "fpn_channels": 32,
                "head": {"num_convs": 1},
                "input": {"min_size": 96, "max_size": 96},
            },
            "data": {"root": str(root), "batch_size": 2, "num_workers": 0},
            "train": {
                "lr": 0.01,
                "base_batch_size": 2,
                "warmup_iters": 3,
                "schedule": None,
                "epochs": 2,
                "milestones": [1],
                "log_every_iters": 1,
                **train,
            },
            "eval": {"every_epochs": 0, "batch_size": 2},
            "output_dir": str(output_dir),
        }
    )


class Recorder(Callback):
    """Keeps every step's losses and lr; can ask the trainer to stop after a given step."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.steps: list[tuple[int, float, dict[str, float]]] = []
        self.checkpoints: list[Path] = []
        self.epochs: list[tuple[int, dict]] = []
        self.end: tuple[str, str | None] | None = None

    def on_train_start(self, state):
        # A callback's own state (e.g. a tracking run id) travels in the checkpoints.
        self.extra_at_start = dict(state.extra)
        state.extra.setdefault("tracking_run", f"run-at-iteration-{state.iteration}")

    def on_step(self, state, losses):
        self.steps.append((state.iteration, state.lr, dict(losses)))
        if self.stop_after is not None and state.iteration == self.stop_after:
            state.should_stop = True

    def on_checkpoint(self, state, path):
        self.checkpoints.append(path)

    def on_epoch_end(self, state, metrics):
        self.epochs.append((state.epoch, dict(metrics)))

    def on_train_end(self, state, metrics):
        self.end = (state.status, state.error)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_training_lowers_the_loss_and_writes_its_outputs(dataset_root, tmp_path):
    # 8 images, 4 iterations per epoch, 6 epochs = 24 iterations.
    cfg = tiny_config(
        dataset_root, tmp_path / "run", epochs=6, milestones=[5], lr=0.02, log_every_iters=4
    )
    recorder = Recorder()
    metrics = Trainer(cfg, callbacks=[recorder], show_progress=False).fit()

    losses = [step[2]["loss"] for step in recorder.steps]
    assert len(losses) == 24
    # Batches differ a lot (box counts), so compare whole epochs: each sees all 8 images.
    first_epoch, last_epoch = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last_epoch < 0.9 * first_epoch

    out = tmp_path / "run"
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert [r["iteration"] for r in train] == [4, 8, 12, 16, 20, 24]
    assert train[0]["loss"] == pytest.approx(sum(losses[:4]) / 4)
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [6]  # every_epochs 0: only after the last epoch
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["bbox_mAP"] == pytest.approx(metrics["bbox_mAP"])
    assert 0.0 <= final["bbox_mAP"] <= 1.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        *(f"epoch_{n:04d}" for n in range(1, 7)),
        "last",
    ]
    assert [p.name for p in (out / "checkpoints" / "last").iterdir()] == ["checkpoint.pt"]
    assert ExperimentConfig.model_validate(load_checkpoint(out / "checkpoints/last")["config"])
    assert recorder.end == ("finished", None)
    priors = json.loads((out / "center_prior.json").read_text())
    assert [p["class"] for p in priors] == ["disc", "ring"]
    assert (out / "center_prior.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "config.yaml").is_file()
    # The final evaluation's curves: one per class with ground truth, pycocotools' 101 points,
    # each AP50 the mean of its precisions; the plot is the fixed 700 x 600 figure.
    curves = json.loads((out / "pr_curves.json").read_text())
    assert sorted(curves) == ["disc", "ring"]
    for curve in curves.values():
        assert len(curve["recall"]) == len(curve["precision"]) == 101
        assert curve["ap"] == pytest.approx(sum(curve["precision"]) / 101, abs=1e-5)
    with PIL.Image.open(out / "pr_curves.png") as picture:
        assert picture.format == "PNG" and picture.size == (700, 600)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(dataset_root, tmp_path):
    # 2 epochs x 4 iterations; the interrupted run stops mid-epoch 1, after iteration 3.
    full = Recorder()
    trainer = Trainer(tiny_config(dataset_root, tmp_path / "a"), callbacks=[full])
    trainer.fit()

    first = Recorder(stop_after=3)
    assert Trainer(tiny_config(dataset_root, tmp_path / "b"), callbacks=[first]).fit() == {}
    assert first.end == ("stopped", None)
    checkpoints = tmp_path / "b" / "checkpoints"
    assert first.checkpoints == [checkpoints / "iter_00000003"]  # directories
    last = checkpoints / "last"
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["iteration"]) == (0, 3, 3)
    assert (saved["world_size"], saved["samples_seen"], saved["peak_lr"]) == (1, 6, 0.01)

    second = Recorder()
    resumed = Trainer(tiny_config(dataset_root, tmp_path / "b"), callbacks=[second])
    resumed.fit(resume_from=last)
    assert first.extra_at_start == {}
    assert second.extra_at_start == {"tracking_run": "run-at-iteration-0"}  # from the checkpoint

    steps = first.steps + second.steps
    assert [s[0] for s in steps] == [s[0] for s in full.steps] == list(range(1, 9))
    for (_, lr_a, losses_a), (_, lr_b, losses_b) in zip(full.steps, steps):
        assert lr_a == lr_b
        for name in losses_a:
            assert losses_b[name] == pytest.approx(losses_a[name], rel=1e-5, abs=1e-7)
    reference = trainer.detector.state_dict()
    for name, value in resumed.detector.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6, msg=name)


class PoisonWeight(Callback):
    """Puts a NaN into one real weight after step ``at`` (and restores it after the next step
    when ``restore``), so the next forward pass computes a NaN loss for real."""

    def __init__(self, trainer: Trainer, at: int, restore: bool):
        self.trainer, self.at, self.restore = trainer, at, restore
        self.saved = None

    def on_step(self, state, losses):
        weight = self.trainer.detector.head.cls_logits.weight
        if state.iteration == self.at:
            self.saved = weight.detach().clone()
            with torch.no_grad():
                weight[0, 0, 0, 0] = float("nan")
        elif self.restore and state.iteration == self.at + 1:
            with torch.no_grad():
                weight.copy_(self.saved)


def test_nonfinite_loss_stops_naming_the_iteration(dataset_root, tmp_path):
    # A learning rate of 1e8 blows the weights up within a few real steps.
    cfg = tiny_config(dataset_root, tmp_path / "run", lr=1e8, warmup_iters=0)
    recorder = Recorder()
    with pytest.raises(NonFiniteLossError) as excinfo:
        Trainer(cfg, callbacks=[recorder], show_progress=False).fit()
    iteration = excinfo.value.iteration  # counted from 1, as in the logs
    assert iteration == len(recorder.steps) + 1  # the steps before it were finite
    assert str(excinfo.value).startswith(f"iteration {iteration} (epoch 1, batch {iteration} ")
    assert "non-finite" in str(excinfo.value)
    assert not all(math.isfinite(v) for v in excinfo.value.losses.values())


def test_nonfinite_loss_can_be_skipped(dataset_root, tmp_path):
    cfg = tiny_config(dataset_root, tmp_path / "run", on_nonfinite_loss="skip")
    recorder = Recorder()
    trainer = Trainer(cfg, callbacks=[recorder], show_progress=False)
    trainer.setup()
    trainer.callbacks.callbacks.append(PoisonWeight(trainer, at=2, restore=True))
    trainer.fit()

    assert math.isnan(recorder.steps[2][2]["loss"])  # iteration 3 computed on the NaN weight
    assert all(math.isfinite(s[2]["loss"]) for i, s in enumerate(recorder.steps) if i != 2)
    assert trainer.state.skipped_steps == 1
    for name, value in trainer.detector.state_dict().items():
        assert torch.isfinite(value).all(), name
    for state in trainer.optimizer.state.values():
        assert torch.isfinite(state["momentum_buffer"]).all()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records if r["type"] == "train"][-1] == 1


def test_evaluation_every_epoch_and_callback_order(dataset_root, tmp_path):
    cfg = tiny_config(dataset_root, tmp_path / "run").model_copy(
        update={"eval": ExperimentConfig().eval.model_copy(update={"every_epochs": 1})}
    )
    events: list[str] = []

    class Order(Callback):
        def on_train_start(self, state):
            events.append("start")

        def on_checkpoint(self, state, path):
            events.append(f"checkpoint {path.name} {state.epoch} {state.epochs_completed}")

        def on_step(self, state, losses):
            assert state.epochs_completed == state.epoch

        def on_epoch_end(self, state, metrics):
            events.append(f"epoch {state.epoch} {state.primary_metric in metrics}")
            events.append(f"losses {sorted(state.epoch_losses)}")
            assert all(math.isfinite(value) for value in state.epoch_losses.values())

        def on_train_end(self, state, metrics):
            events.append("end")

    Trainer(cfg, callbacks=[Order()], show_progress=False).fit()
    losses = "losses ['loss', 'loss_center', 'loss_neg', 'loss_pos']"
    assert events == [
        "start",
        "checkpoint epoch_0001 0 1",
        "epoch 0 True",
        losses,
        "checkpoint epoch_0002 1 2",
        "epoch 1 True",
        losses,
        "end",
    ]


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    path = save_checkpoint(
        {"model": {"w": torch.ones(2)}, "config": {}, "epoch": 1, "iteration": 5}, tmp_path / "c.pt"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
    assert load_checkpoint(path)["iteration"] == 5

    with pytest.raises(CheckpointError, match="absent.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="a directory without a checkpoint.pt"):
        load_checkpoint(tmp_path)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: not a readable checkpoint"):
        load_checkpoint(text)
    bare = tmp_path / "bare.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bare)
    with pytest.raises(CheckpointError, match="bare.pt: not an autoassign checkpoint"):
        load_checkpoint(bare)
    partial = save_checkpoint({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="lacks config, epoch, iteration"):
        load_checkpoint(partial)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def _data_parallel_worker(rank: int, init_file: str, root: str, out: str) -> None:
    """One of two CPU processes in a gloo group that the test, not the engine, initialises."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        recorder = Recorder()
        cfg = tiny_config(Path(root), Path(out), epochs=1, milestones=[1])
        trainer = Trainer(cfg, callbacks=[recorder], show_progress=False)
        metrics = trainer.fit()
        weights = {k: v.clone() for k, v in trainer.detector.state_dict().items()}
        torch.save(
            {"weights": weights, "metrics": metrics, "steps": recorder.steps},
            Path(out).parent / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def run_two_ranks(worker, *args, timeout: float = 300) -> None:
    """Run ``worker(rank, *args)`` in two spawned processes; fail if they hang."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {timeout} s")


def test_data_parallel_ranks_stay_in_step_and_only_rank_0_writes(dataset_root, tmp_path):
    out = tmp_path / "run"
    run_two_ranks(_data_parallel_worker, str(tmp_path / "init"), str(dataset_root), str(out))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # 8 images / (2 per batch x 2 ranks) = 2 iterations; lr scaled to the total batch of 4.
    assert [s[0] for s in ranks[0]["steps"]] == [1, 2]
    assert ranks[0]["steps"] == ranks[1]["steps"]  # losses averaged across ranks
    assert ranks[0]["steps"][1][1] == pytest.approx(0.02 * (0.001 + 0.999 / 3))
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, msg=name)
    assert ranks[1]["metrics"] == pytest.approx(ranks[0]["metrics"], nan_ok=True)
    assert "bbox_mAP" in ranks[0]["metrics"]
    train_lines = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["iteration"] for r in train_lines] == [1, 2]  # written once, by rank 0


def test_resuming_with_a_different_model_is_a_clear_error(dataset_root, tmp_path):
    first = Recorder(stop_after=1)
    Trainer(tiny_config(dataset_root, tmp_path / "a"), callbacks=[first]).fit()
    other = tiny_config(dataset_root, tmp_path / "b")
    other = other.model_copy(update={"model": other.model.model_copy(update={"fpn_channels": 64})})
    match = "last/checkpoint.pt: does not fit the model of this config"
    with pytest.raises(CheckpointError, match=match):
        Trainer(other, show_progress=False).fit(resume_from=tmp_path / "a/checkpoints/last")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_on_a_terminal_and_in_a_log():
    state = TrainState(max_epochs=2, iters_per_epoch=3, max_iterations=6, lr=0.01)
    log, terminal = io.StringIO(), FakeTerminal()
    loggers = [ProgressLogger(log_every_iters=2, stream=s) for s in (log, terminal)]
    for logger in loggers:
        logger.on_train_start(state)
    for iteration in range(1, 5):
        state.iteration, state.epoch = iteration, (iteration - 1) // 3
        for logger in loggers:
            logger.on_step(state, {"loss": float(iteration), "loss_pos": 0.5})
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("training 2 epochs x 3 iterations")
    assert len(lines) == 3 and "\r" not in log.getvalue()
    assert lines[1].startswith("epoch 1/2 iter 2/6 ") and "loss 1.5000 loss_pos 0.5000" in lines[1]
    assert lines[2].startswith("epoch 2/2 iter 4/6 ") and "loss 3.5000" in lines[2]
    assert "it/s ETA 0:00:0" in lines[2]
    shown = terminal.getvalue()
    assert "\r" in shown and "\033[K" in shown  # one status line redrawn in place


def test_metrics_file_has_interval_means_and_eval_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsFileWriter(path, log_every_iters=2)
    state = TrainState(max_epochs=1, iters_per_epoch=4, max_iterations=4)
    writer.on_train_start(state)
    for iteration, loss in enumerate([4.0, 2.0, float("nan"), 1.0], start=1):
        state.iteration = iteration
        writer.on_step(state, {"loss": loss})
    time.sleep(0.2)  # the evaluation
    writer.on_epoch_end(state, {"bbox_mAP": 0.25, "bbox_mAP_l": float("nan")})
    records = read_jsonl(path)
    assert [(r["type"], r["iteration"]) for r in records] == [
        ("start", 0),
        ("train", 2),
        ("train", 4),
        ("eval", 4),
    ]
    assert records[1]["loss"] == 3.0 and records[2]["loss"] == 1.0  # NaN steps left out
    assert records[3]["bbox_mAP"] == 0.25 and records[3]["bbox_mAP_l"] is None
    # Wall times: in order, and the time after the epoch's last step is the evaluation's.
    times = [r["time"] for r in records]
    assert times == sorted(times) and abs(times[0] - time.time()) < 60
    assert 0.2 <= records[3]["eval_and_checkpoint_seconds"] < 0.2 + (times[3] - times[2]) + 0.01


def test_max_iters_per_epoch_cuts_epochs_short(dataset_root, tmp_path):
    cfg = tiny_config(dataset_root, tmp_path / "run", max_iters_per_epoch=1, warmup_iters=0)
    recorder = Recorder()
    Trainer(cfg, callbacks=[recorder], show_progress=False).fit()
    # One iteration per epoch, so the milestone after epoch 1 applies from iteration 2.
    assert [(s[0], s[1]) for s in recorder.steps] == [(1, 0.01), (2, pytest.approx(0.001))]
    assert load_checkpoint(tmp_path / "run/checkpoints/last/checkpoint.pt")["iteration"] == 2


# --------------------------------------------------------------------------------------------
# Checkpoint directories, resume at another world size
# --------------------------------------------------------------------------------------------


def test_checkpoint_paths_resolve_from_directories_and_files(tmp_path):
    state = {"model": {}, "config": {}, "epoch": 1, "iteration": 4}
    first = save_checkpoint_dir(state, epoch_checkpoint_dir(tmp_path, 1))
    assert first == tmp_path / "epoch_0001"
    assert resolve_checkpoint_path(first) == first / CHECKPOINT_FILE
    assert resolve_checkpoint_path(first / CHECKPOINT_FILE) == first / CHECKPOINT_FILE
    with pytest.raises(CheckpointError, match="absent: no such checkpoint file or directory"):
        resolve_checkpoint_path(tmp_path / "absent")

    update_last(tmp_path, first)
    second = save_checkpoint_dir({**state, "iteration": 7}, iteration_checkpoint_dir(tmp_path, 7))
    assert second.name == "iter_00000007"
    update_last(tmp_path, second)  # replaces the old last/
    assert load_checkpoint(tmp_path / "last")["iteration"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001", "iter_00000007", "last"]


def test_the_sampler_order_of_an_epoch_does_not_depend_on_the_world_size():
    """What makes a mid-epoch resume at another world size sound (engine/resume.py)."""
    from autoassign.data.samplers import GroupedDistributedBatchSampler

    def plans(world_size):
        return [
            GroupedDistributedBatchSampler(
                [list(range(16))], 2, seed=3, flip_prob=0.5, rank=rank, world_size=world_size
            ).epoch_plan(epoch=1)
            for rank in range(world_size)
        ]

    (alone,), (rank0, rank1) = plans(1), plans(2)
    # Step k on 2 ranks takes the batches 2k and 2k + 1 of the one-process order.
    assert [rank0[k] for k in range(4)] == alone[0::2]
    assert [rank1[k] for k in range(4)] == alone[1::2]


def test_a_mid_epoch_checkpoint_that_does_not_split_evenly_is_refused():
    written = {"epoch": 1, "batch_in_epoch": 1, "iteration": 5, "world_size": 1}
    written |= {"batch_size": 2, "samples_seen": 2}
    same = resume_position(written, world_size=1, batch_size=2, iters_per_epoch=4)
    assert (same.epoch, same.batch_in_epoch, same.iteration, same.remapped) == (1, 1, 5, False)
    at_boundary = {**written, "batch_in_epoch": 0, "iteration": 4, "samples_seen": 0}
    moved = resume_position(at_boundary, world_size=2, batch_size=2, iters_per_epoch=2)
    assert (moved.epoch, moved.batch_in_epoch, moved.iteration, moved.remapped) == (1, 0, 2, True)
    message = (
        r"ckpt: written at world size 1 in the middle of epoch 2 at sample 2; it cannot be "
        r"continued on 2 process\(es\) .*Resume from an epoch checkpoint"
    )
    with pytest.raises(CheckpointError, match=message):
        resume_position(written, world_size=2, batch_size=2, iters_per_epoch=2, source="ckpt")


def _two_process_checkpoints_worker(rank: int, init_file: str, root: str, out: str) -> None:
    """2 epochs x 2 iterations on two ranks, stopped after iteration 3 (mid-epoch 2)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        cfg = tiny_config(Path(root), Path(out), warmup_iters=6)
        Trainer(cfg, callbacks=[Recorder(stop_after=3)], show_progress=False).fit()
    finally:
        dist.destroy_process_group()


def test_resume_on_one_process_from_a_two_process_run(dataset_root, tmp_path):
    out = tmp_path / "two"
    run_two_ranks(
        _two_process_checkpoints_worker, str(tmp_path / "init"), str(dataset_root), str(out)
    )
    epoch_1 = out / "checkpoints" / "epoch_0001"
    saved = load_checkpoint(epoch_1)
    assert (saved["world_size"], saved["iters_per_epoch"], saved["peak_lr"]) == (2, 2, 0.02)
    assert (saved["epoch"], saved["iteration"], saved["total_batch_size"]) == (1, 2, 4)

    # At an epoch boundary: epoch 2 of the one-process schedule (4 iterations per epoch,
    # warmup counted in its iterations, peak lr 0.01 for the total batch of 2).
    cfg = tiny_config(dataset_root, tmp_path / "one", warmup_iters=6)
    recorder = Recorder()
    trainer = Trainer(cfg, callbacks=[recorder], show_progress=False)
    trainer.fit(resume_from=epoch_1)
    schedule = WarmupStepSchedule.from_config(cfg.train, base_lr=0.01, iters_per_epoch=4)
    assert [s[0] for s in recorder.steps] == [5, 6, 7, 8]
    assert [s[1] for s in recorder.steps] == [schedule.lr(i) for i in range(4, 8)]
    assert recorder.steps[0][1] == pytest.approx(0.01 * 0.1 * (0.001 + 0.999 * 4 / 6))
    assert (trainer.state.epoch, trainer.state.epochs_completed) == (2, 2)
    assert recorder.end == ("finished", None)

    # Mid-epoch: 1 step of 2 ranks x 2 images = 4 images = 2 steps of one process.
    stopped = out / "checkpoints" / "iter_00000003"
    assert load_checkpoint(stopped)["samples_seen"] == 4
    recorder = Recorder()
    trainer = Trainer(tiny_config(dataset_root, tmp_path / "mid", warmup_iters=6),
                      callbacks=[recorder], show_progress=False)  # fmt: skip
    trainer.fit(resume_from=stopped / CHECKPOINT_FILE)
    assert [s[0] for s in recorder.steps] == [7, 8]  # epoch 2, batches 3 and 4
    assert recorder.end == ("finished", None)


# --------------------------------------------------------------------------------------------
# Non-finite steps under DDP, on_train_end, devices, the dataset scan record
# --------------------------------------------------------------------------------------------


def _nonfinite_worker(rank: int, init_file: str, root: str, out: str) -> None:
    """Rank 0 alone gets a NaN weight after step 1: error mode, then skip mode."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result: dict = {}
    try:
        torch.set_num_threads(1)
        cfg = tiny_config(Path(root), Path(out) / "error", epochs=1, milestones=[1])
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        if rank == 0:
            trainer.callbacks.callbacks.append(PoisonWeight(trainer, at=1, restore=False))
        started = time.monotonic()
        try:
            trainer.fit()
        except NonFiniteLossError as error:
            result["error"] = (error.iteration, str(error), time.monotonic() - started)

        cfg = tiny_config(Path(root), Path(out) / "skip", on_nonfinite_loss="skip")
        trainer = Trainer(cfg, show_progress=False)
        trainer.setup()
        if rank == 0:
            trainer.callbacks.callbacks.append(PoisonWeight(trainer, at=1, restore=True))
        trainer.fit()
        result["skipped"] = trainer.state.skipped_steps
        result["weights"] = {k: v.clone() for k, v in trainer.detector.state_dict().items()}
    finally:
        torch.save(result, Path(out).parent / f"nonfinite{rank}.pt")
        dist.destroy_process_group()


def test_nonfinite_on_one_rank_raises_or_skips_on_every_rank(dataset_root, tmp_path):
    out = tmp_path / "run"
    run_two_ranks(_nonfinite_worker, str(tmp_path / "init"), str(dataset_root), str(out))
    ranks = [torch.load(tmp_path / f"nonfinite{r}.pt", weights_only=False) for r in (0, 1)]
    for result in ranks:
        iteration, message, seconds = result["error"]
        assert iteration == 2 and message.startswith("iteration 2 (epoch 1, batch 2 ")
        assert "non-finite head outputs or parameters on rank(s) 0" in message
        assert seconds < 60  # nobody waited for a rank that had given up
        assert result["skipped"] == 1
    for name, value in ranks[0]["weights"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(ranks[1]["weights"][name], value, msg=name)


class Raising(Callback):
    def on_step(self, state, losses):
        raise RuntimeError("callback broke at step 1")


class RaisingAtEnd(Callback):
    def on_train_end(self, state, metrics):
        raise ValueError("on_train_end broke too")


def test_on_train_end_is_called_when_a_run_fails(dataset_root, tmp_path):
    recorder = Recorder()
    cfg = tiny_config(dataset_root, tmp_path / "run", max_iters_per_epoch=1)
    trainer = Trainer(cfg, callbacks=[recorder, RaisingAtEnd(), Raising()], show_progress=False)
    with pytest.raises(RuntimeError, match="callback broke at step 1"):  # not masked
        trainer.fit()
    assert recorder.end == ("failed", "callback broke at step 1")


def test_resolve_device_on_the_cpu(monkeypatch):
    # Only the CPU branch runs here: this machine has no CUDA. With CUDA, "auto" and "cuda"
    # give cuda:$LOCAL_RANK and make it the current device.
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_rank() == 1
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert trainer_resolve_device is resolve_device  # the old import still works
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ConfigError, match="LOCAL_RANK='one' is not an integer"):
        local_rank()


def test_the_dataset_scan_is_reused_until_the_dataset_changes(tmp_path, monkeypatch):
    from autoassign.data import validate

    root = tmp_path / "coco"
    write_synthetic(
        "coco", root, num_images={"train": 4, "val": 2}, num_classes=2, image_size=96, seed=2
    )
    calls = []
    real_scan = validate.scan_dataset

    def spy(cfg, split):
        calls.append(split)
        return real_scan(cfg, split)

    monkeypatch.setattr(validate, "scan_dataset", spy)
    cfg = tiny_config(root, tmp_path / "run")
    Trainer(cfg, show_progress=False).setup()  # what fit runs first
    record = json.loads((tmp_path / "run" / "dataset_scan.json").read_text())
    assert (record["format"], record["split"], len(calls)) == ("coco", "train", 1)
    Trainer(cfg, show_progress=False).setup()
    assert len(calls) == 1  # reused

    annotations = root / "annotations" / "instances_train.json"
    annotations.write_text(annotations.read_text() + "\n")
    Trainer(cfg, show_progress=False).setup()
    assert len(calls) == 2
