"""A sweep told to stop (SIGTERM) hands back what its trials reserved on the Ray cluster.

``ray job stop``, the Jobs API, ``docker stop`` and a batch system all stop a sweep with
SIGTERM (Ray's job supervisor follows with SIGKILL 3 s later). The driver then dies at
once, and its trials' Tune actors, Train controllers and workers with it; but a placement
group that a Train controller had reserved for its worker group can outlive them: seen on
Ray 2.60 with a job stopped while its one trial's worker was starting, its one-CPU group
stayed CREATED after the job was STOPPED, and the next two-worker sweep on the two-CPU
cluster never got its workers. So on SIGTERM the driver removes every placement group of
its own Ray job, and keeps removing the ones its trials' controllers create again until the
process is gone, while it goes on as it would have (``ray.init``'s handler exits). This
narrows the window; it cannot close it: a controller that outlives the driver by a moment
can still reserve a group that nothing removes (Ray's own clean-up of a dead job's groups
did not, in the case above).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

LIVE_STATES = ("PENDING", "PREPARED", "CREATED", "RESCHEDULING")


def created_by_job(placement_group_id: str, job_id: str) -> bool:
    """Whether a placement group (hex id) was created in the Ray job ``job_id`` (hex).

    Ray's ids carry their job: a placement group id is its unique bytes followed by the
    4-byte id of the job that created it (Ray's id specification; ``PlacementGroupID.of``).
    """
    return len(placement_group_id) > len(job_id) and placement_group_id.endswith(job_id)


def release_placement_groups(ray: Any) -> list[str]:
    """Remove every live placement group of this driver's Ray job; returns their ids."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job_id = ray.get_runtime_context().get_job_id()
    removed = []
    for group_id, group in ray.util.placement_group_table().items():
        if group["state"] in LIVE_STATES and created_by_job(group_id, job_id):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            removed.append(group_id)
    return removed


def keep_releasing(ray: Any, every_s: float = 0.05) -> None:
    """Release the job's placement groups every ``every_s`` seconds until Ray is gone."""
    while True:
        time.sleep(every_s)
        try:
            release_placement_groups(ray)
        except Exception:  # Ray shut down, or the process is ending
            return


@contextlib.contextmanager
def released_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM first releases the job's placement groups (see the module
    docstring), then calls the handler it replaced (or ends the process by the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return

    def handler(signum, frame):
        import ray

        try:
            removed = release_placement_groups(ray)
            logger.warning("stopped: released %d placement group(s) of the sweep", len(removed))
        except Exception as error:  # dying anyway: say why nothing was released
            logger.warning("stopped: could not release the sweep's placement groups: %s", error)
        else:
            # A Train controller whose group was removed starts its worker group again at
            # once (seen within 0.2 s); keep releasing until this process is gone.
            threading.Thread(target=keep_releasing, args=(ray,), daemon=True).start()
        if callable(previous):  # ray.init's own: sys.exit(SIGTERM), unwinding the sweep
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
