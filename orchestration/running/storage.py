"""Where a sweep keeps its checkpoints and small files: a local folder or S3, one interface.

    store = Storage.from_config(sweep.storage, default=Path("runs/demo/ray"))
    store.write_text("demo-20261202-a1b2/manifest.json", text)
    path, filesystem = store.ray_storage()      # for ray.train / ray.tune RunConfig
    check_storage_reaches_every_node(sweep.storage, store.root)  # after ray.init

S3 goes through boto3 (endpoint, region and credentials from the standard AWS environment
and config files, the ``standard`` retry mode); Ray gets an explicit
``pyarrow.fs.S3FileSystem`` pointing at the same endpoint (MinIO included).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from autoassign.errors import ConfigError
from orchestration.definition.sweep_config import StorageConfig


def s3_endpoint(configured: str | None) -> str | None:
    """The S3 endpoint to use: the config's, else the standard AWS environment variables."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one
    (the temporary name carries the pid, so two writers never share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Storage:
    """A root (local folder or ``s3://bucket/prefix``) under which relative keys live."""

    root: str
    endpoint_url: str | None = None

    @staticmethod
    def from_config(config: StorageConfig, *, default: Path) -> Storage:
        root = config.path if config.path is not None else str(default.resolve())
        return Storage(root=root.rstrip("/"), endpoint_url=s3_endpoint(config.endpoint_url))

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def bucket(self) -> str:
        return urlparse(self.root).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.root).path.lstrip("/")

    def uri(self, key: str = "") -> str:
        """The full URI (or absolute local path) of ``key``."""
        return f"{self.root}/{key}" if key else self.root

    # ---- Ray --------------------------------------------------------------------------------

    def ray_storage(self) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``.

        Local: the absolute folder and None. S3: ``bucket/prefix`` and a
        ``pyarrow.fs.S3FileSystem`` (Ray then never guesses the endpoint from the URI).
        """
        if not self.is_s3:
            return self.root, None
        from pyarrow import fs

        options: dict[str, Any] = {}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            options["endpoint_override"] = parsed.netloc or parsed.path
            options["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        path = f"{self.bucket}/{self.prefix}".rstrip("/")
        return path, fs.S3FileSystem(**options)

    # ---- small files ------------------------------------------------------------------------

    def write_text(self, key: str, text: str) -> str:
        """Write ``text`` at ``key`` (replacing it atomically on local disk); returns its URI."""
        if self.is_s3:
            self._s3().put_object(Bucket=self.bucket, Key=self._key(key), Body=text.encode())
        else:
            write_text_atomically(Path(self.root) / key, text)
        return self.uri(key)

    def read_text(self, key: str) -> str | None:
        """The text at ``key``, or None when there is nothing there."""
        if not self.is_s3:
            path = Path(self.root) / key
            return path.read_text(encoding="utf-8") if path.is_file() else None
        client = self._s3()
        try:
            body = client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        return body.decode("utf-8")

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every file under ``prefix``."""
        if not self.is_s3:
            base = Path(self.root)
            start = base / prefix
            if not start.exists():
                return []
            return sorted(str(p.relative_to(base)) for p in start.rglob("*") if p.is_file())
        client = self._s3()
        keys: list[str] = []
        paginator = client.get_paginator("list_objects_v2")
        full_prefix = self._key(prefix)
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                keys.append(item["Key"][len(self.prefix) :].lstrip("/"))
        return sorted(keys)

    def download_file(self, uri: str, destination: Path) -> Path:
        """Copy the file at ``uri`` (``s3://bucket/key`` or a local path) to ``destination``."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            self._s3().download_file(parsed.netloc, parsed.path.lstrip("/"), str(destination))
        else:
            shutil.copyfile(uri, destination)
        return destination

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}".lstrip("/") if self.prefix else key

    def _s3(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(retries={"mode": "standard", "max_attempts": 5}),
        )


# ---- a cluster of several nodes -------------------------------------------------------------


def storage_problem(root: str, *, shared: bool, configured: bool, nodes: int) -> str | None:
    """Why checkpoints under ``root`` would not reach every node of a cluster of ``nodes``
    live nodes, or None when they do.

    On one node every process writes and reads the same disk. On more, each Train worker
    writes its checkpoints where it runs, and a restarted trial reads them on whichever
    node it lands: a local folder only works where every node mounts it (``shared``).
    ``configured``: whether ``storage.path`` was set (else ``root`` is its default).
    """
    if nodes <= 1 or shared or root.startswith("s3://"):
        return None
    what = (
        f"storage.path {root}"
        if configured
        else f"storage.path is not set, so checkpoints would go to {root}, which"
    )
    return (
        f"{what} is a local folder and the cluster has {nodes} nodes: a local folder on this "
        "machine is not where the other nodes write their checkpoints, so a trial restarted "
        "on another node could not find them; use storage.path: s3://BUCKET/PREFIX, or set "
        f"storage.shared: true if {root} is on a filesystem every node mounts (NFS)"
    )


def check_storage_reaches_every_node(config: StorageConfig, root: str) -> None:
    """Refuse (:class:`ConfigError`, exit 2) a local ``root`` on a Ray cluster of more than
    one live node unless ``storage.shared`` says every node mounts it. Call it after
    ``ray.init`` and before any trial starts."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    problem = storage_problem(
        root, shared=config.shared, configured=config.path is not None, nodes=nodes
    )
    if problem is not None:
        raise ConfigError(problem)
