"""Real services for the integration tests, one of each per test session.

- an S3 server on 127.0.0.1 (moto's server mode) with a test bucket;
- a PostgreSQL 15 server on 127.0.0.1 (Debian's binaries, run as the ``postgres`` system user
  when the session is root, since ``initdb`` refuses root), the tracking store of:
- an ``mlflow server`` process on 127.0.0.1 started with the backend-store and artifact flags
  that ``docker-compose.yml`` gives the stack's ``mlflow`` service, artifacts on that S3,
  restartable on the same port for the outage test (SQLite when no PostgreSQL is installed;
  ``test_stack_tracking.py`` then skips, or fails under ``.ci/run``);
- a Ray head started with ``ray start`` (2 CPUs, dashboard and Jobs API on 127.0.0.1); sweeps
  reach it through ``RAY_ADDRESS``, Ray Jobs through its dashboard URL. It runs on a "cluster
  python" that has the project installed as the Docker image has it (not editable), so a job
  imports only the code it uploads or the installed copy, never the checkout.

Starting Ray (~25 s) and MLflow (~17 s) once per session keeps the suite within CI's time.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.compose_mlflow import compose_mlflow_flags, compose_mlflow_settings

VENV_BIN = Path(sys.executable).parent
BUCKET = "autoassign-it"
SECRET_KEY = "it-secret-key-5f2b9c"
"""The S3 secret of the session: it must never appear in a run, an artifact or a log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture(scope="session")
def aws_env() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "it-access-key",
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    server: Any = None
    """The ThreadedMotoServer; moto keeps its buckets in the process, so :meth:`stop` then
    :meth:`start` is an outage after which the same data is served again."""

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        port = int(self.endpoint.rsplit(":", 1)[1])
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **self._credentials())

    def _credentials(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": self.env["AWS_SECRET_ACCESS_KEY"],
            "region_name": self.env["AWS_DEFAULT_REGION"],
        }

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys


@pytest.fixture(scope="session")
def s3_server(aws_env) -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(endpoint=f"http://127.0.0.1:{port}", env=aws_env, server=server)
    s3.client().create_bucket(Bucket=BUCKET)
    yield s3
    s3.stop()


@dataclass
class MlflowServer:
    """``mlflow server`` on 127.0.0.1 that can be stopped and started again on its port."""

    port: int
    backend_store_uri: str
    artifacts_destination: str
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = field(default=None)
    app_name: str | None = None
    """``--app-name`` (``basic-auth``: MLflow's sign-in, as the compose stack runs it)."""

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--artifacts-destination",
            self.artifacts_destination,
            *(["--app-name", self.app_name] if self.app_name else []),
        ]
        handle = self.log.open("a")
        self.process = subprocess.Popen(
            command, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_http(f"{self.uri}/health", timeout=120)

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Postgres:
    port: int
    data: Path
    database: str = "mlflow"

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut; back when it returns."""
        subprocess.run(
            _as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                               "-l", str(self.data.parent / "server.log"), "-w", "restart"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip


def _as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres | None]:
    """A throwaway PostgreSQL cluster on 127.0.0.1, or None where none is installed."""
    if not (POSTGRES_BIN / "initdb").exists():
        yield None
        return
    import tempfile

    # Not under pytest's root-only temp folder: the postgres user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="autoassign-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = lambda command: subprocess.run(  # noqa: E731
        _as_postgres_user(command), check=True, capture_output=True, timeout=120
    )
    run([str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
    options = f"-p {port} -h 127.0.0.1 -k {folder}"
    run([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l",
         str(folder / "server.log"), "-w", "start"])  # fmt: skip
    server = Postgres(port, data)
    run([str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
         server.database])  # fmt: skip
    yield server
    subprocess.run(
        _as_postgres_user([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
        capture_output=True,
        timeout=120,
    )
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server, postgres) -> Iterator[MlflowServer]:
    folder = tmp_path_factory.mktemp("mlflow")
    env = {
        **os.environ,
        **s3_server.env,
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        **compose_mlflow_settings(),
    }
    flags = compose_mlflow_flags()
    # The stack's flags with this session's addresses: a PostgreSQL URI, an s3:// destination.
    assert flags["--backend-store-uri"].startswith("postgresql://")
    assert flags["--artifacts-destination"].startswith("s3://")
    suffix = flags["--artifacts-destination"].split("/", 3)[3]  # s3://BUCKET/<suffix>
    backend = postgres.uri if postgres is not None else f"sqlite:///{folder / 'mlflow.db'}"
    server = MlflowServer(
        free_port(), backend, f"s3://{BUCKET}/{suffix}", env, folder / "server.log"
    )
    server.start()
    yield server
    server.stop()


RAY_LOOPBACK_ENV = {
    # Keep every Ray address on 127.0.0.1 (Ray otherwise advertises the machine's network IP).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
CLUSTER_MLFLOW_USER = ("cluster-bot", "it-cluster-password-41d9b2")
"""The tracking server's credentials the cluster's nodes are started with, as the compose
stack gives its head and workers MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from
``.env``. Servers without authentication ignore them; test_keys' signed-in server has this
user, with only its default permission (read) on experiments others created."""
RAY_SERVER_ENV = {
    "RAY_AUTH_MODE": "token",
    "MLFLOW_TRACKING_USERNAME": CLUSTER_MLFLOW_USER[0],
    "MLFLOW_TRACKING_PASSWORD": CLUSTER_MLFLOW_USER[1],
}
"""What the cluster's own processes run with: token authentication and the tracking
server's credentials. Clients get the token file only (``RAY_AUTH_TOKEN_PATH``), not
``RAY_AUTH_MODE``, as a user handed a token would: the project's command lines turn token
mode on themselves when they find a token."""


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    """What a client of this cluster needs in its environment (loopback, auth token)."""
    dashboard_url: str
    """The dashboard and its Jobs API (what ``orchestration.jobs --address`` takes)."""
    python: Path
    """The interpreter of the head, its workers and job drivers (see :func:`cluster_python`)."""


REPO = Path(__file__).resolve().parents[2]


def cluster_python(folder: Path) -> Path:
    """A Python for the Ray head that imports the project the way the Docker image does.

    The session's virtualenv has the project installed editable: its ``__editable__`` finder,
    loaded by a ``.pth`` file, serves ``autoassign.*`` from the checkout, and so would fill
    in any module a job's upload left out. This virtualenv has no packages of its own but a
    non-editable install of a copy of the project; a ``.pth`` line adds the session's
    site-packages for everything else (the same Ray, torch and MLflow), and a path line does
    not run that folder's own ``.pth`` files, so the editable finder never loads.

    Returns the virtualenv's ``bin`` folder (its ``python`` is what job drivers run).
    """
    import sysconfig

    venv = folder / "cluster-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    ask = [
        str(venv / "bin" / "python"),
        "-c",
        "import sysconfig; print(sysconfig.get_path('purelib'))",
    ]
    site_packages = Path(
        subprocess.run(ask, check=True, capture_output=True, text=True).stdout.strip()
    )
    session_site_packages = sysconfig.get_path("purelib")
    (site_packages / "session-venv.pth").write_text(f"{session_site_packages}\n")
    source = folder / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("autoassign", "orchestration"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site_packages), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return venv / "bin"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server) -> Iterator[RayCluster]:
    port = free_port()
    cluster_bin = cluster_python(tmp_path_factory.mktemp("cluster-python"))
    # `ray start` with token authentication refuses to run without a token; a fresh machine
    # has none in ~/.ray, so the session writes its own and hands it to every client.
    token = tmp_path_factory.mktemp("ray") / "auth_token"
    token.write_text(secrets.token_hex(32))
    client_env = {**RAY_LOOPBACK_ENV, "RAY_AUTH_TOKEN_PATH": str(token)}
    # Job drivers run `python` from the head's PATH: the cluster python. Ray's own processes
    # and its workers run the interpreter that started the head: the same.
    path = f"{cluster_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **s3_server.env, **client_env, **RAY_SERVER_ENV, "PATH": path}
    for inherited in (
        "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",  # job drivers get these
        "PYTHONPATH", "VIRTUAL_ENV",  # could lead the cluster's imports back to the checkout
    ):  # fmt: skip
        env.pop(inherited, None)
    dashboard_port = free_port()
    subprocess.run(
        [
            str(cluster_bin / "python"),
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--num-gpus",
            "0",
            "--include-dashboard",
            "true",
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard_port),
            "--object-store-memory",
            str(1_000_000_000),
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    auth = {"Authorization": f"Bearer {token.read_text()}"}  # the dashboard wants it too
    wait_for_http(f"{dashboard_url}/api/version", timeout=120, headers=auth)
    yield RayCluster(
        address=f"127.0.0.1:{port}",
        env=client_env,
        dashboard_url=dashboard_url,
        python=cluster_bin / "python",
    )
    subprocess.run(
        [str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120
    )


@dataclass
class SweepRunner:
    """Writes sweep configs and runs ``python -m orchestration.sweep`` against the services."""

    folder: Path
    env: dict[str, str]

    def write(self, name: str, config: dict) -> Path:
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    def start(self, config: Path, *args: str) -> subprocess.Popen:
        log = config.with_suffix(".log").open("a")
        return subprocess.Popen(
            [sys.executable, "-m", "orchestration.sweep", str(config), *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.folder,
            # A test run started in the background (nohup, CI runners) ignores SIGINT, and a
            # child inherits that; the sweep gets Ctrl-C as a terminal would give it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def run(self, config: Path, *args: str, timeout: float = 900) -> tuple[int, str]:
        process = self.start(config, *args)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        return code, config.with_suffix(".log").read_text()


@pytest.fixture(scope="session")
def sweep_runner(tmp_path_factory, s3_server, mlflow_server, ray_cluster) -> SweepRunner:
    folder = tmp_path_factory.mktemp("sweeps")
    env = {
        **os.environ,
        **s3_server.env,
        **ray_cluster.env,
        "RAY_ADDRESS": ray_cluster.address,
    }
    for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)
    return SweepRunner(folder, env)


def tiny_sweep(
    name: str,
    folder: Path,
    *,
    mlflow_uri: str,
    s3_endpoint: str,
    datasets: list[dict],
    epochs: int = 2,
    search_space: dict | None = None,
    workers: int = 1,
    train: dict | None = None,
    search: dict | None = None,
    flush_every_s: float | None = 0.0,
) -> dict:
    """A sweep small enough for a test: a narrow ResNet-18/GN detector at 128 px.

    ``flush_every_s``: ``tracking.flush_every_s``, 0 (each epoch's metrics sent at once) for
    the tests that watch a trial's run while it trains; None for the sweep's default.
    """
    return {
        "name": name,
        "base": {
            "model": {
                "backbone": {"depth": 18, "style": "pytorch", "norm": "gn", "frozen_stages": -1},
                "fpn_channels": 64,
                "head": {"num_convs": 1},
                "input": {"min_size": 128, "max_size": 128},
            },
            "data": {"batch_size": 2, "num_workers": 0},
            "train": {
                "lr": 0.01,
                "base_batch_size": 2,
                "warmup_iters": 5,
                "schedule": None,
                "epochs": epochs,
                "milestones": [epochs],
                "grad_clip_norm": 10.0,
                "log_every_iters": 1,
                **(train or {}),
            },
            "eval": {"every_epochs": 1, "batch_size": 2},
            "device": "cpu",
        },
        "datasets": datasets,
        "search_space": search_space or {},
        "search": search or {},
        "resources": {"workers_per_trial": workers, "cpus_per_worker": 1, "max_failures": 2},
        "tracking": {
            "uri": mlflow_uri,
            **({} if flush_every_s is None else {"flush_every_s": flush_every_s}),
        },
        "storage": {"path": f"s3://{BUCKET}/ray", "endpoint_url": s3_endpoint},
        "output_dir": str(folder / name),
    }


def synthetic(name: str, format: str, folder: Path, *, images: int = 8, classes: int = 1) -> dict:
    return {
        "name": name,
        "format": format,
        "root": str(folder / "data" / name),
        "num_classes": classes,
        "synthetic": {"images": images, "image_size": 128, "num_classes": classes}
        if format != "voc"
        else {"images": images, "image_size": 128},
    }


def read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
