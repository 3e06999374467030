"""Metrics kept in memory while the tracking server is unreachable, sent when it answers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestration.tracking.retries import OUTAGE_WAIT_S

logger = logging.getLogger(__name__)

MAX_BUFFERED_POINTS = 200_000

"""Metric points kept while the server is unreachable; beyond this the oldest are dropped
(and a warning says how many)."""


@dataclass
class MetricBuffer:
    """Metrics waiting to reach the server; sent in batches, kept while sending fails."""

    client: Any
    run_id: str
    pending: list[Any] = field(default_factory=list)
    dropped: int = 0
    last_error: str | None = None

    def add(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                continue
            self.pending.append(Metric(key, float(value), now, int(step)))
        overflow = len(self.pending) - MAX_BUFFERED_POINTS
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
            logger.warning("MLflow unreachable: dropped %d oldest metric points", self.dropped)

    def flush(self) -> bool:
        """Try once to send everything pending; True when nothing is left."""
        while self.pending:
            chunk = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception as error:
                if self.last_error is None:
                    logger.warning("MLflow unreachable (%s); keeping metrics to retry", error)
                self.last_error = str(error)
                return False
            del self.pending[: len(chunk)]
        if self.last_error is not None:
            logger.warning("MLflow reachable again; buffered metrics sent")
            self.last_error = None
        return True

    def close(self, *, timeout: float = OUTAGE_WAIT_S) -> None:
        """Flush, retrying for up to ``timeout`` seconds; raise if the server never answers."""
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"MLflow unreachable for {timeout:.0f} s at the end of the run; "
                    f"{len(self.pending)} metric points not logged ({self.last_error})"
                )
            time.sleep(2.0)
