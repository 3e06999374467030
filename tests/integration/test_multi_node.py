"""Several Ray nodes on one machine: a head and two worker nodes, each its own ``ray start``.

- a trial of two Ray Train workers spread over the two worker nodes (gloo over TCP) logs
  the same metrics, value for value, as the same trial packed on one node;
- a worker node lost while the trial trains (its raylet, agents and workers SIGKILLed): the
  trial continues from its last registered checkpoint on the node that is left, in the same
  MLflow run, logging no epoch twice, and the sweep exits 0; the recovery time is printed;
- a local ``storage.path`` on this cluster is refused before any trial starts (exit 2).

The cluster is this module's own (``multi_node_cluster``), beside the session's one-node
``ray_cluster`` that other tests may be using at the same time: its own ports, its own
``--temp-dir`` per node (Ray allows one per node), and its processes found by those temp dirs
and their descendants, so that both killing a node and the teardown touch nothing else
(``ray stop`` would stop every Ray on the machine).

Ray 2.60 has no multi-node cluster on 127.0.0.1: with clusters enabled (Linux's default) it
turns ``--node-ip-address 127.0.0.1`` into the machine's own address, and with them disabled
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the session cluster's setting) no node may join. So
the nodes advertise the machine's address; drivers reach the head at 127.0.0.1:PORT.

The nodes run the session's virtualenv (the project editable), which is what the sweep
driver runs too; the session cluster's non-editable ``cluster_python`` matters to Ray Jobs,
which this module does not submit.

The node-loss test kills a node, so it comes last in this file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests.integration.conftest import (
    RAY_SERVER_ENV,
    VENV_BIN,
    SweepRunner,
    free_port,
    synthetic,
    tiny_sweep,
)
from tests.integration.test_fault_tolerance import (
    assert_one_finished_run_restored,
    epochs_logged,
    past_the_first_checkpoint,
    trial_runs,
    wait_until,
)

pytestmark = pytest.mark.integration

CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
"""Every process of this cluster and its clients: multi-node on (see the module docstring)."""


# ---- processes, read from /proc ----------------------------------------------------------------


def process_table() -> dict[int, tuple[int, str]]:
    """Every process of the machine: pid -> (parent pid, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        table[int(entry)] = (parent, command)
    return table


def with_descendants(roots: set[int], table: dict[int, tuple[int, str]]) -> set[int]:
    found, added = set(roots), True
    while added:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        found |= children
        added = bool(children)
    return found


@dataclass
class Node:
    """One ``ray start`` of the cluster."""

    name: str
    temp_dir: Path
    args: list[str]
    """The node's own ``ray start`` flags (its CPUs, its resources, its ports)."""

    def pids(self, table: dict[int, tuple[int, str]] | None = None) -> set[int]:
        """The node's processes: whatever names its temp dir on its command line (the raylet,
        the log monitor, the head's GCS and dashboard), and their descendants (the agents
        and every worker, retitled ``ray::...`` by Ray)."""
        table = process_table() if table is None else table
        mine = re.compile(re.escape(str(self.temp_dir)) + r"(?=[/\s]|$)")
        return with_descendants({pid for pid, (_, cmd) in table.items() if mine.search(cmd)}, table)


@dataclass
class MultiNodeCluster:
    port: int
    """The head's GCS port."""
    head: Node
    workers: dict[str, Node]
    env: dict[str, str]
    """What each ``ray start`` runs with (token mode on)."""
    client_env: dict[str, str]
    """What a client needs: the token file (its command line turns token mode on itself)."""
    killed: set[str] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, node: Node, *, head: bool = False) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        where = ["--head", "--port", str(self.port)] if head else ["--address", self.address]
        subprocess.run(
            [str(VENV_BIN / "ray"), "start", *where, "--node-ip-address", "127.0.0.1",
             "--temp-dir", str(node.temp_dir), "--num-gpus", "0",
             "--dashboard-agent-listen-port", str(free_port()),
             "--min-worker-port", "0", "--max-worker-port", "0",  # any free port
             "--object-store-memory", str(300_000_000), "--disable-usage-stats", *node.args],
            env=self.env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip

    def nodes_alive(self) -> list[dict]:
        """The live nodes as Ray's GCS sees them (``ray.nodes()``, from a client process)."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **self.client_env, "RAY_AUTH_MODE": "token"},
            check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    def kill(self, name: str) -> set[int]:
        """SIGKILL every process of worker node ``name``, as if its machine went away."""
        pids = self.workers[name].pids()
        kill_all(pids)
        self.killed.add(name)
        return pids

    def stop(self) -> None:
        """Every process of every node, the head's last; nothing of anyone else's Ray."""
        table = process_table()
        client_server = re.compile(rf"ray\.util\.client\.server .*--address=\S+:{self.port}\b")
        for node in [*self.workers.values(), self.head]:
            pids = node.pids(table)
            if node is self.head:  # the head's Ray Client server names only the GCS address
                pids |= {pid for pid, (_, cmd) in table.items() if client_server.search(cmd)}
            kill_all(pids)


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def multi_node_cluster(s3_server) -> Iterator[MultiNodeCluster]:
    """A head with no CPU (training lands on the workers) and two worker nodes: ``a`` with 2
    CPUs (room for a whole two-worker trial) and ``b`` with 1, each with a custom resource
    of its name (``node_a``, ``node_b``)."""
    # Short paths: Ray's Unix sockets live under each temp dir (108 bytes at most).
    root = Path(tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    client_env = {**CLUSTER_ENV, "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, **s3_server.env, **client_env, **RAY_SERVER_ENV}
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(inherited, None)
    head = Node("head", root / "head", [
        # The dashboard too, as on the compose head: Ray Train's placement-group cleaner asks
        # its state API whether the controller still lives.
        "--num-cpus", "0", "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
    ])  # fmt: skip
    workers = {
        name: Node(
            name, root / name, ["--num-cpus", str(cpus), "--resources", f'{{"node_{name}": 1}}']
        )
        for name, cpus in (("a", 2), ("b", 1))
    }
    cluster = MultiNodeCluster(free_port(), head, workers, env, client_env)
    started = time.monotonic()
    try:
        cluster.start(head, head=True)
        for node in workers.values():
            cluster.start(node)
        alive = cluster.nodes_alive()
        assert len(alive) == 3, alive
        print(f"\n3-node cluster up in {time.monotonic() - started:.0f} s")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def runner(tmp_path_factory, s3_server, mlflow_server, multi_node_cluster) -> SweepRunner:
    env = {
        **os.environ,
        **s3_server.env,
        **multi_node_cluster.client_env,
        "RAY_ADDRESS": multi_node_cluster.address,
    }
    for leaked in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(leaked, None)
    return SweepRunner(tmp_path_factory.mktemp("multi-node-sweeps"), env)


class TrainWorkerPlaces:
    """Samples, twice a second, which of the cluster's worker nodes run a Ray Train worker
    (a ``ray::RayTrainWorker`` process among a node's processes)."""

    def __init__(self, cluster: MultiNodeCluster):
        self.cluster = cluster
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            table = process_table()
            for name, node in self.cluster.workers.items():
                if any("ray::RayTrainWorker" in table[pid][1] for pid in node.pids(table)):
                    self.seen.add(name)

    def __enter__(self) -> TrainWorkerPlaces:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def two_worker_sweep(name: str, runner: SweepRunner, mlflow_server, s3_server, *, epochs: int,
                     images: int, placement: str) -> dict:  # fmt: skip
    folder = runner.folder
    config = tiny_sweep(
        name,
        folder,
        mlflow_uri=mlflow_server.uri,
        s3_endpoint=s3_server.endpoint,
        # One dataset folder for every sweep of the module: the same images.
        datasets=[synthetic(f"mn-shapes-{images}", "coco", folder, images=images, classes=2)],
        epochs=epochs,
        workers=2,
    )
    config["resources"]["placement_strategy"] = placement
    return config


def metric_histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


def test_a_local_storage_path_is_refused_on_a_cluster_of_three_nodes(
    runner, mlflow_server, s3_server, tmp_path
):
    name = "it-mn-local-storage"
    config = two_worker_sweep(
        name, runner, mlflow_server, s3_server, epochs=1, images=4, placement="PACK"
    )
    config["storage"] = {"path": str(tmp_path / "checkpoints")}
    code, log = runner.run(runner.write(name, config), timeout=300)
    assert code == 2, log[-4000:]
    error = next(line for line in log.splitlines() if line.startswith("error: "))
    assert error.startswith(f"error: storage.path {tmp_path / 'checkpoints'} is a local folder")
    assert "the cluster has 3 nodes" in error
    assert "storage.path: s3://" in error and "storage.shared: true" in error
    assert trial_runs(mlflow_server.client(), name) == []  # refused before any trial


def test_two_workers_on_two_nodes_log_what_they_log_on_one(
    runner, mlflow_server, s3_server, multi_node_cluster
):
    """The same trial (config, seed, data) as two Ray Train workers on node ``a`` alone
    (``PACK``) and on ``a`` and ``b`` (``SPREAD``): every metric of the two MLflow runs is
    equal at every step. Both are two gloo ranks over TCP, one process each; which node a
    rank runs on changes no arithmetic (the same shard, the same single thread, the same
    two-rank reduction), so equality is exact, not approximate."""
    client = mlflow_server.client()
    histories, places = {}, {}
    for placement in ("PACK", "SPREAD"):
        name = f"it-mn-{placement.lower()}"
        config = two_worker_sweep(
            name, runner, mlflow_server, s3_server, epochs=2, images=8, placement=placement
        )
        path = runner.write(name, config)
        started = time.monotonic()
        with TrainWorkerPlaces(multi_node_cluster) as seen:
            code, log = runner.run(path, timeout=600)
        print(f"\n{placement}: sweep of 2 workers x 2 epochs in {time.monotonic() - started:.0f} s"
              f" on node(s) {sorted(seen.seen)}")  # fmt: skip
        assert code == 0, log[-4000:]
        (run,) = trial_runs(client, name)
        assert run.info.status == "FINISHED"
        histories[placement] = metric_histories(client, run.info.run_id)
        places[placement] = seen.seen
    assert places == {"PACK": {"a"}, "SPREAD": {"a", "b"}}
    one, two = histories["PACK"], histories["SPREAD"]
    assert {"train/loss", "bbox_mAP", "epoch"} <= set(one)
    assert [v for _, v in one["epoch"]] == [1.0, 2.0]
    assert one == two
    final = {k: v[-1][1] for k, v in sorted(one.items()) if "/" not in k or k == "train/loss"}
    print(f"final metrics, equal on one and on two nodes: {final}")


def test_a_lost_node_and_the_trial_continues_on_the_node_left(
    runner, mlflow_server, s3_server, multi_node_cluster
):
    """Node ``b`` SIGKILLed mid-epoch, once Ray registered the first epoch's checkpoint.

    Ray Train's controller sees a worker gone and starts the worker group again from that
    checkpoint (``resources.max_failures``); ``SPREAD`` is a preference, so both workers
    then go to node ``a``, the one left with room for them. Had the trial driver been on
    ``b`` too, Tune would start the trial again instead, into the same run: the test says
    which happened.
    """
    cluster, client = multi_node_cluster, mlflow_server.client()
    name = "it-mn-node-loss"
    config = two_worker_sweep(
        name, runner, mlflow_server, s3_server, epochs=3, images=16, placement="SPREAD"
    )
    path = runner.write(name, config)
    terminal = path.with_suffix(".log")
    process = runner.start(path)

    def first_epoch_shown_and_checkpointed():
        if process.poll() is not None:
            raise AssertionError(f"the sweep ended before the kill:\n{terminal.read_text()}")
        shown = re.search(r"^\S+  epoch 1/3  ", terminal.read_text(), re.M)
        return shown and past_the_first_checkpoint(client, s3_server, name)

    try:
        with TrainWorkerPlaces(cluster) as before:
            run = wait_until(first_epoch_shown_and_checkpointed, timeout=400, what="epoch 2")
        assert before.seen == {"a", "b"}, before.seen
        table = process_table()
        on_b = {Path(table[pid][1].split()[0]).name for pid in cluster.workers["b"].pids(table)}
        driver_on_b = "ray::ImplicitFunc" in " ".join(on_b)
        steps_before = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        killed_at = time.time()
        killed = cluster.kill("b")
        print(f"\nkilled node b: {len(killed)} processes ({', '.join(sorted(on_b))})")
        with TrainWorkerPlaces(cluster) as after:
            code = process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    log = terminal.read_text()
    assert_one_finished_run_restored(client, name, run, code, log, runner.folder)
    assert after.seen == {"a"}, after.seen  # trained again, on the node that was left
    alive = cluster.nodes_alive()
    assert len(alive) == 2 and not any("node_b" in r for r in alive), alive

    # Recovery, from the kill to: the restored workers' first line (the sweep's log file
    # stamps each line as it arrives) and the first step past what had been logged (the
    # steps since the checkpoint are trained again first, not logged twice).
    worker_log = (runner.folder / name / "sweep.log").read_text()
    restored_at = [
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for stamp in re.findall(r"^(\S+ \S+) .*starting at iteration [1-9]", worker_log, re.M)
    ]
    assert restored_at and restored_at[-1] > killed_at
    # A step logged in the moments between reading the history and the kill is not in
    # steps_before: what was logged before the restored workers started is the reference.
    history = client.get_metric_history(run.info.run_id, "train/loss")
    logged_before = {m.step for m in history if m.timestamp / 1000 <= restored_at[-1]}
    assert steps_before <= logged_before
    new = sorted((m.timestamp, m.step) for m in history if m.timestamp / 1000 > restored_at[-1])
    assert new, "nothing was logged after the workers were restored"
    first_new_ms, first_new_step = new[0]
    assert first_new_step > max(logged_before)  # not logged twice
    restarted = (
        "Tune started the trial again (its driver was on b)"
        if driver_on_b
        else "Ray Train started the workers again"
    )
    epochs = [int(v) for _, v in epochs_logged(client, run.info.run_id)]
    print(
        f"node loss -> training again from the checkpoint: {restored_at[-1] - killed_at:.1f} s, "
        f"-> first new train/loss step ({first_new_step}) logged: "
        f"{first_new_ms / 1000 - killed_at:.1f} s; {restarted}; epochs {epochs}"
    )
