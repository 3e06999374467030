"""Rank 0's MLflow logging inside a trial: metrics while training, artifacts at the end.

:class:`MlflowTrialLogger` is an engine :class:`~autoassign.engine.Callback`. It logs

- ``train/<loss>`` and ``lr`` every ``log_every_iters`` steps (batched with ``log_batch``),
- per epoch: ``epoch/train_<loss>`` means and every evaluation metric, with the global
  iteration as the step,
- at the end: the resolved config, the final evaluation, per-class AP, the learned center
  priors (plot and values), the evaluator's precision-recall curves (plot and values) and a
  few validation images with their predictions drawn over the ground truth.

Metrics go through :class:`~orchestration.tracking.metric_buffer.MetricBuffer`: sent together
every ``flush_every_s`` seconds, and kept while the tracking server is down, so an outage
loses nothing and fails nothing. Each checkpoint carries the points still waiting when it was
written. A worker restarted from a checkpoint sends those that the run does not hold yet, then
re-runs steps it may already have logged: steps up to the highest one the run already holds
are not logged again, so no epoch appears twice and none is missing.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from autoassign.engine import Callback, TrainState
from orchestration.tracking.metric_buffer import MetricBuffer, read_pending
from orchestration.tracking.retries import OUTAGE_WAIT_S, quiet_client_retries, with_retries

logger = logging.getLogger(__name__)

STEP_METRIC = "train/loss"
VALIDATION_SAMPLES = 3
# What the trainer leaves in its output folder at the end, logged as the trial's artifacts.
FINAL_OUTPUT_FILES = (
    "config.yaml",
    "center_prior.png",
    "center_prior.json",
    "pr_curves.png",
    "pr_curves.json",
)


class MlflowTrialLogger(Callback):
    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        log_every_iters: int,
        ranking_metric: str,
        flush_timeout: float = OUTAGE_WAIT_S,
        flush_every_s: float = 0.0,
        flush_evaluations: bool = False,
    ):
        """``flush_timeout``: how long an unreachable tracking server is waited out (for the
        final flush of buffered metrics and for every other call); ``flush_every_s``: how
        long metric points may wait to be sent together (``tracking.flush_every_s``);
        ``flush_evaluations``: send at once what waits at each evaluated epoch's end, before
        it is reported (an early-stopping scheduler may end the trial on that report, and
        Tune ends a stopped trial's processes without letting them flush)."""
        from mlflow.tracking import MlflowClient

        quiet_client_retries()
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.log_every_iters = log_every_iters
        self.ranking_metric = ranking_metric
        self.flush_timeout = flush_timeout
        self.flush_evaluations = flush_evaluations
        self.buffer = MetricBuffer(self.client, run_id, flush_every_s=flush_every_s)
        # A restored trial repeats the steps after its checkpoint; what already reached the
        # run is not logged again. Steps and epochs are tracked apart: a worker killed after
        # logging an epoch's last step but before that epoch's metrics must log the metrics.
        self.steps_logged_up_to = -1
        self.epochs_logged_up_to = -1
        self.trainer: Any = None
        self._restored: list[Any] = []
        """Points the restored checkpoint carried, sent at the start unless already held."""
        self._checkpoint_dir: Path | None = None
        """This epoch's checkpoint folder, which gets the points still waiting at its end."""
        self._sums: dict[str, float] = {}
        self._count = 0

    # ---- hooks ------------------------------------------------------------------------------

    def on_train_start(self, state: TrainState) -> None:
        self.steps_logged_up_to = self._highest_logged_step(STEP_METRIC)
        self.epochs_logged_up_to = self._highest_logged_step("epoch")
        state.extra["mlflow_run_id"] = self.run_id
        missing = [point for point in self._restored if not self._already_logged(point)]
        self._restored = []
        self.buffer.extend(missing)
        self.buffer.flush_if_due()

    def on_step(self, state: TrainState, losses: dict[str, float]) -> None:
        if all(math.isfinite(v) for v in losses.values()):
            for name, value in losses.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
            self._count += 1
        if state.iteration % self.log_every_iters != 0:
            return
        if self._count and state.iteration > self.steps_logged_up_to:
            means = {f"train/{name}": total / self._count for name, total in self._sums.items()}
            self.buffer.add({**means, "lr": state.lr}, step=state.iteration)
            self.buffer.flush_if_due()
        self._sums, self._count = {}, 0

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        # Rank 0 alone logs, and writes checkpoints. One that ends no epoch (a stop) gets the
        # waiting points here; an epoch's gets them again with the epoch's own at its end.
        self._checkpoint_dir = Path(path)
        self.buffer.save_pending(path)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Queue the epoch's points, send what is due, and leave what still waits in the
        epoch's checkpoint (this callback runs before the one that reports it to Ray)."""
        if state.iteration > self.epochs_logged_up_to:
            values = {f"epoch/train_{name}": v for name, v in state.epoch_losses.items()}
            values["epoch"] = float(state.epochs_completed)
            values.update({name: v for name, v in metrics.items() if math.isfinite(v)})
            self.buffer.add(values, step=state.iteration)
        if metrics and self.flush_evaluations:
            self.buffer.flush()
        else:
            self.buffer.flush_if_due()
        if self._checkpoint_dir is not None:
            self.buffer.save_pending(self._checkpoint_dir)
        self._checkpoint_dir = None

    def restore(self, checkpoint_dir: str | Path) -> None:
        """Take the points the checkpoint the worker restored carried; those the run does
        not hold yet are sent from ``on_train_start``."""
        self._restored = read_pending(checkpoint_dir, self.run_id)

    def on_train_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.buffer.close(timeout=self.flush_timeout)
        if state.status == "finished" and self.trainer is not None:
            self._log_artifacts(metrics)

    def fail(self, reason: str) -> None:
        """End the run FAILED with ``reason`` tagged, as final: the trial cannot succeed, and
        a restarted driver must not train it again (see ``orchestration.running.trial``)."""
        from orchestration.tracking.tags import TAG_FAILURE, TAG_FAILURE_FINAL

        self.buffer.close(timeout=self.flush_timeout)
        first_line = reason.strip().splitlines()[0][:2000] if reason.strip() else reason
        for key, value in ((TAG_FAILURE, first_line), (TAG_FAILURE_FINAL, "true")):
            with_retries(
                lambda key=key, value=value: self.client.set_tag(self.run_id, key, value),
                what="tag",
                timeout=self.flush_timeout,
            )
        with_retries(
            lambda: self.client.set_terminated(self.run_id, status="FAILED"),
            what="run end",
            timeout=self.flush_timeout,
        )

    # ---- helpers ----------------------------------------------------------------------------

    def _already_logged(self, point: Any) -> bool:
        """Whether the run holds ``point``: steps' points (``train/*``, ``lr``) up to the
        highest logged step, epochs' points up to the highest logged epoch."""
        step_point = point.key.startswith("train/") or point.key == "lr"
        return point.step <= (self.steps_logged_up_to if step_point else self.epochs_logged_up_to)

    def _highest_logged_step(self, key: str) -> int:
        """The last step at which ``key`` reached the run (-1: never)."""
        history = with_retries(
            lambda: self.client.get_metric_history(self.run_id, key),
            what="metric history",
            timeout=self.flush_timeout,
        )
        return max((m.step for m in history), default=-1)

    def _log_artifacts(self, metrics: dict[str, float]) -> None:
        trainer = self.trainer
        out = Path(trainer.output_dir)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            per_class = {k[3:]: v for k, v in metrics.items() if k.startswith("AP/")}
            (folder / "per_class_ap.json").write_text(json.dumps(per_class, indent=2) + "\n")
            summary = {k: v for k, v in metrics.items() if not k.startswith("AP/")}
            (folder / "final_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            files = [folder / "per_class_ap.json", folder / "final_metrics.json"]
            files += [out / name for name in FINAL_OUTPUT_FILES]
            for path in files:
                if path.is_file():
                    with_retries(
                        lambda path=path: self.client.log_artifact(self.run_id, str(path)),
                        what="artifact upload",
                        timeout=self.flush_timeout,
                    )
            samples = folder / "validation_samples"
            try:
                drawn = draw_validation_samples(trainer, samples, VALIDATION_SAMPLES)
            except Exception as error:  # a picture is not worth failing a finished trial
                logger.warning("validation samples not drawn: %s", error)
                drawn = 0
            if drawn:
                with_retries(
                    lambda: self.client.log_artifacts(
                        self.run_id, str(samples), "validation_samples"
                    ),
                    what="artifact upload",
                    timeout=self.flush_timeout,
                )


def draw_validation_samples(trainer: Any, folder: Path, count: int) -> int:
    """Draw the detector's predictions (coloured, captioned) over the ground truth (white)
    on the first ``count`` val images; returns how many were written."""
    import torch
    from PIL import Image

    from autoassign.data.transforms import load_image, resize_image
    from autoassign.viz import draw_detections, draw_ground_truth

    detector = trainer.detector
    records = trainer.val_dataset.records[:count]
    input_cfg = trainer.config.model.input
    folder.mkdir(parents=True, exist_ok=True)
    was_training = detector.training
    detector.eval()
    written = 0
    with torch.no_grad():
        for record in records:
            image = load_image(record.path)
            size = (int(image.shape[-2]), int(image.shape[-1]))
            resized, _ = resize_image(image, input_cfg.min_size, input_cfg.max_size)
            (output,) = detector([resized.to(trainer.device)], original_sizes=[size])
            keep = output["scores"] >= 0.3
            canvas = draw_detections(
                draw_ground_truth(
                    Image.fromarray(image.permute(1, 2, 0).numpy()), record.boxes, record.ignore
                ),
                output["boxes"][keep].cpu().numpy(),
                output["labels"][keep].cpu().tolist(),
                output["scores"][keep].cpu().numpy(),
                trainer.train_dataset.class_names,
            )
            canvas.save(folder / f"{Path(record.file_name).stem}.jpg", quality=90)
            written += 1
    detector.train(was_training)
    return written
