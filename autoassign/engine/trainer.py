"""The one training loop of the project.

    trainer = Trainer(config, callbacks=[...])
    final_metrics = trainer.fit(resume_from=None)

One process trains alone; under a ``torch.distributed`` process group initialised by a
launcher (Ray Train, torchrun) each rank runs the same code: the model is wrapped in DDP,
each rank reads its share of the batches, losses and metrics are averaged across ranks, and
only rank 0 writes files. The loop itself never initialises the process group.

Per epoch: train, evaluate when due (``eval.every_epochs``, always after the last), write a
checkpoint when due (``train.checkpoint_every_epochs``, always after the last), then call
``on_epoch_end`` (after ``on_checkpoint``, so a callback can report an epoch's metrics together
with its checkpoint). ``on_train_end`` is called whenever ``on_train_start`` was, also when
the run stops early or fails (``state.status`` says which). Files under ``output_dir``:

    config.yaml            the resolved config
    dataset_scan.json      the record of a passed dataset scan, reused by later fits
    metrics.jsonl          train losses every ``log_every_iters`` steps, eval metrics per epoch,
                           each record with its wall time
    checkpoints/epoch_NNNN/checkpoint.pt    after NNNN completed epochs
    checkpoints/iter_NNNNNNNN/checkpoint.pt a run stopped mid-epoch
    checkpoints/last/checkpoint.pt          the latest checkpoint
    final_metrics.json     the last evaluation
    center_prior.png/json  the learned center priors per class (AutoAssign; FCOS has none)

Non-finite values are agreed on by all ranks before anyone acts: each step, every rank
contributes a flag (its head outputs, parameters or loss not finite, or its forward pass
failed) to one all-reduce before backward, so under ``train.on_nonfinite_loss: error`` every
rank raises and under ``skip`` every rank skips the step. Nothing a rank finds is raised
before a collective the other ranks are in: every rank always runs the same collectives in
the same order (the loss's normaliser all-reduce, the flag, the mean of the losses, DDP's
gradient buckets, the evaluation's gather and broadcast, the checkpoint's broadcast),
whatever became non-finite on which rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoassign import distributed as dist_utils
from autoassign.config import ExperimentConfig
from autoassign.config_loading import write_resolved_config
from autoassign.engine.callbacks import (
    Callback,
    CallbackList,
    MetricsFileWriter,
    ProgressLogger,
    json_safe,
)
from autoassign.engine.checkpoint import (
    capture_rng_state,
    epoch_checkpoint_dir,
    iteration_checkpoint_dir,
    load_checkpoint,
    resolve_checkpoint_path,
    restore_rng_state,
    save_checkpoint_dir,
    update_last,
)
from autoassign.engine.data_setup import prepare_datasets
from autoassign.engine.device import resolve_device
from autoassign.engine.optim import WarmupStepSchedule, build_optimizer, scaled_lr
from autoassign.engine.resume import resume_position
from autoassign.engine.state import FAILED, FINISHED, RUNNING, STOPPED, TrainState
from autoassign.errors import CheckpointError, ConfigError, NonFiniteLossError
from autoassign.model.weights import load_state_dict_checked

__all__ = ["LOSS_TERMS", "Trainer", "resolve_device", "seed_everything"]

logger = logging.getLogger(__name__)

_THIS_MODEL = "the model of this config"

LOSS_TERMS = ("loss_pos", "loss_neg", "loss_center")
"""AutoAssign's loss terms: those of a detector that declares no ``loss_terms`` (FCOS declares
its own, see :mod:`autoassign.model.fcos`). The losses reported each step are ``loss`` (their
sum) and each term."""

# What a rank reports about its step (see Trainer._local_code), worst last.
_FINITE, _NONFINITE_LOSS, _NONFINITE_HEAD, _FORWARD_FAILED, _FORWARD_ERROR = 0, 1, 2, 3, 4

# The one collective of the model's training forward pass: the loss's normaliser all-reduce
# (``autoassign.model.loss``: number of boxes and prior mass, one [2] float32 tensor, after
# everything in the forward pass that can raise). A rank whose forward pass raised joins it
# in place of the loss (see Trainer._join_loss_collective).
_LOSS_COLLECTIVE_SIZE = 2


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation uses them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _HeadOutputGuard:
    """Forward hook on the head and on its center prior (training only): replaces NaN / inf
    outputs by zeros and remembers that it did, in :attr:`nonfinite` (a 0-dim bool tensor,
    no host sync).

    The losses' binary cross-entropy rejects NaN probabilities with an unrelated error (a
    device-side assert on CUDA), and it runs before the loss's all-reduce, so non-finite
    values are neutralised where they appear: the head's outputs, and the prior (computed
    from the ``mean`` / ``sigma`` parameters inside the loss, for the classes of this rank's
    boxes only). The hook never raises: under DDP the other ranks would wait in a
    collective. The forward pass goes on with finite values and the trainer decides, with
    all ranks, what to do with the step (it is never applied).
    """

    def __init__(self) -> None:
        self.nonfinite: torch.Tensor | None = None

    def reset(self) -> None:
        self.nonfinite = None

    def tripped(self) -> bool:
        return self.nonfinite is not None and bool(self.nonfinite)

    def __call__(self, module: nn.Module, inputs: Any, outputs: Any) -> Any:
        if not module.training:
            return None
        flags: list[torch.Tensor] = []

        def sanitise(tensor: torch.Tensor) -> torch.Tensor:
            if not tensor.is_floating_point():
                return tensor
            flags.append(~torch.isfinite(tensor).all())
            return torch.nan_to_num(tensor, nan=0.0, posinf=0.0, neginf=0.0)

        sanitised = _map_tensors(outputs, sanitise)
        if flags:
            tripped = torch.stack(flags).any()
            self.nonfinite = tripped if self.nonfinite is None else self.nonfinite | tripped
        return sanitised


class _ForwardFailure:
    """A training forward pass that raised on this rank: the error, and whether non-finite
    values explain it (head outputs or prior replaced, or parameters not finite)."""

    def __init__(self, error: Exception, nonfinite: bool):
        self.error, self.nonfinite = error, nonfinite

    def line(self) -> str:
        lines = str(self.error).strip().splitlines()
        return lines[0] if lines else type(self.error).__name__


def _map_tensors(value: Any, fn: Any) -> Any:
    """``value`` (nested tuples, lists, dicts of tensors) with ``fn`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, fn) for item in value)
    return value


class _EpochLossMeans:
    """Means of each loss over an epoch's steps, each over the steps where it was finite."""

    def __init__(self, names: Sequence[str] = ("loss", *LOSS_TERMS)) -> None:
        self.names = tuple(names)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, float]) -> None:
        for name in self.names:
            value = losses.get(name, math.nan)
            if math.isfinite(value):
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


class Trainer:
    """Trains one detector as ``config`` says, evaluating and checkpointing along the way.

    Args:
        config: the resolved experiment config.
        device: where to compute; ``None`` takes ``config.device``. ``"auto"`` / ``"cuda"``
            mean ``cuda:$LOCAL_RANK`` when CUDA is available (see :func:`resolve_device`);
            a ``torch.device`` is used as is.
        callbacks: extra callbacks, called after the built-in progress and metrics writers.
        output_dir: overrides ``config.output_dir`` (where rank 0 writes metrics and plots).
        checkpoint_dir: where checkpoints go; default ``output_dir / "checkpoints"``.
        progress_stream: where the progress display writes (default stdout); ``None`` with
            ``show_progress=False`` disables it.
        show_progress: add the built-in :class:`ProgressLogger`.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        device: str | torch.device | None = None,
        callbacks: Sequence[Callback] = (),
        output_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        progress_stream: TextIO | None = None,
        show_progress: bool = True,
    ):
        self.config = config
        self.requested_device = device if device is not None else config.device
        self.output_dir = Path(output_dir if output_dir is not None else config.output_dir)
        self.checkpoint_dir = (
            Path(checkpoint_dir) if checkpoint_dir is not None else self.output_dir / "checkpoints"
        )
        builtin: list[Callback] = []
        if show_progress:
            builtin.append(
                ProgressLogger(log_every_iters=config.train.log_every_iters, stream=progress_stream)
            )
        builtin.append(
            MetricsFileWriter(
                self.output_dir / "metrics.jsonl", log_every_iters=config.train.log_every_iters
            )
        )
        self.callbacks = CallbackList([*builtin, *callbacks])
        self._head_guard = _HeadOutputGuard()
        self._epoch_losses = _EpochLossMeans()
        self._built = False

    # ----------------------------------------------------------------------------------------
    # Building
    # ----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build datasets, model, optimizer, schedule and loaders (``fit`` calls it)."""
        if self._built:
            return
        from autoassign.data.loader import (
            build_eval_loader,
            build_train_loader,
            iterations_per_epoch,
        )
        from autoassign.eval import build_evaluator
        from autoassign.model import build_detector
        from autoassign.model.pretrained import fetch_on_main_process_first

        cfg = self.config
        self.rank = dist_utils.get_rank()
        self.world_size = dist_utils.get_world_size()
        self.device = resolve_device(self.requested_device)
        self.is_main = self.rank == 0

        # Named ImageNet weights first, so that a download failure stops the run at once: rank
        # 0 downloads, the other ranks wait, then all read the cache (before seeding: without
        # a checksum the download's check builds a ResNet, on rank 0 only).
        fetch_on_main_process_first(cfg.model.backbone.weights, depth=cfg.model.backbone.depth)
        self.train_dataset, self.val_dataset = prepare_datasets(
            cfg.data, scan_record=self.output_dir / "dataset_scan.json"
        )
        if self.train_dataset.num_classes != cfg.model.num_classes:
            raise ConfigError(
                f"model.num_classes is {cfg.model.num_classes} but the {cfg.data.format} "
                f"dataset at {cfg.data.root} has {self.train_dataset.num_classes} classes"
            )

        seed_everything(cfg.seed)
        model = build_detector(cfg.model).to(self.device)
        self.use_cuda_features = self.device.type == "cuda"
        if self.use_cuda_features and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.detector = model
        self.loss_terms = tuple(getattr(model, "loss_terms", LOSS_TERMS))
        self.loss_names = ("loss", *self.loss_terms)
        if hasattr(model, "head"):
            model.head.register_forward_hook(self._head_guard)
            if isinstance(getattr(model.head, "center_prior", None), nn.Module):
                model.head.center_prior.register_forward_hook(self._head_guard)
        if dist_utils.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model

        self.total_batch_size = cfg.data.batch_size * self.world_size
        self.peak_lr = scaled_lr(cfg.train, self.total_batch_size)
        self.optimizer = build_optimizer(self.detector, cfg.train, lr=self.peak_lr)
        full_epoch = iterations_per_epoch(self.train_dataset, cfg.data, world_size=self.world_size)
        limit = cfg.train.max_iters_per_epoch
        self.iters_per_epoch = min(full_epoch, limit) if limit is not None else full_epoch
        if self.iters_per_epoch == 0:
            raise ConfigError(
                f"data: the train split of {cfg.data.root} gives no full batch of "
                f"{cfg.data.batch_size} images per process on {self.world_size} process(es)"
            )
        self.schedule = WarmupStepSchedule.from_config(
            cfg.train, base_lr=self.peak_lr, iters_per_epoch=self.iters_per_epoch
        )
        self.max_epochs, _ = cfg.train.resolved_schedule()

        amp = cfg.train.amp if self.use_cuda_features else "none"
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.grad_scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

        self.train_loader = build_train_loader(
            self.train_dataset,
            cfg.data,
            cfg.model.input,
            seed=cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.eval_loader = build_eval_loader(
            self.val_dataset,
            cfg.model.input,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.evaluator = build_evaluator(self.val_dataset, cfg.eval)

        self.state = TrainState(
            max_epochs=self.max_epochs,
            iters_per_epoch=self.iters_per_epoch,
            max_iterations=self.max_epochs * self.iters_per_epoch,
            rank=self.rank,
            world_size=self.world_size,
            output_dir=self.output_dir,
            checkpoint_dir=self.checkpoint_dir,
            primary_metric=self.evaluator.primary_metric,
        )
        self._built = True

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train to the end of the schedule (or until a callback sets ``state.should_stop``).

        ``on_train_end`` is always called once ``on_train_start`` has been, with
        ``state.status`` ``"finished"``, ``"stopped"`` or ``"failed"`` (then ``state.error``
        holds the exception's message, and the exception propagates; an error in
        ``on_train_end`` itself is logged and does not hide it).

        Args:
            resume_from: a checkpoint directory (holding ``checkpoint.pt``) or file to
                continue from: weights, optimizer, schedule position, data order, RNG
                states. Written at another world size, it continues as
                :mod:`autoassign.engine.resume` describes.

        Returns:
            The final evaluation's metrics; ``{}`` when stopped early by a callback.

        Raises:
            NonFiniteLossError: a loss became NaN/inf (``train.on_nonfinite_loss: error``),
                on every rank.
            CheckpointError: ``resume_from`` cannot be continued here.
        """
        self.setup()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        state = self.state
        state.status, state.error, state.should_stop = RUNNING, None, False
        if self.is_main:
            write_resolved_config(self.config, self.output_dir / "config.yaml")
        try:
            self.callbacks.on_train_start(state)
            self.model.train()
            metrics = self._run_epochs()
        except BaseException as error:
            state.status, state.error = FAILED, str(error) or type(error).__name__
            self._end_after_failure()
            raise
        self.callbacks.on_train_end(state, metrics)
        return metrics

    def _run_epochs(self) -> dict[str, float]:
        """The epochs left; sets ``state.status`` to finished or stopped."""
        state = self.state
        metrics: dict[str, float] | None = None
        while state.epoch < self.max_epochs:
            if self._train_epoch():  # a callback asked to stop mid-epoch
                self._checkpoint(iteration_checkpoint_dir(self.checkpoint_dir, state.iteration))
                state.status = STOPPED
                return {}
            metrics = self._end_epoch()
            if state.should_stop and state.epoch < self.max_epochs:
                state.status = STOPPED
                return {}
        if metrics is None:  # resumed from a checkpoint written after the last epoch
            metrics = self.evaluate()
        self._write_final_outputs(metrics)
        state.status = FINISHED
        return metrics

    def _end_after_failure(self) -> None:
        """Tell every callback that the run failed; their own errors are only logged."""
        for callback in self.callbacks.callbacks:
            try:
                callback.on_train_end(self.state, {})
            except Exception:
                logger.exception("%s.on_train_end failed", type(callback).__name__)

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when a callback asked to stop."""
        state = self.state
        self._epoch_losses = _EpochLossMeans(self.loss_names)
        if state.batch_in_epoch >= self.iters_per_epoch:
            return False
        self.train_loader.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in self.train_loader:
            state.lr = self.schedule.apply(self.optimizer, state.iteration)
            losses = self._train_step(batch)
            self._epoch_losses.add(losses)
            state.iteration += 1
            state.batch_in_epoch += 1
            self.callbacks.on_step(state, losses)
            if state.batch_in_epoch >= self.iters_per_epoch:  # train.max_iters_per_epoch
                break
            if state.should_stop:
                return True
        return False

    def _end_epoch(self) -> dict[str, float]:
        """Evaluate and checkpoint as due, call ``on_epoch_end``, move to the next epoch;
        returns the evaluation metrics (or ``{}``)."""
        state = self.state
        completed = state.epoch + 1
        is_last = completed == self.max_epochs
        every = self.config.eval.every_epochs
        metrics: dict[str, float] = {}
        if is_last or (every > 0 and completed % every == 0):
            metrics = self.evaluate()
        state.epochs_completed = completed
        state.epoch_losses = self._epoch_losses.means()
        every_checkpoint = self.config.train.checkpoint_every_epochs
        if is_last or state.should_stop or completed % every_checkpoint == 0:
            self._checkpoint(epoch_checkpoint_dir(self.checkpoint_dir, completed))
        self.callbacks.on_epoch_end(state, metrics)
        state.epoch, state.batch_in_epoch = completed, 0
        return metrics

    def _train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; returns the losses averaged across ranks (and the gradient
        norm), as floats.

        Every rank reports whether its step is finite in one all-reduce, before backward; if
        any is not, every rank raises or skips (no backward, no optimizer step), as
        ``train.on_nonfinite_loss`` says, so DDP's collectives stay in step.
        """
        images = batch.images.to(self.device, non_blocking=True)
        if self.use_cuda_features and self.config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = [
            {
                "boxes": target["boxes"].to(self.device, non_blocking=True),
                "labels": target["labels"].to(self.device, non_blocking=True),
            }
            for target in batch.targets
        ]
        total, values, failure = self._forward(images, targets, batch.image_sizes)
        codes = dist_utils.max_per_rank(self._local_code(values, failure))
        reduced = dist_utils.mean_across_ranks(values).tolist()
        losses = dict(zip(self.loss_names, reduced))
        if bool(codes.any()):
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite_losses(codes, losses, failure)  # raises unless skipping

        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(total).backward()
        params = [p for p in self.detector.parameters() if p.grad is not None]
        if self.grad_scaler.is_enabled():
            self.grad_scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        losses["grad_norm"] = float(grad_norm)
        # With fp16 an infinite gradient is routine: the scaler skips the step and backs off.
        # The gradients are already averaged across ranks, so every rank decides alike.
        if not math.isfinite(losses["grad_norm"]) and not self.grad_scaler.is_enabled():
            self._nonfinite("gradient", losses)
            self.optimizer.zero_grad(set_to_none=True)
            return losses
        if self.config.train.grad_clip_norm is not None:
            nn.utils.clip_grads_with_norm_(params, self.config.train.grad_clip_norm, grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return losses

    def _forward(
        self, images: torch.Tensor, targets: list[dict], image_sizes: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor, _ForwardFailure | None]:
        """The training forward pass: ``(total loss, [1 + T] float32 loss values (total, then
        the detector's T loss terms), None)``, or ``(None, [1 + T] NaN, the failure)`` when it
        raised.

        Nothing is raised here: a rank whose forward pass fails (the loss rejecting NaN
        probabilities, a box op on NaN boxes, any other error) joins the collective the
        others are in (:meth:`_join_loss_collective`) and reports the failure in the step's
        flag; :meth:`_nonfinite_losses` then raises (or skips) on every rank alike.
        """
        self._head_guard.reset()
        try:
            with self._autocast():
                loss_dict = self.model(images, targets, image_sizes=image_sizes)
            terms = [loss_dict[name] for name in self.loss_terms]
            total = sum(terms)
            values = torch.stack([total.detach()] + [term.detach() for term in terms])
        except Exception as error:
            nonfinite = self._head_guard.tripped() or not self._parameters_finite()
            self._join_loss_collective()
            failed = torch.full((len(self.loss_names),), math.nan, device=self.device)
            return None, failed, _ForwardFailure(error, nonfinite)
        return total, values.float(), None

    def _join_loss_collective(self) -> None:
        """Take part, with NaN, in the loss's normaliser all-reduce that this rank's failed
        forward pass did not reach, so that the other ranks' next collective (the step's
        flag) meets this rank's. The NaN makes their losses non-finite too. A detector whose
        loss takes part in no collective (``loss_all_reduces = False``: FCOS) has none to join."""
        if dist_utils.is_distributed() and getattr(self.detector, "loss_all_reduces", True):
            stand_in = torch.full(
                (_LOSS_COLLECTIVE_SIZE,), math.nan, dtype=torch.float32, device=self.device
            )
            torch.distributed.all_reduce(stand_in)

    def _local_code(self, values: torch.Tensor, failure: _ForwardFailure | None) -> torch.Tensor:
        """This rank's verdict on its step, a 0-dim int64 tensor (no host sync): 0 finite,
        1 non-finite loss, 2 non-finite head outputs or prior (replaced by the hook), 3 forward
        pass failed on non-finite values, 4 forward pass failed otherwise."""
        if failure is not None:
            code = _FORWARD_FAILED if failure.nonfinite else _FORWARD_ERROR
            return torch.tensor(code, device=self.device)
        code = torch.where(torch.isfinite(values).all(), _FINITE, _NONFINITE_LOSS)
        if self._head_guard.nonfinite is not None:
            code = torch.where(self._head_guard.nonfinite, _NONFINITE_HEAD, code)
        return code

    def _nonfinite_losses(
        self, codes: torch.Tensor, losses: dict[str, float], failure: _ForwardFailure | None
    ) -> dict[str, float]:
        """Raise for (or count, when skipping) a step some rank found non-finite; ``codes``
        holds each rank's :meth:`_local_code`. Returns the losses to report (NaN when they
        were computed on replaced values).

        A forward pass that failed with finite values is an error whatever the policy: the
        rank where it failed raises it as is, the others a RuntimeError naming that rank."""
        per_rank = codes.tolist()
        worst = max(per_rank)
        ranks = _ranks([rank for rank, code in enumerate(per_rank) if code == worst])
        if worst == _FORWARD_ERROR:
            if failure is not None and not failure.nonfinite:
                raise failure.error
            raise RuntimeError(
                f"{self._where()}: the forward pass failed on rank(s) {ranks} (see the error "
                "there); this rank stops with it"
            )
        if worst == _NONFINITE_LOSS:
            what = f"loss on rank(s) {ranks}"
        else:
            losses = {name: math.nan for name in losses}
            what = f"head outputs or parameters on rank(s) {ranks}, so no finite loss"
            if failure is not None:
                what += f"; the forward pass failed: {failure.line()}"
        self._nonfinite(what, losses)
        return losses

    def _nonfinite(self, what: str, losses: dict[str, float]) -> None:
        """Raise :class:`NonFiniteLossError`, or count a skipped step (``skip`` policy).

        Every rank calls it for the same step (the verdict is agreed on first)."""
        if self.config.train.on_nonfinite_loss == "skip":
            self.state.skipped_steps += 1
            return
        shown = ", ".join(f"{name}={value:.6g}" for name, value in losses.items())
        raise NonFiniteLossError(
            f"{self._where()}: non-finite {what} ({shown}). {self._advice()}",
            iteration=self.state.iteration + 1,
            losses=losses,
        )

    def _where(self) -> str:
        """The step being run, counted from 1 as in the logs."""
        state = self.state
        return (
            f"iteration {state.iteration + 1} (epoch {state.epoch + 1}, batch "
            f"{state.batch_in_epoch + 1} of the epoch, lr {state.lr:.3g})"
        )

    @staticmethod
    def _advice() -> str:
        return (
            "Lower train.lr, raise train.warmup_iters, set train.grad_clip_norm, or set "
            "train.on_nonfinite_loss: skip"
        )

    def _parameters_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.detector.parameters())

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.autocast_dtype)

    # ----------------------------------------------------------------------------------------
    # Evaluation
    # ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Run the val split through the detector and score it with the dataset's evaluator.

        Every rank returns the same metrics (rank 0 computes them). Detections with a NaN or
        infinite box or score (weights gone non-finite) are left out, with a warning. Every
        rank takes the same collectives whatever its model produced: an error while running
        the detector on a rank is agreed on first, then raised on every rank (as is where it
        happened, as a RuntimeError naming that rank elsewhere).
        """
        self.setup()
        detector = self.detector
        was_training = detector.training
        detector.eval()
        try:
            self.evaluator.reset()
            error: Exception | None = None
            dropped = 0
            try:
                dropped = self._predict_val_split()
            except Exception as raised:
                error = raised
            flag = torch.tensor(int(error is not None), device=self.device)
            failed = dist_utils.max_per_rank(flag)
            if bool(failed.any()):
                if error is not None:
                    raise error
                ranks = _ranks([rank for rank, flag in enumerate(failed.tolist()) if flag])
                raise RuntimeError(
                    f"evaluation after epoch {self.state.epoch + 1}: running the detector "
                    f"failed on rank(s) {ranks} (see the error there); this rank stops with it"
                )
            if dropped:
                logger.warning(
                    "evaluation after epoch %d: left out %d detection(s) with a NaN or "
                    "infinite box or score on rank %d (non-finite weights?)",
                    self.state.epoch + 1,
                    dropped,
                    self.rank,
                )
            metrics = {name: float(value) for name, value in self.evaluator.evaluate().items()}
        finally:
            detector.train(was_training)
        return metrics

    def _predict_val_split(self) -> int:
        """Run this rank's share of the val split through the detector into the evaluator
        (no collective); returns how many non-finite detections were left out."""
        records = self.val_dataset.records
        dropped = 0
        for batch in self.eval_loader:
            images = batch.images.to(self.device, non_blocking=True)
            if self.use_cuda_features and self.config.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                outputs = self.detector(
                    images, image_sizes=batch.image_sizes, original_sizes=batch.original_sizes
                )
            predictions = []
            for index, output in zip(batch.indices, outputs):
                boxes, scores = output["boxes"].float().cpu(), output["scores"].float().cpu()
                labels = output["labels"].cpu()
                finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
                if not bool(finite.all()):
                    dropped += int((~finite).sum())
                    boxes, scores, labels = boxes[finite], scores[finite], labels[finite]
                file_name = records[index].file_name
                predictions.append(
                    {"file_name": file_name, "boxes": boxes, "scores": scores, "labels": labels}
                )
            self.evaluator.process(predictions)
        return dropped

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs (see :mod:`autoassign.engine.checkpoint`)."""
        state = self.state
        epoch, batch_in_epoch = self._resume_point()
        return {
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler.is_enabled() else None,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "iteration": state.iteration,
            "skipped_steps": state.skipped_steps,
            "world_size": self.world_size,
            "iters_per_epoch": self.iters_per_epoch,
            "batch_size": self.config.data.batch_size,
            "total_batch_size": self.total_batch_size,
            "peak_lr": self.peak_lr,
            "samples_seen": batch_in_epoch * self.total_batch_size,
            "rng": capture_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "class_names": list(self.train_dataset.class_names),
            "extra": dict(state.extra),
        }

    def _resume_point(self) -> tuple[int, int]:
        """``(epoch, batch_in_epoch)`` a resume continues from: the next epoch's start once
        the current one is completed, else the current position."""
        state = self.state
        if state.epochs_completed > state.epoch:
            return state.epochs_completed, 0
        return state.epoch, state.batch_in_epoch

    def save_checkpoint(self, directory: str | Path, *, as_last: bool = True) -> Path:
        """Rank 0 writes ``directory / "checkpoint.pt"`` atomically (and, with ``as_last``,
        makes ``checkpoint_dir / "last"`` hold it too); every rank waits for it.

        Returns:
            ``directory``.

        Raises:
            CheckpointError: on the other ranks when rank 0 failed to write (rank 0 raises
                its own error); every rank learns rank 0's outcome, none waits for it.
        """
        directory = Path(directory)
        error: Exception | None = None
        if self.is_main:
            try:
                save_checkpoint_dir(self.checkpoint_state(), directory)
                if as_last:
                    update_last(self.checkpoint_dir, directory)
            except Exception as raised:
                error = raised
        # In place of a barrier: rank 0's outcome, so that a failed write stops every rank.
        outcome = dist_utils.broadcast_object(
            None if error is None else f"{type(error).__name__}: {error}"
        )
        if error is not None:
            raise error
        if outcome is not None:
            raise CheckpointError(f"rank 0 failed to write the checkpoint {directory}: {outcome}")
        return directory

    def _checkpoint(self, directory: Path) -> None:
        self.save_checkpoint(directory)
        self.callbacks.on_checkpoint(self.state, directory)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, schedule position, RNG states and callback state.

        ``path`` is a checkpoint directory or file. A checkpoint written at another world size
        continues as :func:`autoassign.engine.resume.resume_position` says (a warning is
        logged); one that cannot be continued raises :class:`CheckpointError`.
        """
        self.setup()
        path = resolve_checkpoint_path(path)
        checkpoint = load_checkpoint(path, map_location="cpu")
        position = resume_position(
            checkpoint,
            world_size=self.world_size,
            batch_size=self.config.data.batch_size,
            iters_per_epoch=self.iters_per_epoch,
            source=path,
        )
        hint = "resume with the config the checkpoint was trained with"
        load_state_dict_checked(
            self.detector, checkpoint["model"], source=path, target=_THIS_MODEL, hint=hint
        )
        if "optimizer" in checkpoint:
            try:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
            except (RuntimeError, ValueError) as error:
                first_line = str(error).strip().splitlines()[0]
                raise CheckpointError(
                    f"{path}: its optimizer state does not fit {_THIS_MODEL} ({first_line}); {hint}"
                ) from None
        if checkpoint.get("grad_scaler") is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        if position.remapped:
            self._warn_remapped(path, checkpoint, position.iteration)
        state = self.state
        state.epoch, state.batch_in_epoch = position.epoch, position.batch_in_epoch
        state.epochs_completed = position.epoch
        state.iteration = position.iteration
        state.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        state.extra = dict(checkpoint.get("extra", {}))
        state.lr = self.schedule.lr(max(state.iteration - 1, 0))
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"])

    def _warn_remapped(self, path: Path, checkpoint: dict, iteration: int) -> None:
        if self.is_main:
            logger.warning(
                "%s: written on %s process(es) (%s iterations per epoch, peak lr %.4g); "
                "continuing on %d process(es) at iteration %d (%d iterations per epoch, peak "
                "lr %.4g by the linear scaling rule; warmup counts these iterations)",
                path,
                checkpoint.get("world_size"),
                checkpoint.get("iters_per_epoch", "?"),
                float(checkpoint.get("peak_lr", math.nan)),
                self.world_size,
                iteration,
                self.iters_per_epoch,
                self.peak_lr,
            )

    # ----------------------------------------------------------------------------------------
    # Final outputs
    # ----------------------------------------------------------------------------------------

    def _write_final_outputs(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        from autoassign.viz import write_center_prior_report, write_pr_curve_report

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "final_metrics.json").write_text(
            json.dumps(json_safe(metrics), indent=2) + "\n", encoding="utf-8"
        )
        if hasattr(getattr(self.detector, "head", None), "center_prior"):  # not FCOS
            write_center_prior_report(
                self.detector, self.train_dataset.class_names, self.output_dir
            )
        if self.evaluator.curves:
            write_pr_curve_report(
                self.evaluator.curves,
                self.output_dir,
                f"{self.val_dataset.format} {self.val_dataset.split}: precision-recall",
            )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(rank) for rank in ranks)
