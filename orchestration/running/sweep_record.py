"""A sweep's own record: its manifest and leaderboard, and the lock on its output folder.

The manifest (``<output_dir>/manifest.json``) says which run of the sweep the folder belongs
to (its sweep id, parent MLflow run, storage root) and how far it got (``running``,
``finishing``, ``finished``, ``interrupted``, ``failed``); ``--resume`` reads it. When the
sweep keeps its Ray state in a storage the user chose (``storage.path``, S3 or a shared
folder), the manifest and the leaderboard are written there too, under
``<storage>/sweeps/<name>/``: a Ray Job's output folder lives on the head node's throwaway
disk, while Ray Tune's state lives in that storage, so a restarted head can still resume.

Every write replaces the whole file at once (a rename locally; a single PUT on S3), so a
crash never leaves half a file.

Only one driver may use an output folder at a time: :class:`SweepLock` holds an exclusive
``flock`` on ``<output_dir>/.sweep.lock`` for the sweep's lifetime. The kernel drops the lock
with the process, so a driver that died never blocks the next one.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from autoassign.errors import ConfigError
from orchestration.running.storage import write_text_atomically

MANIFEST = "manifest.json"
LEADERBOARD = "leaderboard.json"
LOCK_FILE = ".sweep.lock"
SHARED_FOLDER = "sweeps"
"""Where under the storage root the manifest and leaderboard are mirrored, per sweep name."""


class SweepRecord:
    """The manifest and leaderboard of one sweep, local and (when set) in shared storage.

    ``shared``: a :class:`orchestration.running.storage.Storage` every node sees (None: local only).
    """

    def __init__(self, name: str, output_dir: Path, shared: Any | None = None):
        self.name = name
        self.output_dir = output_dir
        self.shared = shared

    @property
    def manifest_path(self) -> Path:
        return self.output_dir / MANIFEST

    @property
    def leaderboard_path(self) -> Path:
        return self.output_dir / LEADERBOARD

    def shared_uri(self, file: str) -> str | None:
        return self.shared.uri(self._shared_key(file)) if self.shared is not None else None

    def _shared_key(self, file: str) -> str:
        return f"{SHARED_FOLDER}/{self.name}/{file}"

    def _write(self, file: str, data: Any) -> None:
        text = json.dumps(data, indent=2) + "\n"
        write_text_atomically(self.output_dir / file, text)
        if self.shared is not None:
            self.shared.write_text(self._shared_key(file), text)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = time.time()
        self._write(MANIFEST, manifest)

    def write_leaderboard(self, rows: list[dict[str, Any]]) -> None:
        self._write(LEADERBOARD, rows)

    def read_manifest(self) -> dict[str, Any]:
        """The newest of the local and the shared manifest, for ``--resume``; ConfigError
        naming where it looked when there is none."""
        found = []
        local = self._parse(
            self.manifest_path.read_text(encoding="utf-8")
            if self.manifest_path.is_file()
            else None,
            str(self.manifest_path),
        )
        if local is not None:
            found.append(local)
        if self.shared is not None:
            uri = self.shared_uri(MANIFEST)
            shared = self._parse(self.shared.read_text(self._shared_key(MANIFEST)), uri)
            if shared is not None:
                found.append(shared)
        if not found:
            where = f"{self.manifest_path} does not exist"
            if self.shared is not None:
                where = f"neither {self.manifest_path} nor {self.shared_uri(MANIFEST)} exists"
            else:
                where += (
                    " (and storage.path is not set, so there is no shared copy to look at:"
                    " give the storage.path the sweep ran with)"
                )
            raise ConfigError(
                f"--resume: no sweep to resume: {where}; run sweep {self.name!r} without "
                "--resume first"
            )
        return max(found, key=lambda manifest: manifest.get("updated", 0.0))

    def _parse(self, text: str | None, where: str) -> dict[str, Any] | None:
        if text is None:
            return None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--resume: {where} is not a sweep manifest ({error})") from None
        if not isinstance(manifest, dict) or "sweep_id" not in manifest:
            raise ConfigError(f"--resume: {where} is not a sweep manifest (no sweep_id)")
        if manifest.get("name") != self.name:
            raise ConfigError(
                f"--resume: {where} is the manifest of sweep {manifest.get('name')!r}, "
                f"not of {self.name!r}"
            )
        return manifest


class SweepLock:
    """An exclusive lock on a sweep's output folder, held while the sweep runs.

    ``with SweepLock(folder) as lock:`` raises ConfigError (exit 2) naming the sweep id and
    pid of the driver that holds it; ``lock.record(sweep_id)`` tells later comers which
    sweep holds it, once that is known.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self._fd: int | None = None
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise ConfigError(self._in_use_message()) from None
        self._fd = fd
        self.record(None)

    def record(self, sweep_id: str | None) -> None:
        """Write who holds the lock into the lock file (read by a refused second driver)."""
        if self._fd is None:
            return
        holder = {
            "sweep_id": sweep_id or "(starting)",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self._started,
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _in_use_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            holder = {}
        who = (
            f"sweep {holder.get('sweep_id', '?')} (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started', '?')})"
        )
        return (
            f"{self.path.parent} is in use by {who}; wait for it to end, or give this sweep "
            "another name or output_dir"
        )

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
