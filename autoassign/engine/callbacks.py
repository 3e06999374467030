"""Training callbacks: the hooks the loop calls, and the built-in progress and metrics writers.

Reporting to Ray or logging to MLflow plugs in as another :class:`Callback`; the loop knows
neither. Callbacks run on every rank (a Ray report must happen on all of them); those that
write files check ``state.is_main_process``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from autoassign.engine.state import TrainState


class Callback:
    """Base class: override the hooks you need. ``losses`` and ``metrics`` are plain floats.

    - ``on_train_start(state)``: after building and resuming, before the first step.
    - ``on_step(state, losses)``: after every optimizer step (also skipped ones, whose losses
      are not finite); ``losses`` are averaged across ranks: ``loss`` (the total) and each term.
    - ``on_epoch_end(state, metrics)``: after each epoch; ``metrics`` are the evaluation's
      (empty when this epoch was not evaluated; ``state.primary_metric`` names the headline
      one); ``state.epoch_losses`` holds the epoch's mean training losses.
    - ``on_checkpoint(state, path)``: after a checkpoint was written; ``path`` is the
      checkpoint's directory (e.g. ``checkpoints/epoch_0004``, holding ``checkpoint.pt``;
      rank 0 writes, every rank is told).
    - ``on_train_end(state, metrics)``: at the end, with the final evaluation (``{}`` when
      stopped or failed); always called once ``on_train_start`` was, ``state.status`` says
      how the run ended and ``state.error`` why it failed.

    ``state.epoch`` is the epoch being trained (``on_step``) or just finished (``on_epoch_end``
    and an epoch end's ``on_checkpoint``); ``state.epochs_completed`` counts finished epochs.
    """

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_step(self, state: TrainState, losses: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        pass

    def on_train_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback's hook in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_train_start(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback.on_train_start(state)

    def on_step(self, state: TrainState, losses: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_step(state, losses)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(state, metrics)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(state, path)

    def on_train_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_train_end(state, metrics)


class LossWindow:
    """Running means of the finite losses seen since the last :meth:`pop`."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, losses: dict[str, float]) -> None:
        if not all(math.isfinite(value) for value in losses.values()):
            return
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = (
            {name: total / self.count for name, total in self.sums.items()} if self.count else {}
        )
        self.sums, self.count = {}, 0
        return means


class IterationTimer:
    """Seconds per iteration, measured between calls (so data loading counts)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.total_time = 0.0
        self.total_steps = 0
        self.window_time = 0.0
        self.window_steps = 0

    def tick(self) -> None:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        self.total_time += elapsed
        self.total_steps += 1
        self.window_time += elapsed
        self.window_steps += 1

    def pop_window(self) -> float:
        """Mean seconds per iteration since the last call (0 if none)."""
        mean = self.window_time / self.window_steps if self.window_steps else 0.0
        self.window_time, self.window_steps = 0.0, 0
        return mean

    @property
    def mean(self) -> float:
        return self.total_time / self.total_steps if self.total_steps else 0.0


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressLogger(Callback):
    """Progress on rank 0: a live status line on a terminal, plain log lines otherwise.

    The line shows epoch, iteration, iterations per second, the time left (ETA, from the mean
    iteration time of this run) and the losses averaged since the last line.
    """

    def __init__(self, *, log_every_iters: int, stream: TextIO | None = None):
        self.log_every_iters = log_every_iters
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.window = LossWindow()
        self.timer = IterationTimer()
        self._last_draw = 0.0

    def on_train_start(self, state: TrainState) -> None:
        self.timer.reset()
        self.started = time.perf_counter()
        if state.is_main_process:
            self._write_line(
                f"training {state.max_epochs} epochs x {state.iters_per_epoch} iterations "
                f"({state.world_size} process(es)), starting at iteration {state.iteration}"
            )

    def on_step(self, state: TrainState, losses: dict[str, float]) -> None:
        self.timer.tick()
        self.window.add(losses)
        if not state.is_main_process:
            return
        if self.interactive:
            now = time.perf_counter()
            if now - self._last_draw > 0.25 or state.iteration == state.max_iterations:
                self._last_draw = now
                self.stream.write("\r" + self._status(state, losses) + "\033[K")
                self.stream.flush()
        if state.iteration % self.log_every_iters == 0:
            means = self.window.pop()
            if not self.interactive:
                self._write_line(self._status(state, means))

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if state.is_main_process and metrics:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            self._write_line(f"epoch {state.epoch + 1}/{state.max_epochs} evaluation: {shown}")
        self.timer.last = time.perf_counter()  # evaluation time is not iteration time

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        if state.is_main_process:
            self._write_line(f"checkpoint written: {path}")

    def on_train_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if state.is_main_process:
            started = getattr(self, "started", time.perf_counter())
            elapsed = format_duration(time.perf_counter() - started)
            ended = "finished" if state.status in ("running", "finished") else state.status
            self._write_line(f"training {ended} at iteration {state.iteration} in {elapsed}")

    def _status(self, state: TrainState, losses: dict[str, float]) -> str:
        seconds_per_iter = self.timer.mean
        speed = f"{1.0 / seconds_per_iter:.2f} it/s" if seconds_per_iter > 0 else "- it/s"
        eta = format_duration(seconds_per_iter * (state.max_iterations - state.iteration))
        shown = " ".join(f"{name} {value:.4f}" for name, value in losses.items())
        return (
            f"epoch {state.epoch + 1}/{state.max_epochs} "
            f"iter {state.iteration}/{state.max_iterations} {speed} ETA {eta} "
            f"lr {state.lr:.3g} {shown}"
        )

    def _write_line(self, text: str) -> None:
        prefix = "\r\033[K" if self.interactive else ""
        self.stream.write(prefix + text + "\n")
        self.stream.flush()


class MetricsFileWriter(Callback):
    """Appends JSON lines to ``metrics.jsonl`` on rank 0.

    ``{"type": "start", "epoch", "iteration"}`` when training starts (again after a resume),
    ``{"type": "train", "epoch", "iteration", "lr", "seconds_per_iter", "skipped_steps",
    <loss means over the interval>}`` every ``log_every_iters`` steps, and
    ``{"type": "eval", "epoch", "iteration", "eval_and_checkpoint_seconds", <metrics>}`` after
    each evaluated epoch (``epoch`` there is the number of epochs completed;
    ``eval_and_checkpoint_seconds`` the wall time from the epoch's last step to the record).
    Every record has ``"time"``: when it was written, in seconds since the Unix epoch, so a
    run's setup, training and evaluation time can be read from the file.
    """

    def __init__(self, path: str | Path, *, log_every_iters: int):
        self.path = Path(path)
        self.log_every_iters = log_every_iters
        self.window = LossWindow()
        self.timer = IterationTimer()

    def on_train_start(self, state: TrainState) -> None:
        self.timer.reset()
        if state.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "start", "epoch": state.epoch + 1, "iteration": state.iteration})

    def on_step(self, state: TrainState, losses: dict[str, float]) -> None:
        self.timer.tick()
        self.window.add(losses)
        if state.iteration % self.log_every_iters == 0:
            record = {
                "type": "train",
                "epoch": state.epoch + 1,
                "iteration": state.iteration,
                "lr": state.lr,
                "seconds_per_iter": self.timer.pop_window(),
                "skipped_steps": state.skipped_steps,
                **self.window.pop(),
            }
            if state.is_main_process:
                self._append(record)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        since_last_step, self.timer.last = now - self.timer.last, now
        if state.is_main_process and metrics:
            record = {
                "type": "eval",
                "epoch": state.epoch + 1,
                "iteration": state.iteration,
                "eval_and_checkpoint_seconds": round(since_last_step, 3),
            }
            self._append({**record, **metrics})

    def _append(self, record: dict) -> None:
        record = {**record, "time": round(time.time(), 3)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")


def json_safe(values: dict) -> dict:
    """``values`` with NaN / infinite floats as None (JSON has no NaN; readers choke on it)."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in values.items()
    }
