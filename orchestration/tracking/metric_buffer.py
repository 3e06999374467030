"""Metrics on their way to the tracking server: sent in batches every few seconds, kept while
the server is unreachable, and carried in checkpoints so that a killed worker loses none.

Sending every point as it is logged costs one request per epoch (and per logged step) for
every trial; a sweep of a thousand short trials spends more on those requests than on
training. So points wait in :class:`MetricBuffer` until the oldest has waited
``flush_every_s`` seconds (``tracking.flush_every_s``), and the end of the run sends the rest.

A point still waiting when its worker is killed is not lost: whoever writes a checkpoint
stores the waiting points in it (:meth:`MetricBuffer.save_pending`), and a worker restored
from that checkpoint sends them (:func:`read_pending`) unless the run already holds them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestration.tracking.retries import OUTAGE_WAIT_S

logger = logging.getLogger(__name__)

MAX_BUFFERED_POINTS = 200_000
"""Metric points kept while the server is unreachable; beyond this the oldest are dropped
(and a warning says how many)."""

PENDING_FILE = "mlflow_pending_metrics.json"
"""The file in a checkpoint folder holding the points not yet sent when it was written."""


@dataclass
class MetricBuffer:
    """Metrics waiting to reach the server; sent in batches, kept while sending fails.

    ``flush_every_s``: how long a point may wait before :meth:`flush_if_due` sends everything
    waiting (0: at once, one request per call that added points).
    """

    client: Any
    run_id: str
    flush_every_s: float = 0.0
    pending: list[Any] = field(default_factory=list)
    dropped: int = 0
    last_error: str | None = None
    _oldest_added: float | None = None
    """``time.monotonic()`` when the oldest waiting point was added (None: nothing waits)."""

    def add(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        added = [
            Metric(key, float(value), now, int(step))
            for key, value in metrics.items()
            if value is not None
        ]
        self.extend(added)

    def extend(self, points: list[Any]) -> None:
        """Queue ready-made ``mlflow.entities.Metric`` points (their timestamps kept)."""
        if not points:
            return
        if self._oldest_added is None:
            self._oldest_added = time.monotonic()
        self.pending.extend(points)
        overflow = len(self.pending) - MAX_BUFFERED_POINTS
        if overflow > 0:
            del self.pending[:overflow]
            self.dropped += overflow
            logger.warning("MLflow unreachable: dropped %d oldest metric points", self.dropped)

    def flush_if_due(self) -> bool:
        """Send what waits once its oldest point has waited ``flush_every_s``; True when
        nothing is left waiting."""
        if not self.pending:
            return True
        waited = time.monotonic() - (self._oldest_added or 0.0)
        return self.flush() if waited >= self.flush_every_s else False

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
        self._oldest_added = None
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

    def save_pending(self, checkpoint_dir: str | Path) -> None:
        """Write the waiting points into ``checkpoint_dir`` (:data:`PENDING_FILE`), for a
        worker restored from that checkpoint to send; an empty list when nothing waits."""
        rows = [[m.key, m.value, m.timestamp, m.step] for m in self.pending]
        (Path(checkpoint_dir) / PENDING_FILE).write_text(
            json.dumps({"run_id": self.run_id, "points": rows})
        )


def read_pending(checkpoint_dir: str | Path, run_id: str) -> list[Any]:
    """The points a checkpoint carried for ``run_id`` (none from a checkpoint written before
    this file existed, or for another run), as ``mlflow.entities.Metric``."""
    from mlflow.entities import Metric

    path = Path(checkpoint_dir) / PENDING_FILE
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
        if saved.get("run_id") != run_id:
            return []
        return [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in saved["points"]]
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("%s: unreadable, its metric points are not logged: %s", path, error)
        return []
