"""Talking to a tracking server that may be down: MLflow's own retries off, ours bounded
by :data:`OUTAGE_WAIT_S`, and MLflow's printing kept quiet."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

logger = logging.getLogger(__name__)


OUTAGE_WAIT_S = 300.0

"""How long an unreachable tracking server is waited out before a call gives up: a trial's
start (finding or opening its run), every :class:`Tracker` call and the final flush of a
trial's buffered metrics all use this one bound."""


T = TypeVar("T")


def quiet_mlflow_output() -> None:
    """No "View run at <tracking URI>" lines from MLflow (they repeat on every run end, and
    the URI they print may carry credentials) and no progress bar per artifact copy."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_client_retries() -> None:
    """Make each MLflow HTTP call fail fast; :func:`with_retries` and the buffer retry instead.

    MLflow's own retries block a training step for minutes against a server that is down.
    """
    quiet_mlflow_output()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


@contextlib.contextmanager
def fail_fast_requests() -> Iterator[None]:
    """Inside the block, each MLflow HTTP call tries once and gives up within seconds.

    For code that must not block (Ray Tune's callbacks run in its event loop) and retries
    later itself. MLflow reads these variables on every request; they are put back after.
    """
    fast = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    saved = {name: os.environ.get(name) for name in fast}
    os.environ.update(fast)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_retries(call: Callable[[], T], *, what: str, timeout: float = OUTAGE_WAIT_S) -> T:
    """``call()``, retried with backoff for up to ``timeout`` seconds on any error."""
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            return call()
        except Exception as error:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("MLflow %s failed (%s); retrying in %.0f s", what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
