"""What ``--resume`` needs: the sweep's record, the storage it ran with, whether Ray Tune's
state is there to restore, and new sweep ids for runs that start fresh."""

from __future__ import annotations

import time
import uuid
from typing import Any

from autoassign.errors import ConfigError
from orchestration.common.redaction import redact
from orchestration.definition.sweep_config import SweepConfig
from orchestration.running.locations import resolve_locations
from orchestration.running.sweep_record import LEADERBOARD, SweepRecord


def sweep_record(sweep: SweepConfig) -> SweepRecord:
    """The sweep's manifest and leaderboard: in its output folder, and in its storage too
    when the user chose one (``storage.path``), which outlives a Ray Job's head node."""
    from orchestration.running.storage import Storage, s3_endpoint

    shared = None
    if sweep.storage.path is not None:
        shared = Storage(sweep.storage.path.rstrip("/"), s3_endpoint(sweep.storage.endpoint_url))
    return SweepRecord(sweep.name, sweep.resolved_output_dir.resolve(), shared)


def adopt_recorded_storage(sweep: SweepConfig, manifest: dict[str, Any]) -> None:
    """Resume where the sweep keeps its Ray state: the manifest's storage root.

    A config that leaves ``storage.path`` at its default takes the recorded one (with its
    endpoint); one that names another storage is refused, since Ray Tune's state of the
    sweep is not there and a fresh start would rerun finished trials under the same id.
    """
    recorded = manifest.get("storage_root")
    if not recorded:
        return
    current = resolve_locations(sweep).storage_root
    if current == recorded.rstrip("/"):
        return
    if sweep.storage.path is None and "***" not in recorded:
        sweep.storage.path = recorded
        if sweep.storage.endpoint_url is None and manifest.get("storage_endpoint"):
            sweep.storage.endpoint_url = manifest["storage_endpoint"]
        print(f"resuming with the storage the sweep ran with: {recorded}")
        return
    raise ConfigError(
        f"--resume: sweep {manifest['sweep_id']} keeps its Ray state in {recorded} "
        f"(storage_root of its manifest), but storage.path is now {redact(current)}; "
        f"resume with storage.path={recorded}"
    )


def check_restorable(sweep: SweepConfig, manifest: dict[str, Any]) -> None:
    """ConfigError unless Ray Tune's state of the manifest's sweep is in the storage."""
    from ray import tune

    from orchestration.running.storage import Storage

    where = resolve_locations(sweep)
    if manifest.get("status") == "finished":
        raise ConfigError(
            f"--resume: sweep {manifest['sweep_id']} has already finished; its leaderboard is "
            f"{where.output_dir / LEADERBOARD}"
        )
    storage_path, filesystem = Storage(where.storage_root, where.storage_endpoint).ray_storage()
    experiment = f"{storage_path}/{manifest['sweep_id']}"
    try:
        restorable = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    except OSError as error:
        raise ConfigError(f"--resume: cannot read {redact(where.storage_root)}: {error}") from None
    if not restorable:
        raise ConfigError(
            f"--resume: sweep {manifest['sweep_id']} has no Ray Tune state under "
            f"{redact(where.storage_root)}/{manifest['sweep_id']} (the driver died before "
            "Tune saved any, or the storage was emptied); nothing can be resumed: run the "
            "sweep again without --resume"
        )


def new_sweep_id(name: str) -> str:
    """Unique per run of a sweep, so a rerun never overwrites Ray's state of an earlier one."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
