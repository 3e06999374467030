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
with its checkpoint). Files under ``output_dir``:

    config.yaml            the resolved config
    metrics.jsonl          train losses every ``log_every_iters`` steps, eval metrics per epoch
    checkpoints/epoch_N.pt checkpoints/last.pt
    final_metrics.json     the last evaluation
    center_prior.png/json  the learned center priors per class
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from autoassign.config import ExperimentConfig
from autoassign.config_loading import write_resolved_config
from autoassign.engine import distributed as dist_utils
from autoassign.engine.callbacks import (
    Callback,
    CallbackList,
    MetricsFileWriter,
    ProgressLogger,
    json_safe,
)
from autoassign.engine.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from autoassign.engine.data_setup import prepare_datasets
from autoassign.engine.optim import WarmupStepSchedule, build_optimizer, scaled_lr
from autoassign.engine.state import TrainState
from autoassign.errors import CheckpointError, ConfigError, NonFiniteLossError

LOSS_TERMS = ("loss_pos", "loss_neg", "loss_center")


def resolve_device(name: str) -> torch.device:
    """``"auto"``: this process's CUDA device when CUDA is available, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but CUDA is not available")
    return torch.device("cuda", torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (model initialisation uses them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _NonFiniteHeadOutput(Exception):
    """Raised inside the forward pass when the head's outputs hold NaN or inf."""


def _check_head_outputs(module: nn.Module, inputs: Any, outputs: Any) -> None:
    """Forward hook on the head (training only): stop before the loss sees NaN or inf.

    The losses' binary cross-entropy rejects NaN probabilities with an unrelated error (a
    device-side assert on CUDA), so non-finite values are caught here, where they appear.
    """
    if not module.training:
        return
    tensors = [t for t in _flatten(outputs) if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        raise _NonFiniteHeadOutput


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _flatten(item)]
    return []


class Trainer:
    """Trains one detector as ``config`` says, evaluating and checkpointing along the way.

    Args:
        config: the resolved experiment config.
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
        callbacks: Sequence[Callback] = (),
        output_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        progress_stream: TextIO | None = None,
        show_progress: bool = True,
    ):
        self.config = config
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

        cfg = self.config
        self.rank = dist_utils.get_rank()
        self.world_size = dist_utils.get_world_size()
        self.device = resolve_device(cfg.device)
        self.is_main = self.rank == 0

        self.train_dataset, self.val_dataset = prepare_datasets(cfg.data)
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
        if hasattr(model, "head"):
            model.head.register_forward_hook(_check_head_outputs)
        if dist_utils.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model

        total_batch = cfg.data.batch_size * self.world_size
        self.peak_lr = scaled_lr(cfg.train, total_batch)
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
        )
        self._built = True

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def fit(self, resume_from: str | Path | None = None) -> dict[str, float]:
        """Train to the end of the schedule (or until a callback sets ``state.should_stop``).

        Args:
            resume_from: a checkpoint to continue from exactly (weights, optimizer, schedule
                position, data order, RNG states).

        Returns:
            The final evaluation's metrics; ``{}`` when stopped early by a callback.

        Raises:
            NonFiniteLossError: a loss became NaN/inf (``train.on_nonfinite_loss: error``).
        """
        self.setup()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        state = self.state
        if self.is_main:
            write_resolved_config(self.config, self.output_dir / "config.yaml")
        self.callbacks.on_train_start(state)

        self.model.train()
        metrics: dict[str, float] | None = None
        while state.epoch < self.max_epochs:
            stopped = self._train_epoch()
            if stopped:
                path = self.save_checkpoint(self.checkpoint_dir / "last.pt")
                self.callbacks.on_checkpoint(state, path)
                return {}
            metrics = self._end_epoch()
            if state.should_stop and state.epoch < self.max_epochs:
                return {}

        if metrics is None:  # resumed from a checkpoint written after the last epoch
            metrics = self.evaluate()
        self._write_final_outputs(metrics)
        self.callbacks.on_train_end(state, metrics)
        return metrics

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when a callback asked to stop."""
        state = self.state
        if state.batch_in_epoch >= self.iters_per_epoch:
            return False
        self.train_loader.batch_sampler.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
        for batch in self.train_loader:
            state.lr = self.schedule.apply(self.optimizer, state.iteration)
            losses = self._train_step(batch)
            state.iteration += 1
            state.batch_in_epoch += 1
            self.callbacks.on_step(state, losses)
            if state.batch_in_epoch >= self.iters_per_epoch:  # train.max_iters_per_epoch
                break
            if state.should_stop:
                return True
        return False

    def _end_epoch(self) -> dict[str, float]:
        """Evaluate and checkpoint as due; returns the evaluation metrics (or ``{}``)."""
        state = self.state
        finished_epoch = state.epoch
        is_last = finished_epoch + 1 == self.max_epochs
        every = self.config.eval.every_epochs
        metrics: dict[str, float] = {}
        if is_last or (every > 0 and (finished_epoch + 1) % every == 0):
            metrics = self.evaluate()
        # The state a resume continues from: the next epoch, from its first batch.
        state.epoch, state.batch_in_epoch = finished_epoch + 1, 0
        every_ckpt = self.config.train.checkpoint_every_epochs
        if is_last or state.should_stop or (finished_epoch + 1) % every_ckpt == 0:
            path = self.save_checkpoint(self.checkpoint_dir / f"epoch_{finished_epoch + 1}.pt")
            self._copy_as_last(path)
            self.callbacks.on_checkpoint(state, path)
        state.epoch = finished_epoch
        self.callbacks.on_epoch_end(state, metrics)
        state.epoch = finished_epoch + 1
        return metrics

    def _train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step; returns the losses averaged across ranks (and the gradient
        norm), as floats. A non-finite loss or gradient raises or skips the step, as
        ``train.on_nonfinite_loss`` says."""
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
        try:
            with self._autocast():
                loss_dict = self.model(images, targets, image_sizes=batch.image_sizes)
        except _NonFiniteHeadOutput:
            losses = {name: math.nan for name in ("loss", *LOSS_TERMS)}
            if dist_utils.is_distributed():  # the other ranks may be past the forward pass
                raise NonFiniteLossError(
                    f"{self._where()}: non-finite head outputs on rank {self.rank}. "
                    f"{self._advice()}",
                    iteration=self.state.iteration + 1,
                    losses=losses,
                ) from None
            self._nonfinite("loss (the head outputs hold NaN or inf)", losses)
            return losses
        except RuntimeError as error:
            if self._parameters_finite():
                raise
            raise NonFiniteLossError(
                f"{self._where()}: the model's parameters are no longer finite and the forward "
                f"pass failed ({str(error).strip().splitlines()[0]}). {self._advice()}",
                iteration=self.state.iteration + 1,
                losses={},
            ) from None
        total = sum(loss_dict[name] for name in LOSS_TERMS)
        values = torch.stack([total.detach()] + [loss_dict[n].detach() for n in LOSS_TERMS])
        reduced = dist_utils.mean_across_ranks(values.float()).tolist()
        losses = dict(zip(("loss", *LOSS_TERMS), reduced))

        finite = all(math.isfinite(value) for value in reduced)
        if not finite:
            self._nonfinite("loss", losses)  # raises unless skipping
        self.optimizer.zero_grad(set_to_none=True)
        # Even a skipped step runs backward, so DDP's gradient reduction stays in step on all
        # ranks; its gradients are then dropped.
        self.grad_scaler.scale(total).backward()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return losses

        params = [p for p in self.detector.parameters() if p.grad is not None]
        if self.grad_scaler.is_enabled():
            self.grad_scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.get_total_norm([p.grad for p in params])
        losses["grad_norm"] = float(grad_norm)
        # With fp16 an infinite gradient is routine: the scaler skips the step and backs off.
        if not math.isfinite(losses["grad_norm"]) and not self.grad_scaler.is_enabled():
            self._nonfinite("gradient", losses)
            self.optimizer.zero_grad(set_to_none=True)
            return losses
        if self.config.train.grad_clip_norm is not None:
            nn.utils.clip_grads_with_norm_(params, self.config.train.grad_clip_norm, grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        return losses

    def _nonfinite(self, what: str, losses: dict[str, float]) -> None:
        """Raise :class:`NonFiniteLossError`, or count a skipped step (``skip`` policy)."""
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

        Every rank returns the same metrics.
        """
        self.setup()
        detector = self.detector
        was_training = detector.training
        detector.eval()
        self.evaluator.reset()
        records = self.val_dataset.records
        for batch in self.eval_loader:
            images = batch.images.to(self.device, non_blocking=True)
            if self.use_cuda_features and self.config.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                outputs = detector(
                    images, image_sizes=batch.image_sizes, original_sizes=batch.original_sizes
                )
            self.evaluator.process(
                [
                    {
                        "file_name": records[index].file_name,
                        "boxes": output["boxes"].float().cpu(),
                        "scores": output["scores"].float().cpu(),
                        "labels": output["labels"].cpu(),
                    }
                    for index, output in zip(batch.indices, outputs)
                ]
            )
        metrics = {name: float(value) for name, value in self.evaluator.evaluate().items()}
        detector.train(was_training)
        return metrics

    # ----------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything a resume needs (see :mod:`autoassign.engine.checkpoint`)."""
        state = self.state
        return {
            "model": self.detector.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler.is_enabled() else None,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "iteration": state.iteration,
            "skipped_steps": state.skipped_steps,
            "rng": capture_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "class_names": list(self.train_dataset.class_names),
            "extra": dict(state.extra),
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Rank 0 writes the checkpoint atomically; every rank waits for it."""
        path = Path(path)
        if self.is_main:
            save_checkpoint(self.checkpoint_state(), path)
        dist_utils.barrier()
        return path

    def _copy_as_last(self, path: Path) -> None:
        """Make ``last.pt`` the same checkpoint as ``path``, atomically."""
        if self.is_main:
            last = path.parent / "last.pt"
            tmp = path.parent / ".last.pt.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:  # file systems without hard links
                shutil.copyfile(path, tmp)
            os.replace(tmp, last)
        dist_utils.barrier()

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights, optimizer, schedule position, RNG states and callback state."""
        self.setup()
        checkpoint = load_checkpoint(path, map_location="cpu")
        try:
            self.detector.load_state_dict(checkpoint["model"])
            if "optimizer" in checkpoint:
                self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"{path}: does not fit the model of this config ({first_line}); resume with "
                "the config the checkpoint was trained with"
            ) from None
        if checkpoint.get("grad_scaler") is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        state = self.state
        state.epoch = int(checkpoint["epoch"])
        state.batch_in_epoch = int(checkpoint.get("batch_in_epoch", 0))
        state.iteration = int(checkpoint["iteration"])
        state.skipped_steps = int(checkpoint.get("skipped_steps", 0))
        state.extra = dict(checkpoint.get("extra", {}))
        state.lr = self.schedule.lr(max(state.iteration - 1, 0))
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"])

    # ----------------------------------------------------------------------------------------
    # Final outputs
    # ----------------------------------------------------------------------------------------

    def _write_final_outputs(self, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        from autoassign.viz import write_center_prior_report

        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "final_metrics.json").write_text(
            json.dumps(json_safe(metrics), indent=2) + "\n", encoding="utf-8"
        )
        write_center_prior_report(self.detector, self.train_dataset.class_names, self.output_dir)
